"""The models of an RG-LCD run: the teacher's components from a diffusers Stable Diffusion folder, the
student made from the teacher (full with a guidance embedding, or LoRA), the expert reward model and the
latent proxy reward model (LRM), and the reward guidance that ties the last two to the step (docs/design.md
§1 steps 8-9)."""

import copy
import json
import os
from dataclasses import dataclass

import torch

from ..files import check_pipeline_folder, is_sdxl_folder
from ..prompts import encode_sd, encode_sdxl, token_ids
from ..reward import LatentRewardModel, RewardModel
from ..reward.open_clip_lrm import check_checkpoint_file, lrm_from_open_clip, read_open_clip_checkpoint

# The LoRA targets of diffusers' train_lcm_distill_lora_sd.py.
LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]


def resolve_teacher(teacher: str) -> str:
    """A diffusers folder path; "digits" is the embedded digits world's teacher."""
    if teacher == "digits":
        from ..world.teacher import TEACHER_DIR

        if not os.path.isdir(TEACHER_DIR):
            raise FileNotFoundError(
                f"teacher: the digits world's teacher is missing from {TEACHER_DIR}; "
                "rebuild it with `rglcd-fast make-world`"
            )
        return TEACHER_DIR
    check_pipeline_folder(teacher, "teacher")
    if is_sdxl_folder(teacher):
        missing = [p for p in ("text_encoder_2", "tokenizer_2") if not os.path.isdir(os.path.join(teacher, p))]
        if missing:
            raise ValueError(
                f"teacher: {teacher!r} is a Stable Diffusion XL folder (model_index.json) without "
                f"{', '.join(missing)}: SDXL encodes prompts with both text encoders"
            )
    return teacher


@dataclass
class Teacher:
    folder: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler: the training noise schedule
    text_encoder_2: torch.nn.Module | None = None  # SDXL: the second encoder (with projection) and tokenizer
    tokenizer_2: object = None
    vae_folder: str | None = None  # the VAE's own folder when it is not the teacher's (config.vae)

    @classmethod
    def from_pretrained(cls, teacher: str, device, dtype, vae: str | None = None) -> "Teacher":
        """Frozen, eval-mode components in ``dtype`` on ``device``. vae: another VAE's folder (run in ``dtype``);
        without one an SDXL teacher's VAE runs in float32, as the SDXL scripts keep it (it overflows in float16)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = resolve_teacher(teacher)
        sdxl = is_sdxl_folder(folder)
        parts = dict(
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(
                vae or folder,
                subfolder=None if vae else "vae",
                torch_dtype=torch.float32 if sdxl and not vae else dtype,
            ),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
        )
        tokenizers = dict(tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))
        if sdxl:
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=dtype
            )
            tokenizers["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
        for module in parts.values():
            module.requires_grad_(False).eval().to(device)
        return cls(
            folder=folder,
            noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
            vae_folder=vae,
            **parts,
            **tokenizers,
        )

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        size = self.unet.config.sample_size
        return (size[0] if isinstance(size, (list, tuple)) else size) * self.vae_scale_factor

    def lcm_scheduler(self, scheduler_class=None):
        """An LCMScheduler (or scheduler_class) on the teacher's schedule, as scheduler_class.from_config makes it
        (the settings the teacher's file left out take the class's own defaults), but holding that class's own
        settings only: from_config keeps the others (a DDPM config's variance_type, PNDM's skip_prk_steps) in its
        config, and every load of a saved copy then warns that they are ignored."""
        import inspect

        from diffusers import LCMScheduler

        scheduler_class = scheduler_class or LCMScheduler
        config = self.noise_scheduler.config
        accepted = set(inspect.signature(scheduler_class.__init__).parameters) - set(
            config.get("_use_default_values", ())
        )
        return scheduler_class(**{k: v for k, v in config.items() if k in accepted})

    def encode_prompts(self, prompts) -> torch.Tensor:
        """SD: the text encoder's last hidden states [B, L, D]."""
        return encode_sd(self.text_encoder, token_ids(self.tokenizer, prompts, self.text_encoder.device))

    def encode_prompts_sdxl(self, prompts) -> tuple:
        """SDXL: both encoders' penultimate hidden states side by side and the pooled projection
        (rglcd_fast.prompts.encode_sdxl)."""
        ids = token_ids(self.tokenizer, prompts, self.text_encoder.device)
        ids_2 = token_ids(self.tokenizer_2, prompts, self.text_encoder_2.device)
        return encode_sdxl(self.text_encoder, self.text_encoder_2, ids, ids_2)

    def unet_conditions(self, prompts, time_ids: torch.Tensor | None = None) -> tuple:
        """The prompts' conditioning of a UNet call: (encoder_hidden_states, the call's other keyword arguments).
        SDXL: the added conditions {"text_embeds": the pooled projection, "time_ids": time_ids} ([B, 6] size /
        crop ids, rglcd_fast.train.data.sdxl_time_ids); SD: none (time_ids unused)."""
        if not self.is_sdxl:
            return self.encode_prompts(prompts), {}
        embeds, pooled = self.encode_prompts_sdxl(prompts)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.device, embeds.dtype)}
        return embeds, {"added_cond_kwargs": added}

    @torch.no_grad()
    def encode_images(self, pixel_values, generator=None) -> torch.Tensor:
        """docs/design.md §1 step 1: x0 = a draw of the VAE posterior × scaling_factor, float32."""
        vae = self.vae
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * vae.config.scaling_factor

    def unet_state_float32(self) -> dict:
        """The UNet's weights in float32: read again from the folder when the UNet runs in lower precision
        (the student's float32 master weights must not start from bf16/fp16-rounded ones). A teacher built in
        memory (no folder) has no other copy: its weights, upcast."""
        if self.unet.dtype == torch.float32:
            return self.unet.state_dict()
        if not self.folder:
            return {k: v.float() for k, v in self.unet.state_dict().items()}
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(self.folder, subfolder="unet", torch_dtype=torch.float32)
        return unet.state_dict()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] (differentiable; the reward models' input)."""
        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def make_student(teacher_unet, time_cond_proj_dim: int, state_dict: dict | None = None):
    """The full student, float32, from state_dict (default: the teacher UNet's own weights; pass
    Teacher.unet_state_float32() when the teacher runs in lower precision): the teacher's UNet with a guidance
    embedding of size time_cond_proj_dim (its projection zero, so the student starts as the teacher)."""
    from diffusers import UNet2DConditionModel

    state_dict = teacher_unet.state_dict() if state_dict is None else state_dict
    if teacher_unet.config.time_cond_proj_dim:  # distilling from a model that has one
        student = copy.deepcopy(teacher_unet).float()
        student.load_state_dict(state_dict)
        return student.requires_grad_(True).train()
    with torch.device(teacher_unet.device):  # built where the teacher lives: no host-side init of the weights
        student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(state_dict, strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise ValueError(f"teacher: UNet weights do not fit the student (missing {missing}, unexpected {unexpected})")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher_unet.device).float().train()


def add_lora(teacher_unet, lora_rank: int = 64, lora_alpha: int = 64):
    """The LoRA student (LCM-LoRA: no guidance embedding, its own target), as diffusers' LCD-LoRA scripts make
    it: LoRA adapters (peft) on LORA_TARGET_MODULES of the teacher's own UNet, whose weights stay frozen in
    their dtype, the adapters trained in float32 (cast_training_params). One UNet in memory: the teacher's
    passes run it with the adapters off (WithoutAdapters)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    teacher_unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGET_MODULES))
    cast_training_params(teacher_unet, dtype=torch.float32)
    return teacher_unet.train()


class WithoutAdapters:
    """The teacher of a LoRA run: the student's UNet called with its LoRA adapters disabled."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        from accelerate.utils import extract_model_from_parallel

        unet = extract_model_from_parallel(self.unet)
        unet.disable_adapters()
        try:
            return unet(*args, **kwargs)
        finally:
            unet.enable_adapters()


def make_lrm(
    teacher: Teacher, widths, embed_dim: int, init_clip=None, expert=None, image_tower="conv", vit_config=None
) -> LatentRewardModel:
    """A fresh LRM (random latent image tower, "conv" or "vit") in float32 on the teacher's device. Its text
    tower (with the projection when the shapes allow) starts from, in order: the CLIP folder init_clip; the
    expert's CLIP model when it has one (the CLIP-family adapters); the teacher's text encoder (with its
    tokenizer)."""
    channels = teacher.vae.config.latent_channels
    tower = dict(
        latent_channels=channels,
        widths=widths,
        groups=min(32, widths[0]),
        image_tower=image_tower,
        vit_config=vit_config if image_tower == "vit" else None,
    )
    clip = getattr(expert, "model", None)
    if init_clip:
        lrm = LatentRewardModel.from_clip(init_clip, **tower)
    elif clip is not None and type(clip).__name__ == "CLIPModel":
        lrm = LatentRewardModel.from_clip(clip, tokenizer=getattr(expert, "tokenizer", None), **tower)
    else:
        lrm = LatentRewardModel(
            teacher.text_encoder.config.to_dict(), embed_dim=embed_dim, tokenizer=teacher.tokenizer, **tower
        )
        lrm.text_model.load_state_dict(teacher.text_encoder.state_dict())
    return lrm.float().to(teacher.unet.device)


def _read_json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def lrm_location(path: str) -> str:
    """lrm_path checked to be an LRM: a folder of ours ("digits": the digits world's) or an official open_clip
    latent CLIP file (read by load_lrm)."""
    if path == "digits":
        from ..world.lrm import LRM_DIR

        path = LRM_DIR
    if os.path.isfile(path):
        check_checkpoint_file(path)
    elif not os.path.isfile(os.path.join(path, "lrm_config.json")):
        raise FileNotFoundError(
            f"lrm_path: no LRM folder (lrm_config.json) or official latent CLIP file at {path} (make one with "
            "`rglcd-fast pretrain-lrm`)"
        )
    return path


def check_settings(config, teacher: Teacher | None = None, expert_given: bool = False) -> None:
    """What can be checked from the config and the folders' JSON files before any model is built, each with
    one line naming the setting: no earlier run's checkpoints beside a fresh one, the resolution against the
    teacher's VAE and UNet, the expert's path, the LRM folder. teacher: one already in memory (its configs are
    read instead of its folder's)."""
    from ..reward.experts import check_reward_model_path
    from .checkpoint import check_fresh_start

    check_fresh_start(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    if teacher is None:
        folder = resolve_teacher(config.teacher)
        unet, vae = _read_json(folder, "unet/config.json"), _read_json(folder, "vae/config.json")
    else:
        unet, vae = teacher.unet.config, teacher.vae.config
    if config.vae is not None:
        if not os.path.isfile(os.path.join(config.vae, "config.json")):
            raise FileNotFoundError(f"vae: no diffusers AutoencoderKL folder (config.json) at {config.vae!r}")
        vae = _read_json(config.vae, "config.json")
        if vae.get("latent_channels") != unet["in_channels"]:
            raise ValueError(
                f"vae: {config.vae!r} makes {vae.get('latent_channels')}-channel latents, the teacher's UNet "
                f"reads {unet['in_channels']}"
            )
    # the VAE downsamples 2^(blocks-1) times, the UNet's down blocks 2^(blocks-1) times more
    factor = 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["down_block_types"]) - 1)
    if config.resolution is not None and (config.resolution < factor or config.resolution % factor):
        nearest = max(factor, round(config.resolution / factor) * factor)
        raise ValueError(
            f"resolution: {config.resolution} px does not pass the teacher's VAE and UNet (a multiple "
            f"of {factor} does, e.g. {nearest})"
        )
    if config.reward_mode != "none" and not expert_given:
        check_reward_model_path(config.reward_model, config.reward_model_path)
    if config.reward_mode == "lrm" and config.lrm_path:
        lrm_location(config.lrm_path)


def load_lrm(path: str, teacher: Teacher, device=None) -> LatentRewardModel:
    """A pre-trained LRM, float32, checked against the teacher: the latent channels of its image tower and a
    tokenizer for its text tower (it reads the prompts itself). path: a folder of ours ("digits": the digits
    world's), or the official code's --pretrained_latent_rm file (an open_clip latent_ViT checkpoint; its text
    tower reads the teacher's tokens, CLIP's BPE as open_clip's tokenizer)."""
    path = lrm_location(path)
    if os.path.isfile(path):
        lrm = lrm_from_open_clip(read_open_clip_checkpoint(path), teacher.tokenizer).to(device)
    else:
        lrm = LatentRewardModel.from_pretrained(path, device=device).float()
    channels = teacher.vae.config.latent_channels
    if lrm.config["latent_channels"] != channels:
        raise ValueError(
            f"lrm_path: the LRM in {path} reads {lrm.config['latent_channels']}-channel latents, the "
            f"teacher's VAE makes {channels}"
        )
    if lrm.tokenizer is None:
        raise ValueError(
            f"lrm_path: the LRM in {path} has no tokenizer (save one with it: the LRM reads the prompts "
            "with its own text tower)"
        )
    if len(lrm.tokenizer) > lrm.text_config.vocab_size:
        raise ValueError(
            f"lrm_path: the LRM's tokenizer in {path} has {len(lrm.tokenizer)} tokens, its text tower "
            f"{lrm.text_config.vocab_size}"
        )
    return lrm


class RewardGuidance:
    """The reward of the student's one-step prediction (step 8) and the LRM update (step 9).

    The student's reward is scale-free, as the official RG-LCD code (its ``return_logits=False``): mode
    "direct": reward = expert.reward(decode(model_pred), prompts), differentiable through the VAE decoder;
    "lrm": reward = the LRM's cosine of model_pred / scaling_factor and the prompt, differentiable in the
    latents only (the LRM's weights are read detached, so the student's loss never trains the LRM). The LRM
    update compares logits (× exp(logit scale)).

    lrm_loss "kl" or "ce"; with "ce", ce_real_wins labels every pair holding the real candidate "real wins"
    (the official rule); smooth_gt_label (KL) makes a pair's target uniform where the expert prefers the
    generated candidate over the real one. score_real_pixels: the expert scores the real candidate on the
    batch's images instead of on the decode of its latents (one VAE decode fewer; the label then describes
    the images, not what the LRM reads)."""

    REAL_INDEX = 2  # candidates: (student prediction, target, real)

    def __init__(
        self,
        mode: str,
        teacher: Teacher,
        expert: RewardModel,
        lrm: LatentRewardModel | None = None,
        lrm_optimizer=None,
        lrm_loss: str = "kl",
        rm_loss_scale: float = 1.0,
        lrm_batch_size: int = 16,
        reduce_gradients=None,
        decode_batch_size: int | None = None,
        ce_real_wins: bool = True,
        smooth_gt_label: bool = False,
        score_real_pixels: bool = False,
    ):
        if mode not in ("direct", "lrm"):
            raise ValueError(f"mode: expected 'direct' or 'lrm', got {mode!r}")
        if decode_batch_size is not None and decode_batch_size < 1:
            raise ValueError(f"vae_decode_batch_size: expected a positive integer or None, got {decode_batch_size}")
        if mode == "lrm" and lrm is None:
            raise ValueError("lrm: mode 'lrm' needs the latent reward model (and its optimiser unless frozen)")
        self.mode, self.teacher, self.expert, self.lrm = mode, teacher, expert, lrm
        self.lrm_optimizer, self.lrm_loss, self.rm_loss_scale = lrm_optimizer, lrm_loss, rm_loss_scale
        self.lrm_batch_size = lrm_batch_size
        # samples per VAE decode call in update_lrm (None: lrm_batch_size, one candidate a call)
        self.decode_batch_size = decode_batch_size
        self.reduce_gradients = reduce_gradients  # averages the LRM's gradients over ranks (None: one rank)
        self.real_index = self.REAL_INDEX if (lrm_loss == "ce" and ce_real_wins) or smooth_gt_label else None
        self.smooth_gt_label = smooth_gt_label
        self.score_real_pixels = score_real_pixels

    def reward(self, model_pred: torch.Tensor, prompts) -> torch.Tensor:
        """[B] float32 rewards to maximise."""
        if self.mode == "direct":
            return self.expert.reward(self.teacher.decode(model_pred), prompts).float()
        weights = {name: p.detach() for name, p in self.lrm.named_parameters()}
        latents = model_pred / self.teacher.vae.config.scaling_factor
        return torch.func.functional_call(self.lrm, weights, (latents, list(prompts)))

    @torch.no_grad()
    def expert_reward(self, model_pred, prompts) -> torch.Tensor:
        """The expert's mean reward of the first lrm_batch_size one-step predictions (for the logs of a frozen
        LRM, which has no update to score them)."""
        n = self.lrm_batch_size
        return self.expert.reward(self.teacher.decode(model_pred[:n].float()), list(prompts)[:n]).float().mean()

    def update_lrm(self, model_pred, target, latents, prompts, images=None):
        """One LRM optimiser step (a fused AdamW: its found_inf flag skips a non-finite step) on the
        pairwise preference loss over {student prediction, target, real} of the first lrm_batch_size
        samples (docs/design.md §1 step 9); returns (loss, accuracy, expert reward of the student's predictions),
        detached.

        Every candidate is decoded with the VAE, the real one too: the LRM reads latents, so its label comes
        from what those latents decode to. images: the batch's pixel values ([B, 3, H, W] in [-1, 1]), used
        for the real candidate only with score_real_pixels. The candidates go through the VAE in calls of
        decode_batch_size samples (default n: one candidate a call; at 768 px one call of 2n was no faster
        and took 7.8 GiB more), and the expert scores all 3·n images in one call (the prompts repeated)."""
        n = min(self.lrm_batch_size, len(model_pred))  # the official randperm(B)[:rm_batch_size]
        scale = self.teacher.vae.config.scaling_factor
        candidates = [c[:n].detach().float() for c in (model_pred, target, latents)]
        prompts = list(prompts)[:n]
        real_pixels = self.score_real_pixels and images is not None
        with torch.no_grad():
            to_decode = torch.cat(candidates[:2] if real_pixels else candidates)
            pixels = [self.teacher.decode(part) for part in to_decode.split(self.decode_batch_size or n)]
            if real_pixels:
                pixels.append((images[:n].to(device=to_decode.device, dtype=torch.float32) / 2 + 0.5).clamp(0, 1))
            k = len(candidates)
            rewards, expert_logits = self.expert.reward_and_logits(torch.cat(pixels), prompts * k)
            expert_logits = expert_logits.float().view(k, -1)
            if self.expert.logits_use_lrm_scale:  # the official ImageReward target: × the LRM's exp(logit_scale)
                expert_logits = expert_logits * self.lrm.logit_scale.detach().float().exp()
        loss, accuracy = self.lrm.preference_loss(
            [c / scale for c in candidates],
            prompts,
            expert_logits,
            self.lrm_loss,
            self.real_index,
            self.smooth_gt_label,
        )
        self.lrm_optimizer.zero_grad(set_to_none=True)
        (loss * self.rm_loss_scale).backward()
        grads = [p.grad for p in self.lrm.parameters() if p.grad is not None]
        if self.reduce_gradients is not None:
            self.reduce_gradients(grads)
        # a non-finite gradient (on any rank: they are averaged) skips the fused update on the device
        self.lrm_optimizer.found_inf = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())).float()
        self.lrm_optimizer.step()
        return loss.detach(), accuracy.detach(), rewards.float().view(k, -1)[0].mean()
