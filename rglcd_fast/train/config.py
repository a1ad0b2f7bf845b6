"""The trainer's settings: one dataclass, readable from a YAML/JSON file and overridable from the command
line (every field is a `--flag`). Defaults follow the public LCD / RG-LCD scripts; `teacher: digits`
selects the embedded digits world (DESIGN.md §4), whose preset overrides the sizes and lengths."""
import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .step import DistillationConfig

_STEP_DEFAULTS = DistillationConfig()  # the step's defaults, which the fields of the same names take
REWARD_MODES = ("lrm", "direct", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
COMPILE_UNETS = ("none", "frozen", "student_blocks", "all")


@dataclass
class TrainConfig:
    # ---- models and data
    teacher: str = "digits"  # a diffusers Stable Diffusion folder, or "digits" (the embedded world)
    data: Optional[str] = None  # image folder / JSONL manifest / tar shards; None: the digits world's data
    resolution: Optional[int] = None  # pixels; None: the teacher's UNet sample_size × the VAE factor
    output_dir: str = "rglcd-output"
    # ---- student
    use_lora: bool = False  # LoRA student (as train_lcm_distill_lora_sd.py: no w-embedding, target = student)
    lora_rank: int = 64
    lora_alpha: int = 64
    time_cond_proj_dim: int = 256  # the full student's guidance (w) embedding size
    # ---- distillation (DESIGN.md §1)
    num_ddim_timesteps: int = _STEP_DEFAULTS.num_ddim_timesteps
    w_min: float = _STEP_DEFAULTS.w_min
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
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    seed: int = 0
    # ---- reward guidance (DESIGN.md §1 steps 8-9)
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
    lrm_batch_size: int = 8  # samples of each batch the LRM update uses
    lrm_loss: str = "kl"  # kl (the official "distillation") or ce ("cross_entropy")
    lrm_ce_real_wins: bool = True  # ce: pairs holding the real candidate are labelled "real wins" (official)
    smooth_gt_label: bool = False  # kl: uniform target where the expert prefers a generated sample over the real
    lrm_score_real_pixels: bool = False  # the expert scores the real candidate on the images, not their decode
    rm_loss_scale: float = 1.0
    lrm_widths: tuple = (64, 128, 256)
    lrm_embed_dim: int = 512
    lrm_init_clip: Optional[str] = None  # an image-space CLIP folder to start the LRM's text tower from
    # ---- bookkeeping
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = 3
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    logging_steps: int = 10
    validation_steps: int = 500  # sample grid every N steps (and at the end); 0: only at the end
    validation_prompts: list = field(default_factory=list)  # default: the data's first captions
    validation_lcm_steps: tuple = (1, 2, 4)
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    dataloader_num_workers: int = 0
    progress: bool = True
    # ---- speed and memory (none changes the math; benchmarks/results/train_step_<card>.md measures each)
    channels_last: bool = False  # CUDA: UNets and VAE in NHWC (eager: slower, torch's CUDA GroupNorm is NCHW-only)
    # torch.compile: "frozen" the teacher and EMA target UNets and the VAE encoder (forward only);
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
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: expected one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.compile_unets not in COMPILE_UNETS:
            raise ValueError(f"compile_unets: expected one of {', '.join(COMPILE_UNETS)}, got {self.compile_unets!r}")
        if self.compile_memory_budget is not None and not 0.0 < self.compile_memory_budget <= 1.0:
            raise ValueError(f"compile_memory_budget: expected a value in (0, 1], got {self.compile_memory_budget}")
        if self.loss_type not in ("huber", "l2"):
            raise ValueError(f"loss_type: expected 'huber' or 'l2', got {self.loss_type!r}")
        if self.lrm_loss not in ("kl", "ce"):
            raise ValueError(f"lrm_loss: expected 'kl' or 'ce', got {self.lrm_loss!r}")
        if self.smooth_gt_label and self.lrm_loss != "kl":
            raise ValueError("smooth_gt_label: applies to lrm_loss 'kl' only (ce labels real-holding pairs itself)")
        if not self.w_min <= self.w_max:
            raise ValueError(f"w_min: must be <= w_max ({self.w_max}), got {self.w_min}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay: expected a value in [0, 1], got {self.ema_decay}")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "lrm_batch_size",
                     "checkpointing_steps", "logging_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        self.lrm_widths = tuple(self.lrm_widths)
        self.validation_lcm_steps = tuple(self.validation_lcm_steps)
        if self.learning_rate is None:
            self.learning_rate = 1e-4 if self.use_lora else 1e-6
        if self.lrm_learning_rate is None:
            self.lrm_learning_rate = 3.3e-6 if self.lrm_path else 1e-5
        if self.lrm_frozen and not self.lrm_path:
            raise ValueError("lrm_frozen: a frozen LRM must be a pre-trained one (set lrm_path)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=list)


# The digits world (DESIGN.md §4): 8×8 latents, the shipped pre-trained LRM fine-tuned online at the official
# rate and reward scale (3.3e-6, 1.0; lrm_widths/lrm_embed_dim size an LRM from random weights), a run of a
# few minutes on two CPU cores.
DIGITS_PRESET = dict(
    time_cond_proj_dim=32, max_train_steps=300, train_batch_size=32, learning_rate=1e-4, lr_warmup_steps=20,
    lrm_path="digits", lrm_batch_size=32, lrm_widths=(32, 64), lrm_embed_dim=64, reward_scale=1.0,
    checkpointing_steps=100, logging_steps=10, validation_steps=100, output_dir="rglcd-digits")


@dataclass
class LRMPretrainConfig:
    """`rglcd-fast pretrain-lrm`: the latent reward model pre-trained offline as a latent CLIP (DESIGN.md §1
    step 9) on image-caption data encoded by the teacher's VAE, optionally distilling the expert's
    preferences between real latents and the teacher's one-step predictions."""
    # ---- models and data (as the trainer's)
    teacher: str = "digits"
    data: Optional[str] = None
    resolution: Optional[int] = None
    output_dir: str = "rglcd-lrm"
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
    adam_weight_decay: float = 0.1
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
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
    logging_steps: int = 50
    dataloader_num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.image_tower not in ("conv", "vit"):
            raise ValueError(f"image_tower: expected 'conv' or 'vit', got {self.image_tower!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision: expected one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        for name in ("max_train_steps", "train_batch_size", "checkpointing_steps", "logging_steps", "distill_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight: expected a value >= 0, got {self.distill_weight}")
        self.lrm_widths = tuple(self.lrm_widths)

    to_dict = TrainConfig.to_dict
    save = TrainConfig.save


# The digits world's LRM (rglcd_fast/world/weights/lrm, rebuilt by `rglcd-fast make-world`).
DIGITS_LRM_PRESET = dict(lrm_widths=(32, 64), lrm_embed_dim=64, vit_patch_size=2, vit_width=64, vit_layers=4,
                         vit_heads=4, max_train_steps=1500, train_batch_size=64, learning_rate=1e-3,
                         lr_warmup_steps=50, checkpointing_steps=500, logging_steps=50, output_dir="rglcd-digits-lrm")
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


def add_arguments(parser: argparse.ArgumentParser, config_class=TrainConfig) -> None:
    """--config FILE plus one --flag per field of config_class (absent from the namespace unless given;
    "none" sets an optional field to None)."""
    parser.add_argument("--config", default=None, help="a YAML or JSON file of settings")
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = str(f.type)
        wrap = _parse_optional if "Optional" in text else (lambda kind: kind)
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=argparse.SUPPRESS, metavar="BOOL", help=f"default {default}")
        elif isinstance(default, (list, tuple)):
            item = type(default[0]) if default else str
            parser.add_argument(flag, type=item, nargs="+", default=argparse.SUPPRESS, help=f"default {list(default)}")
        else:
            kind = int if "int" in text else float if "float" in text else str
            parser.add_argument(flag, type=wrap(kind), default=argparse.SUPPRESS, help=f"default {default}")


def config_from_args(args: argparse.Namespace, config_class=TrainConfig):
    names = {f.name for f in dataclasses.fields(config_class)}
    return make_config(args.config, config_class, **{k: v for k, v in vars(args).items() if k in names})
