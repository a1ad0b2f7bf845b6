"""The models of an RG-LCD run: the teacher's components from a diffusers Stable Diffusion folder, the
student made from the teacher (full with a guidance embedding, or LoRA), the expert reward model and the
latent proxy reward model (LRM), and the reward guidance that ties the last two to the step (DESIGN.md
§1 steps 8-9)."""
import copy
import os
from dataclasses import dataclass

import torch

from ..reward import LatentRewardModel, RewardModel
from ..sample.sampler import check_pipeline_folder

# The LoRA targets of diffusers' train_lcm_distill_lora_sd.py.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                       "time_emb_proj"]


def resolve_teacher(teacher: str) -> str:
    """A diffusers folder path; "digits" is the embedded digits world's teacher."""
    if teacher == "digits":
        from ..world.teacher import TEACHER_DIR
        if not os.path.isdir(TEACHER_DIR):
            raise FileNotFoundError(f"teacher: the digits world's teacher is missing from {TEACHER_DIR}; "
                                    "rebuild it with `rglcd-fast make-world`")
        return TEACHER_DIR
    check_pipeline_folder(teacher, "teacher")
    return teacher


@dataclass
class Teacher:
    folder: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler: the training noise schedule

    @classmethod
    def from_pretrained(cls, teacher: str, device, dtype) -> "Teacher":
        """Frozen, eval-mode components in ``dtype`` on ``device``."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = resolve_teacher(teacher)
        parts = dict(
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype))
        for module in parts.values():
            module.requires_grad_(False).eval().to(device)
        return cls(folder=folder, tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                   noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"), **parts)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        size = self.unet.config.sample_size
        return (size[0] if isinstance(size, (list, tuple)) else size) * self.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, pixel_values, generator=None) -> torch.Tensor:
        """DESIGN.md §1 step 1: x0 = a draw of the VAE posterior × scaling_factor, float32."""
        vae = self.vae
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] (differentiable; the reward models' input)."""
        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def make_student(teacher_unet, use_lora: bool, time_cond_proj_dim: int, lora_rank: int = 64, lora_alpha: int = 64):
    """Full: the teacher's UNet with a guidance embedding of size time_cond_proj_dim (its projection zero,
    so the student starts as the teacher), float32. LoRA: a float32 copy of the teacher with LoRA adapters
    on LORA_TARGET_MODULES (as LCM-LoRA: no guidance embedding)."""
    from diffusers import UNet2DConditionModel

    if use_lora:
        from peft import LoraConfig

        student = copy.deepcopy(teacher_unet).float()
        student.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGET_MODULES))
        return student.train()
    if teacher_unet.config.time_cond_proj_dim:  # distilling from a model that already has one
        return copy.deepcopy(teacher_unet).float().requires_grad_(True).train()
    with torch.device(teacher_unet.device):  # built where the teacher lives: no host-side init of the weights
        student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise ValueError(f"teacher: UNet weights do not fit the student (missing {missing}, unexpected {unexpected})")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher_unet.device).float().train()


def make_lrm(teacher: Teacher, widths, embed_dim: int, init_clip=None) -> LatentRewardModel:
    """The LRM: the text tower from an image-space CLIP folder when given, else a trainable copy of the
    teacher's text encoder (with its tokenizer); a fresh latent image tower. Float32."""
    channels = teacher.vae.config.latent_channels
    if init_clip:
        return LatentRewardModel.from_clip(init_clip, latent_channels=channels, widths=widths).float()
    lrm = LatentRewardModel(teacher.text_encoder.config.to_dict(), embed_dim=embed_dim, latent_channels=channels,
                            widths=widths, groups=min(32, widths[0]), tokenizer=teacher.tokenizer)
    lrm.text_model.load_state_dict(teacher.text_encoder.state_dict())
    return lrm.float().to(teacher.unet.device)


class RewardGuidance:
    """The reward of the student's one-step prediction (step 8) and the LRM update (step 9).

    mode "direct": reward = expert.score(decode(model_pred), prompts), differentiable through the VAE
    decoder; "lrm": reward = LRM logits of model_pred / scaling_factor, differentiable in the latents only
    (the LRM's weights are read detached, so the student's loss never trains the LRM)."""

    def __init__(self, mode: str, teacher: Teacher, expert: RewardModel, lrm: LatentRewardModel | None = None,
                 lrm_optimizer=None, lrm_loss: str = "kl", rm_loss_scale: float = 1.0, lrm_batch_size: int = 8,
                 reduce_gradients=None, decode_batch_size: int | None = None):
        if mode not in ("direct", "lrm"):
            raise ValueError(f"mode: expected 'direct' or 'lrm', got {mode!r}")
        if decode_batch_size is not None and decode_batch_size < 1:
            raise ValueError(f"vae_decode_batch_size: expected a positive integer or None, got {decode_batch_size}")
        if mode == "lrm" and (lrm is None or lrm_optimizer is None):
            raise ValueError("lrm: mode 'lrm' needs the latent reward model and its optimiser")
        self.mode, self.teacher, self.expert, self.lrm = mode, teacher, expert, lrm
        self.lrm_optimizer, self.lrm_loss, self.rm_loss_scale = lrm_optimizer, lrm_loss, rm_loss_scale
        self.lrm_batch_size = lrm_batch_size
        # samples per VAE decode call in update_lrm (None: lrm_batch_size, one candidate a call)
        self.decode_batch_size = decode_batch_size
        self.reduce_gradients = reduce_gradients  # averages the LRM's gradients over ranks (None: one rank)

    def reward(self, model_pred: torch.Tensor, prompts) -> torch.Tensor:
        """[B] float32 rewards to maximise."""
        if self.mode == "direct":
            return self.expert.score(self.teacher.decode(model_pred), prompts).float()
        weights = {name: p.detach() for name, p in self.lrm.named_parameters()}
        latents = model_pred / self.teacher.vae.config.scaling_factor
        return torch.func.functional_call(self.lrm, weights, (latents, list(prompts)))

    def update_lrm(self, model_pred, target, latents, prompts, images=None):
        """One LRM optimiser step (a fused AdamW: its found_inf flag skips a non-finite step) on the
        pairwise preference loss over {student prediction, target, real} of the first lrm_batch_size
        samples (DESIGN.md §1 step 9); returns (loss, accuracy), detached.

        images: the batch's pixel values ([B, 3, H, W] in [-1, 1], on the device), what `latents` encode.
        Given them, the expert scores the real candidate on the images themselves instead of on
        decode(latents) (a change from step 9 as DESIGN.md writes it: the real images rather than their
        VAE reconstruction, which differs by the VAE's error; it saves one of three VAE decodes). The LRM
        still reads the real candidate as latents / scaling_factor. Without images the real latents are
        decoded as before. The candidates to decode go through the VAE in calls of decode_batch_size
        samples (default n: one candidate a call; at 768 px one call of 2n was no faster and took 7.8 GiB
        more), and the expert scores all 3·n images in one call (the prompts repeated)."""
        n = self.lrm_batch_size
        scale = self.teacher.vae.config.scaling_factor
        candidates = [c[:n].detach().float() for c in (model_pred, target, latents)]
        prompts = list(prompts)[:n]
        with torch.no_grad():
            to_decode = torch.cat(candidates if images is None else candidates[:2])
            chunk = self.decode_batch_size or n
            pixels = [self.teacher.decode(part) for part in to_decode.split(chunk)]
            if images is not None:
                pixels.append((images[:n].to(device=to_decode.device, dtype=torch.float32) / 2 + 0.5).clamp(0, 1))
            k = len(candidates)
            expert_logits = self.expert.logits(torch.cat(pixels), prompts * k).float().view(k, -1)
        loss, accuracy = self.lrm.preference_loss([c / scale for c in candidates], prompts, expert_logits,
                                                  self.lrm_loss)
        self.lrm_optimizer.zero_grad(set_to_none=True)
        (loss * self.rm_loss_scale).backward()
        grads = [p.grad for p in self.lrm.parameters() if p.grad is not None]
        if self.reduce_gradients is not None:
            self.reduce_gradients(grads)
        # a non-finite gradient (on any rank: they are averaged) skips the fused update on the device
        self.lrm_optimizer.found_inf = (~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())).float()
        self.lrm_optimizer.step()
        return loss.detach(), accuracy.detach()
