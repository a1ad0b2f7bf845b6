"""The helpers of diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py, written
out as the script has them, and its training step (lcd_step): the oracle for rglcd_fast.lcd's drop-ins, the
fused solver step and DistillationStep, and the benchmarks' reference step."""

import contextlib

import numpy as np
import torch


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    scaled_timestep = timestep_scaling * timestep
    c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
    c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def get_predicted_original_sample(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        pred_x_0 = (sample - sigmas * model_output) / alphas
    elif prediction_type == "sample":
        pred_x_0 = model_output
    elif prediction_type == "v_prediction":
        pred_x_0 = alphas * sample - sigmas * model_output
    else:
        raise ValueError(f"Prediction type {prediction_type} is not supported")
    return pred_x_0


def get_predicted_noise(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_epsilon = (sample - alphas * model_output) / sigmas
    elif prediction_type == "v_prediction":
        pred_epsilon = alphas * model_output + sigmas * sample
    else:
        raise ValueError(f"Prediction type {prediction_type} is not supported")
    return pred_epsilon


def guidance_scale_embedding(w, embedding_dim=512, dtype=torch.float32):
    assert len(w.shape) == 1
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:  # zero pad
        emb = torch.nn.functional.pad(emb, (0, 1))
    assert emb.shape == (w.shape[0], embedding_dim)
    return emb


class DDIMSolver:
    def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=50):
        step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
        self.ddim_alpha_cumprods = alpha_cumprods[self.ddim_timesteps]
        self.ddim_alpha_cumprods_prev = np.asarray(
            [alpha_cumprods[0]] + alpha_cumprods[self.ddim_timesteps[:-1]].tolist()
        )
        self.ddim_timesteps = torch.from_numpy(self.ddim_timesteps).long()
        self.ddim_alpha_cumprods = torch.from_numpy(self.ddim_alpha_cumprods)
        self.ddim_alpha_cumprods_prev = torch.from_numpy(self.ddim_alpha_cumprods_prev)

    def to(self, device):
        self.ddim_timesteps = self.ddim_timesteps.to(device)
        self.ddim_alpha_cumprods = self.ddim_alpha_cumprods.to(device)
        self.ddim_alpha_cumprods_prev = self.ddim_alpha_cumprods_prev.to(device)
        return self

    def ddim_step(self, pred_x0, pred_noise, timestep_index):
        alpha_cumprod_prev = extract_into_tensor(self.ddim_alpha_cumprods_prev, timestep_index, pred_x0.shape)
        dir_xt = (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
        x_prev = alpha_cumprod_prev.sqrt() * pred_x0 + dir_xt
        return x_prev


def lcd_step(
    student,
    teacher,
    target_unet,
    latents,
    embeds,
    uncond,
    scheduler,
    solver,
    config,
    generator=None,
    reward_fn=None,
    added=None,
    weight_dtype=None,
    teacher_autocast=contextlib.nullcontext,
    target_autocast=contextlib.nullcontext,
    mark=None,
):
    """Steps 2-10 of train_lcm_distill_sd_wds.py's loop as the script writes them (docs/design.md §1 steps 2-8):
    draws, student, the teacher's two passes with CFG on x0 and ε and the DDIM step, target, Huber loss; plus
    the reward term (reward_scale · -reward_fn(model_pred).mean()) when reward_fn is given. config: a
    DistillationConfig (w range, Huber c, timestep scaling, reward scale); solver: a DDIMSolver on the latents'
    device. added: SDXL's conditions of the prompts ({"text_embeds", "time_ids"}), as
    train_lcm_distill_sdxl_wds.py passes them (the unconditional branch with zero pooled embeddings, the same
    ids). weight_dtype and the autocasts: the script's mixed precision (the teacher's inputs cast to
    weight_dtype). generator: index, w and noise drawn from it in that order (DistillationStep.draw's order);
    None: the script's own draws from the global RNGs (index and noise on the device, w on the host).
    mark(phase) is called as each phase starts. Returns (loss, model_pred, target)."""
    mark = mark or (lambda phase: None)
    work = torch.promote_types(latents.dtype, torch.float32)  # the script's .float(); float64 in exact runs
    cond_kwargs, uncond_kwargs = {}, {}
    if added is not None:
        cond_kwargs = {"added_cond_kwargs": added}
        uncond_kwargs = {"added_cond_kwargs": dict(added, text_embeds=torch.zeros_like(added["text_embeds"]))}
    to_teacher = (lambda x: x) if weight_dtype is None else (lambda x: x.to(weight_dtype))
    ac = scheduler.alphas_cumprod.to(latents.device)
    schedules = (scheduler.config.prediction_type, torch.sqrt(ac), torch.sqrt(1 - ac))
    num_ddim = len(solver.ddim_timesteps)
    topk = scheduler.config.num_train_timesteps // num_ddim
    bsz = latents.shape[0]
    w_range = config.w_max - config.w_min
    if generator is None:
        index = torch.randint(0, num_ddim, (bsz,), device=latents.device).long()
    else:
        index = torch.randint(0, num_ddim, (bsz,), generator=generator, device=generator.device).to(latents.device)
    start_timesteps = solver.ddim_timesteps[index]
    timesteps = start_timesteps - topk
    timesteps = torch.where(timesteps < 0, torch.zeros_like(timesteps), timesteps)
    c_skip_start, c_out_start = (
        c.reshape(-1, 1, 1, 1)
        for c in scalings_for_boundary_conditions(start_timesteps, timestep_scaling=config.timestep_scaling)
    )
    c_skip, c_out = (
        c.reshape(-1, 1, 1, 1)
        for c in scalings_for_boundary_conditions(timesteps, timestep_scaling=config.timestep_scaling)
    )
    if generator is None:
        noise = torch.randn_like(latents)
        w = w_range * torch.rand((bsz,)) + config.w_min
    else:
        w = (w_range * torch.rand((bsz,), generator=generator, device=generator.device) + config.w_min).cpu()
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        noise = noise.to(latents.device, latents.dtype)
    noisy = scheduler.add_noise(latents, noise, start_timesteps)
    embedding_dim = getattr(student, "module", student).config.time_cond_proj_dim
    w_embedding = (  # an LCM-LoRA student (the LoRA scripts) has no w embedding
        None
        if not embedding_dim
        else guidance_scale_embedding(w, embedding_dim=embedding_dim).to(latents.device, latents.dtype)
    )
    w = w.reshape(bsz, 1, 1, 1).to(latents.device, latents.dtype)
    mark("student fwd")
    noise_pred = student(
        noisy, start_timesteps, timestep_cond=w_embedding, encoder_hidden_states=embeds.to(work), **cond_kwargs
    ).sample
    pred_x_0 = get_predicted_original_sample(noise_pred, start_timesteps, noisy, *schedules)
    model_pred = c_skip_start * noisy + c_out_start * pred_x_0
    mark("teacher cond + uncond (+ CFG, DDIM step)")
    with torch.no_grad(), teacher_autocast():
        cond_out = teacher(
            to_teacher(noisy), start_timesteps, encoder_hidden_states=to_teacher(embeds), **cond_kwargs
        ).sample
        cond_x0 = get_predicted_original_sample(cond_out, start_timesteps, noisy, *schedules)
        cond_eps = get_predicted_noise(cond_out, start_timesteps, noisy, *schedules)
        uncond_out = teacher(
            to_teacher(noisy), start_timesteps, encoder_hidden_states=to_teacher(uncond), **uncond_kwargs
        ).sample
        uncond_x0 = get_predicted_original_sample(uncond_out, start_timesteps, noisy, *schedules)
        uncond_eps = get_predicted_noise(uncond_out, start_timesteps, noisy, *schedules)
        pred_x0 = cond_x0 + w * (cond_x0 - uncond_x0)
        pred_noise = cond_eps + w * (cond_eps - uncond_eps)
        x_prev = solver.ddim_step(pred_x0, pred_noise, index)
    mark("target (+ consistency output)")
    with torch.no_grad():
        with target_autocast():
            target_pred = target_unet(
                x_prev.to(work),
                timesteps,
                timestep_cond=w_embedding,
                encoder_hidden_states=embeds.to(work),
                **cond_kwargs,
            ).sample
        target_x0 = get_predicted_original_sample(target_pred, timesteps, x_prev, *schedules)
        target = c_skip * x_prev + c_out * target_x0
    mark("loss (+ reward fwd, when on)")
    huber_c = config.huber_c
    loss = torch.mean(torch.sqrt((model_pred.to(work) - target.to(work)) ** 2 + huber_c**2) - huber_c)
    if reward_fn is not None:
        loss = loss + config.reward_scale * -reward_fn(model_pred).mean()
    return loss, model_pred, target
