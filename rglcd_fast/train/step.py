"""One RG-LCD training step's math (docs/design.md §1 steps 2-8), on the fused ops.

`DistillationStep` holds the schedule and the DDIM solver; calling it with the student, teacher and
target (EMA) UNets, a batch of latents and prompt embeddings returns the distillation loss, the
reward loss and the total, with model_pred (the student's one-step prediction) for the reward and the
latent reward model's update. The optimiser, EMA update and LRM update belong to the trainer.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from accelerate.utils import extract_model_from_parallel

from .. import ops
from ..lcd import DDIMSolver, guidance_scale_embedding


@dataclass
class DistillationConfig:
    num_ddim_timesteps: int = 50  # N
    w_min: float = 5.0
    w_max: float = 15.0
    loss_type: str = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    reward_scale: float = 1.0


@dataclass
class StepOutput:
    loss: torch.Tensor
    distill_loss: torch.Tensor
    reward_loss: torch.Tensor | None
    model_pred: torch.Tensor  # the student's consistency output f(m_s, x, t_start), differentiable
    target: torch.Tensor
    start_timesteps: torch.Tensor


@torch.no_grad()
def update_ema(target: torch.nn.Module, student: torch.nn.Module, decay: float = 0.95) -> None:
    """docs/design.md §1 step 8: target <- decay·target + (1 - decay)·student, over matching parameters, in
    one fused multi-tensor update (the target may hold a lower precision than the student)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
    target_params, student_params = list(target.parameters()), list(student.parameters())
    if len(target_params) != len(student_params):
        raise ValueError(f"target: {len(target_params)} parameters, but the student has {len(student_params)}")
    for a, b in zip(target_params, student_params):
        if a.shape != b.shape:
            raise ValueError(f"target: parameter shape {tuple(a.shape)} differs from the student's {tuple(b.shape)}")
    sources = [p.detach().to(dtype=t.dtype, device=t.device) for t, p in zip(target_params, student_params)]
    torch._foreach_lerp_(target_params, sources, 1.0 - decay)


class DistillationStep:
    def __init__(self, noise_scheduler, config: DistillationConfig | None = None, device="cpu"):
        self.noise_scheduler = noise_scheduler
        self.config = config = config if config is not None else DistillationConfig()
        self.prediction_type = noise_scheduler.config.prediction_type
        num_train_timesteps = noise_scheduler.config.num_train_timesteps
        if num_train_timesteps % config.num_ddim_timesteps:
            raise ValueError(
                f"num_ddim_timesteps: must divide num_train_timesteps ({num_train_timesteps}), "
                f"got {config.num_ddim_timesteps}"
            )
        self.topk = num_train_timesteps // config.num_ddim_timesteps
        # .cpu(): diffusers' add_noise leaves alphas_cumprod on the device it last ran on
        self.solver = DDIMSolver(
            noise_scheduler.alphas_cumprod.cpu().numpy(), num_train_timesteps, config.num_ddim_timesteps
        ).to(device)
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    def draw(self, latents: torch.Tensor, generator: torch.Generator | None = None):
        """docs/design.md §1 steps 2-3: DDIM index n, t_start, t = max(t_start - T/N, 0), w ~ U[w_min, w_max],
        noise, and the noisy latents. Drawn on the generator's device (the latents' without one): a CPU
        generator reproduces runs across devices, a CUDA one spares the host the noise and its copy."""
        bsz = latents.shape[0]
        draw_on = generator.device if generator is not None else latents.device
        index = torch.randint(0, self.config.num_ddim_timesteps, (bsz,), generator=generator, device=draw_on).to(
            latents.device
        )
        start_timesteps = self.solver.ddim_timesteps[index]
        timesteps = (start_timesteps - self.topk).clamp(min=0)
        w = (
            (self.config.w_max - self.config.w_min) * torch.rand(bsz, generator=generator, device=draw_on)
            + self.config.w_min
        ).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=draw_on)
        noise = noise.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, start_timesteps)
        return index, start_timesteps, timesteps, w, noisy

    def __call__(
        self,
        student,
        teacher,
        target_unet,
        latents,
        prompt_embeds,
        uncond_prompt_embeds,
        reward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        added_cond_kwargs: dict | None = None,
        uncond_added_cond_kwargs: dict | None = None,
    ) -> StepOutput:
        """student / teacher / target_unet: diffusers UNet2DConditionModel-like callables (student and
        target take the guidance embedding as timestep_cond). reward_fn maps model_pred (latents, in the
        VAE's scaled space) to per-sample rewards [B] to maximise (the direct RM through the VAE decoder,
        or the latent proxy RM); None trains plain LCD. added_cond_kwargs / uncond_added_cond_kwargs: SDXL's
        conditioning of the prompts and of the unconditional branch ({"text_embeds": pooled [B, D],
        "time_ids": [B, 6]}; the SDXL scripts' unconditional branch has zero embeddings and the same ids),
        given together or not at all."""
        if (added_cond_kwargs is None) != (uncond_added_cond_kwargs is None):
            missing = "uncond_added_cond_kwargs" if uncond_added_cond_kwargs is None else "added_cond_kwargs"
            raise ValueError(f"{missing}: required with the other (SDXL conditions both branches)")
        cond_extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        both_extra = (
            {}
            if added_cond_kwargs is None
            else {
                "added_cond_kwargs": {
                    k: torch.cat([added_cond_kwargs[k], uncond_added_cond_kwargs[k]]) for k in added_cond_kwargs
                }
            }
        )
        index, start_timesteps, timesteps, w, noisy = self.draw(latents, generator)
        # a LoRA student (LCM-LoRA) has no guidance embedding
        embedding_dim = extract_model_from_parallel(student).config.time_cond_proj_dim
        w_embedding = (
            None
            if not embedding_dim
            else guidance_scale_embedding(w, embedding_dim=embedding_dim).to(device=latents.device, dtype=latents.dtype)
        )

        # 5. and 6. come before 4. (the same math: neither depends on the student), so that the teacher's
        # transient activations (at batch 2B) never coexist with the student's saved ones
        with torch.no_grad():
            # 5. teacher: cond and uncond in one batched call, then the fused CFG + DDIM solver step
            both = teacher(
                torch.cat([noisy, noisy]),
                torch.cat([start_timesteps, start_timesteps]),
                encoder_hidden_states=torch.cat([prompt_embeds, uncond_prompt_embeds]),
                **both_extra,
            ).sample
            cond_output, uncond_output = both.to(latents.dtype).chunk(2)
            x_prev, _ = ops.guided_ddim_step(
                cond_output,
                uncond_output,
                noisy,
                start_timesteps,
                timesteps,
                w,
                self.alphas_cumprod,
                self.prediction_type,
            )
            # 6. target (EMA student) at (x_prev, t)
            target_output = target_unet(
                x_prev, timesteps, timestep_cond=w_embedding, encoder_hidden_states=prompt_embeds, **cond_extra
            ).sample.to(latents.dtype)
            target = ops.consistency_output(
                target_output,
                x_prev,
                timesteps,
                self.alphas_cumprod,
                self.prediction_type,
                self.config.timestep_scaling,
            )
        # 4. student (its output in the latents' dtype: under autocast the UNets answer in half precision)
        noise_pred = student(
            noisy, start_timesteps, timestep_cond=w_embedding, encoder_hidden_states=prompt_embeds, **cond_extra
        ).sample.to(latents.dtype)
        # 7. distillation loss, fused with the student's consistency output
        distill_loss, model_pred = ops.consistency_loss(
            noise_pred,
            noisy,
            start_timesteps,
            target,
            self.alphas_cumprod,
            self.prediction_type,
            self.config.loss_type,
            self.config.huber_c,
            self.config.timestep_scaling,
        )
        # 8. reward of the one-step prediction
        reward_loss = None
        loss = distill_loss
        if reward_fn is not None:
            reward_loss = -reward_fn(model_pred).mean()
            loss = distill_loss + self.config.reward_scale * reward_loss
        return StepOutput(loss, distill_loss, reward_loss, model_pred, target, start_timesteps)
