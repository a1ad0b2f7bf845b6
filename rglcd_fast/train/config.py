"""The trainer's settings: one dataclass, readable from a YAML/JSON file and overridable from the command
line (every field is a `--flag`). Defaults follow the public LCD / RG-LCD scripts; `teacher: digits`
selects the embedded digits world (docs/design.md §4), whose preset overrides the sizes and lengths."""

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..files import is_sdxl_folder
from .data import check_data_settings
from .step import DistillationConfig

_STEP_DEFAULTS = DistillationConfig()  # the step's defaults, which the fields of the same names take
SDXL_W_MIN = 3.0  # the SDXL LCD scripts' lower guidance scale (SD's: 5.0)
REWARD_MODES = ("lrm", "direct", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
COMPILE_UNETS = ("none", "frozen", "student_blocks", "all")
REPORT_TO = ("tensorboard", "wandb", "all", "none")


def _check_mixed_precision(value):
    if value is not None and value not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision: expected one of {', '.join(MIXED_PRECISION)}, got {value!r}")


def _finite(low, above=False):
    return lambda v: math.isfinite(v) and (v > low if above else v >= low)


# (settings, test, what is expected): checked before any model is built, so a bad value stops the run at once
# instead of a step, a checkpoint or the final save later (or weights turned non-finite by an infinite rate)
_NUMBER_RULES = (
    (("learning_rate", "lrm_learning_rate", "adam_weight_decay", "adam_epsilon"), _finite(0.0), "a finite value >= 0"),
    (("max_grad_norm", "timestep_scaling"), _finite(0.0, above=True), "a finite value > 0"),
    (("reward_scale", "rm_loss_scale", "w_min", "w_max", "distill_weight"), _finite(0.0), "a finite value >= 0"),
    (("adam_beta1", "adam_beta2"), lambda v: 0.0 <= v < 1.0, "a value in [0, 1)"),
    (("ema_decay",), lambda v: 0.0 <= v <= 1.0, "a value in [0, 1]"),
    (("compile_memory_budget",), lambda v: 0.0 < v <= 1.0, "a value in (0, 1]"),
    (
        (
            *("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"),
            *("logging_steps", "max_nonfinite_steps", "num_ddim_timesteps", "lora_rank", "lora_alpha"),
            *("lrm_batch_size", "lrm_embed_dim", "distill_candidates"),
            *("vit_patch_size", "vit_width", "vit_layers", "vit_heads"),
        ),
        lambda v: v >= 1,
        "a positive integer",
    ),
    (
        ("validation_steps", "lr_warmup_steps", "dataloader_num_workers", "lrm_unlocked_text_layers"),
        lambda v: v >= 0,
        "an integer >= 0",
    ),
    (("checkpoints_total_limit",), lambda v: v >= 1, "a positive integer, or None to keep every checkpoint"),
    (("seed",), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
)


def _check_common_settings(config) -> None:
    """The numeric settings of _NUMBER_RULES (those the config has), the LR schedule's name and the output
    folder (it or the first existing folder above it must be a folder)."""
    from diffusers.optimization import SchedulerType

    for names, ok, expected in _NUMBER_RULES:
        for name in names:
            value = getattr(config, name, None)
            if value is not None and not ok(value):
                raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if not all(w >= 1 for w in config.lrm_widths) or not config.lrm_widths:
        raise ValueError(f"lrm_widths: expected positive channel counts, got {config.lrm_widths!r}")
    schedules = [s.value for s in SchedulerType]
    if config.lr_scheduler not in schedules:
        raise ValueError(f"lr_scheduler: expected one of {', '.join(schedules)}, got {config.lr_scheduler!r}")
    existing = os.path.abspath(config.output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"output_dir: {existing} is a file, not a folder")


@dataclass
class TrainConfig:
    # ---- models and data
    teacher: str = "digits"  # a diffusers Stable Diffusion folder, or "digits" (the embedded world)
    data: Optional[str] = None  # image folder / JSONL manifest / tar shards; None: the digits world's data
    resolution: Optional[int] = None  # pixels; None: the teacher's UNet sample_size × the VAE factor
    output_dir: str = "rglcd-output"
    # another VAE (a diffusers AutoencoderKL folder, e.g. SDXL's fp16-fix VAE), run in the weights' dtype; None: the
    # teacher's (an SDXL teacher's in float32: it overflows in float16, as the SDXL scripts' rule)
    vae: Optional[str] = None
    # SDXL: the size / crop time ids (R, R), (0, 0), (R, R) for every image instead of each image's original size
    # and crop corner (the SDXL scripts' --use_fix_crop_and_size)
    use_fix_crop_and_size: bool = False
    # data options (images and captions, see rglcd_fast.train.data): the Hugging Face data set's columns (None:
    # the first image column; "text", "caption" or the first string column), a centre or random square crop
    # after resizing the short side, a random horizontal flip, the resize filter (bilinear, bicubic, lanczos)
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    center_crop: bool = True
    random_flip: bool = False
    interpolation: str = "bicubic"
    # ---- student
    use_lora: bool = False  # LoRA student (as train_lcm_distill_lora_sd.py: no w-embedding, target = student)
    lora_rank: int = 64
    lora_alpha: int = 64
    time_cond_proj_dim: int = 256  # the full student's guidance (w) embedding size
    # ---- distillation (docs/design.md §1)
    num_ddim_timesteps: int = _STEP_DEFAULTS.num_ddim_timesteps
    w_min: Optional[float] = None  # None: the SD scripts' 5.0, or the SDXL scripts' 3.0 for an SDXL teacher
    w_max: float = _STEP_DEFAULTS.w_max
    loss_type: str = _STEP_DEFAULTS.loss_type
    huber_c: float = _STEP_DEFAULTS.huber_c
    timestep_scaling: float = _STEP_DEFAULTS.timestep_scaling
    ema_decay: float = 0.95
    # ---- optimisation
    max_train_steps: int = 1000
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: Optional[float] = None  # None: 1e-6 for a full student, 1e-4 for LoRA
    # any diffusers.optimization scheduler name; "constant" (the scripts' default) has no warm-up: diffusers'
    # constant schedule ignores lr_warmup_steps, so the scripts' 500 warm-up steps never happen there (use
    # constant_with_warmup for one)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0  # the RG-LCD script's (diffusers' LCD script: 1e-2)
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    scale_lr: bool = False  # learning_rate × batch size × gradient accumulation × processes (as the scripts)
    gradient_checkpointing: bool = False
    # a full student over several processes (accelerate launch / torchrun): it and its EMA target sharded with
    # FSDP2 (rglcd_fast.train.fsdp; checkpoints gathered whole), the teacher replicated; off: DDP
    fsdp: bool = False
    fsdp_shard_teacher: bool = False  # with fsdp: the teacher's UNet sharded too (else one copy per process)
    # no, fp16 or bf16; None: accelerate's setting (`accelerate launch --mixed_precision`, `accelerate config`), else no
    mixed_precision: Optional[str] = None
    allow_tf32: bool = False  # TF32 matmuls and convolutions on Ampere and newer (as the scripts' --allow_tf32)
    seed: int = 0
    # ---- reward guidance (docs/design.md §1 steps 8-9)
    reward_mode: str = "lrm"  # lrm (latent proxy), direct (decode and score), none (plain LCD)
    # expert RM: digits, clip, pickscore, aesthetic, aesthetic_mlp, hpsv2, imagereward, weighted_hpsv2_imagereward
    reward_model: str = "digits"
    reward_model_path: Optional[str] = None  # its folder or file (digits: the shipped weights)
    reward_scale: float = _STEP_DEFAULTS.reward_scale  # × the scale-free reward (a cosine for CLIP-like models)
    # the LRM: None trains one from random weights (image tower; text tower from lrm_init_clip or the teacher's
    # text encoder); a folder (`rglcd-fast pretrain-lrm`'s output; "digits": the digits world's) starts from a
    # pre-trained one, fine-tuned with its first parts frozen as the official code, or not at all (lrm_frozen)
    lrm_path: Optional[str] = None
    lrm_frozen: bool = False
    # trainable parts of a pre-trained LRM: the image tower's last groups (2: its last block and the
    # projection) and the text tower's last layers (None: the official 5 of 24 scaled to its depth)
    lrm_unlocked_image_groups: int = 2
    lrm_unlocked_text_layers: Optional[int] = None
    lrm_learning_rate: Optional[float] = None  # None: 3.3e-6 (the official) for a pre-trained LRM, else 1e-5
    # samples of each batch the LRM update uses: the official default 16, at most the batch (the official takes
    # randperm(train_batch_size)[:rm_batch_size])
    lrm_batch_size: int = 16
    lrm_loss: str = "kl"  # kl (the official "distillation") or ce ("cross_entropy")
    lrm_ce_real_wins: bool = True  # ce: pairs holding the real candidate are labelled "real wins" (official)
    smooth_gt_label: bool = False  # kl: uniform target where the expert prefers a generated sample over the real
    lrm_score_real_pixels: bool = False  # the expert scores the real candidate on the images, not their decode
    rm_loss_scale: float = 1.0
    lrm_widths: tuple = (64, 128, 256)
    lrm_embed_dim: int = 512
    lrm_init_clip: Optional[str] = None  # an image-space CLIP folder to start the LRM's text tower from
    # ---- bookkeeping
    report_to: str = (
        "tensorboard"  # accelerate's trackers: tensorboard, wandb, all or none (logs.csv is always written)
    )
    tracker_project_name: str = "rglcd"
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = 3
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    # a run that does not resume, into an output_dir holding an earlier run's checkpoints: refused, or (true)
    # those checkpoints removed first (so a later "latest" never resumes the earlier run)
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    validation_steps: int = 500  # sample grid every N steps (and at the end); 0: only at the end
    validation_prompts: list = field(default_factory=list)  # default: the data's first captions
    validation_lcm_steps: tuple = (1, 2, 4)
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    dataloader_num_workers: int = 0
    progress: bool = True
    # ---- speed and memory (none changes the math; benchmarks/results/train_step_<card>.md measures each)
    channels_last: bool = False  # CUDA: UNets and VAE in NHWC (eager: slower, torch's CUDA GroupNorm is NCHW-only)
    # torch.compile: "frozen" the teacher and EMA target UNets and the VAE encoder (forward only), and with a
    # reward the VAE decoder and the expert's image encoders;
    # "student_blocks" also the student's resnet and transformer blocks one by one (inside gradient checkpointing);
    # "all" the whole student instead; each compiles on its first call. compile_memory_budget: AOTAutograd's
    # activation memory budget for the compiled student (0 < b <= 1; lower recomputes more in the backward; None:
    # torch's default, 1.0)
    compile_unets: str = "none"
    compile_memory_budget: Optional[float] = None
    vae_decode_batch_size: Optional[int] = None  # LRM update: samples per VAE decode (None: lrm_batch_size)

    def __post_init__(self):
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode: expected one of {', '.join(REWARD_MODES)}, got {self.reward_mode!r}")
        _check_mixed_precision(self.mixed_precision)
        check_data_settings(self)
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to: expected one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.compile_unets not in COMPILE_UNETS:
            raise ValueError(f"compile_unets: expected one of {', '.join(COMPILE_UNETS)}, got {self.compile_unets!r}")
        if self.loss_type not in ("huber", "l2"):
            raise ValueError(f"loss_type: expected 'huber' or 'l2', got {self.loss_type!r}")
        self.lrm_loss = {"distillation": "kl", "cross_entropy": "ce"}.get(
            self.lrm_loss, self.lrm_loss
        )  # official names
        if self.lrm_loss not in ("kl", "ce"):
            raise ValueError(f"lrm_loss: expected 'kl' or 'ce', got {self.lrm_loss!r}")
        if self.smooth_gt_label and self.lrm_loss != "kl":
            raise ValueError("smooth_gt_label: applies to lrm_loss 'kl' only (ce labels real-holding pairs itself)")
        if self.w_min is None:
            sdxl = self.teacher != "digits" and os.path.isdir(self.teacher) and is_sdxl_folder(self.teacher)
            self.w_min = SDXL_W_MIN if sdxl else _STEP_DEFAULTS.w_min
        if not self.w_min <= self.w_max:
            raise ValueError(f"w_min: must be <= w_max ({self.w_max}), got {self.w_min}")
        self.lrm_widths = tuple(self.lrm_widths)
        self.validation_lcm_steps = tuple(self.validation_lcm_steps)
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.use_lora else 1e-6
        if self.lrm_learning_rate is None:
            self.lrm_learning_rate = 3.3e-6 if self.lrm_path else 1e-5
        _check_common_settings(self)
        from ..sample.sampler import MAX_STEPS

        if not self.validation_lcm_steps or not all(1 <= n <= MAX_STEPS for n in self.validation_lcm_steps):
            raise ValueError(
                f"validation_lcm_steps: expected LCM step counts from 1 to {MAX_STEPS}, got {self.validation_lcm_steps}"
            )
        if not self.use_lora and self.time_cond_proj_dim < 1:  # the full student's guidance embedding
            raise ValueError(f"time_cond_proj_dim: expected a positive integer, got {self.time_cond_proj_dim}")
        if self.fsdp and self.use_lora:
            raise ValueError(
                "fsdp: shards a full student; a LoRA student's adapters are small: train it with DDP (fsdp false)"
            )
        if self.fsdp_shard_teacher and not self.fsdp:
            raise ValueError("fsdp_shard_teacher: shards the teacher beside an FSDP student (set fsdp true)")
        if self.fsdp and self.compile_unets != "none":
            raise ValueError(f"fsdp: not with compile_unets {self.compile_unets!r} yet (use 'none')")
        if self.lrm_frozen and not self.lrm_path:
            raise ValueError(
                "lrm_frozen: a frozen LRM must be a pre-trained one (set lrm_path, the scripts' "
                "--pretrained_latent_rm), or train it online (lrm_frozen false, the scripts' "
                "--guide_with_expert_reward)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        from ..files import write_file_atomic

        write_file_atomic(path, json.dumps(self.to_dict(), indent=2, default=list))


# The digits world (docs/design.md §4): 8×8 latents, the shipped pre-trained LRM fine-tuned online at the official
# rate and reward scale (3.3e-6, 1.0; lrm_widths/lrm_embed_dim size an LRM from random weights), a run of a
# few minutes on two CPU cores.
DIGITS_PRESET = dict(
    time_cond_proj_dim=32,
    max_train_steps=300,
    train_batch_size=32,
    learning_rate=1e-4,
    lr_warmup_steps=20,
    lrm_path="digits",
    lrm_batch_size=32,
    lrm_widths=(32, 64),
    lrm_embed_dim=64,
    reward_scale=1.0,
    checkpointing_steps=100,
    logging_steps=10,
    validation_steps=100,
    output_dir="rglcd-digits",
)


@dataclass
class LRMPretrainConfig:
    """`rglcd-fast pretrain-lrm`: the latent reward model pre-trained offline as a latent CLIP (docs/design.md §1
    step 9) on image-caption data encoded by the teacher's VAE, optionally distilling the expert's
    preferences between real latents and the teacher's one-step predictions."""

    # ---- models and data (as the trainer's)
    teacher: str = "digits"
    data: Optional[str] = None
    resolution: Optional[int] = None
    output_dir: str = "rglcd-lrm"
    # data options (images and captions, see rglcd_fast.train.data): the Hugging Face data set's columns (None:
    # the first image column; "text", "caption" or the first string column), a centre or random square crop
    # after resizing the short side, a random horizontal flip, the resize filter (bilinear, bicubic, lanczos)
    image_column: Optional[str] = None
    caption_column: Optional[str] = None
    center_crop: bool = True
    random_flip: bool = False
    interpolation: str = "bicubic"
    reward_model: str = "digits"  # the expert: its CLIP text tower starts the LRM's (else the teacher's)
    reward_model_path: Optional[str] = None
    # ---- the LRM (image tower: "conv", or "vit" as the official latent_ViT: patch 4, width 512, 12 layers)
    image_tower: str = "conv"
    lrm_widths: tuple = (64, 128, 256)
    lrm_embed_dim: int = 512
    vit_patch_size: int = 4
    vit_width: int = 512
    vit_layers: int = 12
    vit_heads: int = 8
    # ---- optimisation
    max_train_steps: int = 2000
    train_batch_size: int = 64
    learning_rate: float = 5e-4
    # AdamW as open_clip trains a CLIP (the official latent CLIP): the weight decay on weight matrices only (no
    # gain, bias, class token or logit scale), betas and epsilon by tower (None: open_clip's for a ViT, 0.98 and
    # 1e-6; for a ResNet, the conv tower's kin, 0.999 and 1e-8)
    adam_weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: Optional[float] = None
    adam_epsilon: Optional[float] = None
    decay_every_parameter: bool = False  # True: decay the gains, biases and logit scale too (the digits LRM's run)
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: Optional[str] = None  # as the trainer's: None is accelerate's setting
    seed: int = 0
    # ---- distilling the expert: its pairwise preferences between each real latent and distill_candidates
    # one-step predictions of the teacher from noisy versions of it (what the LRM ranks online), weight
    # distill_weight (0: contrastive only)
    distill_weight: float = 1.0
    distill_candidates: int = 2
    # ---- bookkeeping
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = 2
    resume_from_checkpoint: Optional[str] = None
    overwrite_output_dir: bool = False  # as the trainer's
    logging_steps: int = 50
    dataloader_num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.image_tower not in ("conv", "vit"):
            raise ValueError(f"image_tower: expected 'conv' or 'vit', got {self.image_tower!r}")
        _check_mixed_precision(self.mixed_precision)
        check_data_settings(self)
        vit = self.image_tower == "vit"
        self.adam_beta2 = self.adam_beta2 if self.adam_beta2 is not None else (0.98 if vit else 0.999)
        self.adam_epsilon = self.adam_epsilon if self.adam_epsilon is not None else (1e-6 if vit else 1e-8)
        self.lrm_widths = tuple(self.lrm_widths)
        _check_common_settings(self)
        if self.vit_width % self.vit_heads:
            raise ValueError(f"vit_heads: must divide vit_width ({self.vit_width}), got {self.vit_heads}")

    to_dict = TrainConfig.to_dict
    save = TrainConfig.save


# The digits world's LRM (rglcd_fast/world/weights/lrm, rebuilt by `rglcd-fast make-world`).
DIGITS_LRM_PRESET = dict(
    lrm_widths=(32, 64),
    lrm_embed_dim=64,
    vit_patch_size=2,
    vit_width=64,
    vit_layers=4,
    vit_heads=4,
    max_train_steps=1500,
    train_batch_size=64,
    learning_rate=1e-3,
    lr_warmup_steps=50,
    decay_every_parameter=True,  # as the shipped weights were trained
    checkpointing_steps=500,
    logging_steps=50,
    output_dir="rglcd-digits-lrm",
)
PRESETS = {TrainConfig: DIGITS_PRESET, LRMPretrainConfig: DIGITS_LRM_PRESET}


def _read_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file {path!r}")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of setting names to values")
    return values


def make_config(file: Optional[str] = None, config_class=TrainConfig, **overrides):
    """Defaults, then the digits preset when the teacher is the digits world, then the file, then the
    overrides. Unknown names raise, naming them."""
    values = _read_file(file) if file else {}
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config: unknown setting(s) {', '.join(unknown)}")
    teacher = values.get("teacher", config_class.teacher)
    preset = PRESETS[config_class] if teacher == "digits" else {}
    return config_class(**{**preset, **values})


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


# The official scripts (diffusers' examples/consistency_distillation/train_lcm_distill_*_wds.py, RG-LCD's
# train_lcm_distill_sd_wds.py) spell every flag with underscores; each of ours takes that spelling too
# (--output_dir). Theirs whose names differ from ours:
SCRIPT_ALIASES = {
    "pretrained_teacher_model": "teacher",
    "train_shards_path_or_url": "data",
    "rm_batch_size": "lrm_batch_size",
    "rm_lr": "lrm_learning_rate",
    "unlocked_rm_text_layers": "lrm_unlocked_text_layers",
    "pretrained_latent_rm": "lrm_path",
    "latent_rm_loss_type": "lrm_loss",
    "reward_fn_name": "reward_model",
    "unet_time_cond_proj_dim": "time_cond_proj_dim",
    "timestep_scaling_factor": "timestep_scaling",
    "interpolation_type": "interpolation",
    "pretrained_vae_model_name_or_path": "vae",
}
# RG-LCD's reward switches, read by config_from_args (see _script_settings)
SCRIPT_SWITCHES = ("optimize_reward_fn", "direct_optim_expert_reward", "guide_with_expert_reward")
_UPLOAD = "nothing is uploaded: upload OUTPUT/pipeline (or OUTPUT/lora) with `huggingface-cli upload`"
_LENGTH = "the run's length is --max-train-steps"
# The scripts' flags rglcd_fast does not take: flag -> (stops the run?, what happens instead / what to use).
SCRIPT_UNSUPPORTED = {
    "enable_xformers_memory_efficient_attention": (
        False,
        "not needed: the UNets' attention is torch's scaled_dot_product_attention (flash / memory-efficient kernels)",
    ),
    "use_8bit_adam": (
        False,
        "torch's fused AdamW is used (bitsandbytes is not a dependency); --use-lora trains far fewer optimiser states",
    ),
    "push_to_hub": (False, _UPLOAD),
    "hub_token": (False, _UPLOAD),
    "hub_model_id": (False, _UPLOAD),
    "max_train_samples": (False, _LENGTH),
    "num_train_epochs": (False, _LENGTH),
    "logging_dir": (False, "the logs go to OUTPUT/logs (trackers) and OUTPUT/logs.csv"),
    "cache_dir": (False, "models are read from local folders only"),
    "local_rank": (False, "accelerate launch / torchrun set each process's rank"),
    "cast_teacher_unet": (False, "the teacher's UNet already runs in the weight dtype of --mixed-precision"),
    "revision": (True, "models are read from local folders: download that revision and pass its folder"),
    "teacher_revision": (
        True,
        "models are read from local folders: download that revision and pass its folder to --teacher",
    ),
    "latent_rm_type": (
        True,
        "the LRM's image tower is part of its folder: pre-train one with `rglcd-fast "
        "pretrain-lrm --image-tower vit` (the official latent_ViT) or conv, and pass --lrm-path",
    ),
    "proportion_empty_prompts": (
        True,
        "caption dropout is not implemented (the scripts' default is 0: leave the flag out)",
    ),
}


class _Setting(argparse.Action):
    """Stores a setting and remembers the flag it came by (the scripts' dialect is told by its flags)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.flags_given = [*getattr(namespace, "flags_given", []), option_string]


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.unsupported_flags = [*getattr(namespace, "unsupported_flags", []), self.dest]


def add_arguments(parser: argparse.ArgumentParser, config_class=TrainConfig) -> None:
    """--config FILE plus one --flag per field of config_class (absent from the namespace unless given;
    "none" sets an optional field to None; a boolean flag alone means true), each also spelt with
    underscores; for TrainConfig also the official scripts' names of the same settings, their reward switches,
    and their flags rglcd_fast does not take (reported by config_from_args). The parser must not match
    abbreviations (argparse.ArgumentParser(allow_abbrev=False)): --reward is no flag."""
    parser.add_argument("--config", default=None, help="a YAML or JSON file of settings")
    aliases = {}
    if config_class is TrainConfig:
        for script_name, name in SCRIPT_ALIASES.items():
            aliases.setdefault(name, []).append("--" + script_name)
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = list(dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name, *aliases.get(f.name, [])]))
        text = str(f.type)
        wrap = _parse_optional if "Optional" in text else (lambda kind: kind)
        common = dict(dest=f.name, action=_Setting, default=argparse.SUPPRESS, help=f"default {default}")
        if isinstance(default, bool):
            parser.add_argument(*flags, type=_parse_bool, nargs="?", const=True, metavar="BOOL", **common)
        elif isinstance(default, (list, tuple)):
            item = type(default[0]) if default else str
            parser.add_argument(*flags, type=item, nargs="+", **common)
        else:
            kind = int if "int" in text else float if "float" in text else str
            parser.add_argument(*flags, type=wrap(kind), **common)
    if config_class is TrainConfig:
        scripts = parser.add_argument_group("the official scripts' flags (see config_from_args)")
        for name in SCRIPT_SWITCHES:
            scripts.add_argument("--" + name, action="store_true", default=argparse.SUPPRESS, help="RG-LCD's switch")
        for name, (stops, message) in SCRIPT_UNSUPPORTED.items():
            scripts.add_argument(
                "--" + name,
                dest=name,
                action=_Unsupported,
                nargs="?",
                default=argparse.SUPPRESS,
                help=("not taken: " if stops else "ignored: ") + message,
            )


def _script_settings(given: dict, settings: dict) -> dict:
    """A command in the scripts' dialect (it names --pretrained_teacher_model or an RG-LCD reward switch)
    means what the script would train: reward guidance only with --optimize_reward_fn (the expert directly with
    --direct_optim_expert_reward, else the LRM, updated online only with --guide_with_expert_reward), and a
    LoRA student where it sets --lora_rank (only the LoRA scripts have that flag). Our own flags (--reward-mode,
    --lrm-frozen, --use-lora) win."""
    used = given.get("flags_given", [])
    if "--pretrained_teacher_model" not in used and not any(given.get(name) for name in SCRIPT_SWITCHES):
        return {}
    implied = {}
    if "reward_mode" not in settings:
        direct = given.get("direct_optim_expert_reward", False)
        implied["reward_mode"] = ("direct" if direct else "lrm") if given.get("optimize_reward_fn") else "none"
    if implied.get("reward_mode", settings.get("reward_mode")) == "lrm" and "lrm_frozen" not in settings:
        implied["lrm_frozen"] = not given.get("guide_with_expert_reward", False)
    if "--lora_rank" in used and "use_lora" not in settings:
        implied["use_lora"] = True
    return implied


def config_from_args(args: argparse.Namespace, config_class=TrainConfig):
    """The config of a parsed command line. The scripts' flags we do not take: one line each on stderr where
    leaving them out changes nothing that is trained, else a ValueError naming the flag."""
    given = vars(args)
    names = {f.name for f in dataclasses.fields(config_class)}
    settings = {k: v for k, v in given.items() if k in names}
    for flag in given.get("unsupported_flags", []):
        stops, message = SCRIPT_UNSUPPORTED[flag]
        if stops:
            raise ValueError(f"--{flag}: not supported: {message}")
        print(f"--{flag}: ignored: {message}", file=sys.stderr)
    if config_class is TrainConfig:
        settings.update(_script_settings(given, settings))
    config = make_config(args.config, config_class, **settings)
    unused = [name for name in settings if name in _UNUSED_BY_REWARD_MODE.get(getattr(config, "reward_mode", ""), ())]
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        print(f"{flags}: ignored: reward_mode {config.reward_mode} does not use them", file=sys.stderr)
    return config


_LRM_SETTINGS = {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("lrm_")} | {
    "smooth_gt_label",
    "rm_loss_scale",
}
# the settings each reward mode leaves unused: a flag given for one of them gets a line on stderr
_UNUSED_BY_REWARD_MODE = {
    "none": _LRM_SETTINGS | {"reward_model", "reward_model_path", "reward_scale"},
    "direct": _LRM_SETTINGS,
}
