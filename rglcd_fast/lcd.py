"""Drop-ins for the helpers of diffusers' consistency-distillation script
(examples/consistency_distillation/train_lcm_distill_sd_wds.py): same names, signatures and results,
backed by the fused ops. Import them in place of the script's own definitions; then replace the
script's teacher-step and loss blocks with `DDIMSolver.guided_ddim_step` and `ops.consistency_loss`
(README: "Patching an LCD training script") to fuse whole blocks rather than single lines.
"""

import numpy as np
import torch

from . import ops


def extract_into_tensor(a, t, x_shape):
    """a[t] shaped [B, 1, ..., 1] to broadcast over a tensor of shape x_shape (the script's helper)."""
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    """LCM boundary scalings (c_skip, c_out) of a timestep tensor."""
    return ops.boundary_scalings(timestep, timestep_scaling, sigma_data)


def _script_arguments(model_output, sample, alphas):
    """The script multiplies by float32 [B, 1, 1, 1] slices of alphas = sqrt(ᾱ), so its results promote
    to float32; the ops take ᾱ itself."""
    dtype = torch.promote_types(model_output.dtype, alphas.dtype)
    return model_output.to(dtype), sample.to(dtype), alphas.square()


def get_predicted_original_sample(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    """x0 from a model output (docs/design.md §2 parameterisation), one fused pass."""
    if prediction_type == "sample":  # the script returns the model output itself
        return model_output
    m, x, alphas_cumprod = _script_arguments(model_output, sample, alphas)
    return ops.predicted_x0(m, x, timesteps, alphas_cumprod, prediction_type)


def get_predicted_noise(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    """ε from a model output (docs/design.md §2 parameterisation), one fused pass."""
    if prediction_type == "epsilon":  # the script returns the model output itself
        return model_output
    m, x, alphas_cumprod = _script_arguments(model_output, sample, alphas)
    return ops.predicted_eps(m, x, timesteps, alphas_cumprod, prediction_type)


def guidance_scale_embedding(w, embedding_dim=512, dtype=torch.float32):
    """Sinusoidal embedding of the guidance scale w (scaled by 1000), the student's timestep_cond."""
    if w.dim() != 1:
        raise ValueError(f"w: expected a 1-d tensor of guidance scales [B], got shape {tuple(w.shape)}")
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype, device=w.device) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:  # zero pad
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class DDIMSolver:
    """The script's DDIM solver (same constructor, tables, to() and ddim_step), plus the fused
    teacher step that replaces the script's CFG + solver block."""

    def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=50):
        alpha_cumprods = np.asarray(alpha_cumprods)
        step_ratio = timesteps // ddim_timesteps
        ddim_ts = (np.arange(1, ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
        self.ddim_timesteps = torch.from_numpy(ddim_ts).long()
        self.ddim_alpha_cumprods = torch.from_numpy(alpha_cumprods[ddim_ts])
        self.ddim_alpha_cumprods_prev = torch.from_numpy(
            np.asarray([alpha_cumprods[0]] + alpha_cumprods[ddim_ts[:-1]].tolist())
        )
        # For the fused step: the timestep whose ᾱ is ddim_alpha_cumprods_prev[n], and the schedule.
        self.ddim_timesteps_prev = torch.cat([torch.zeros(1, dtype=torch.long), self.ddim_timesteps[:-1]])
        self.alphas_cumprod = torch.from_numpy(alpha_cumprods).float()

    def to(self, device):
        for name in (
            "ddim_timesteps",
            "ddim_alpha_cumprods",
            "ddim_alpha_cumprods_prev",
            "ddim_timesteps_prev",
            "alphas_cumprod",
        ):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def ddim_step(self, pred_x0, pred_noise, timestep_index):
        alpha_cumprod_prev = extract_into_tensor(self.ddim_alpha_cumprods_prev, timestep_index, pred_x0.shape)
        dir_xt = (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
        return alpha_cumprod_prev.sqrt() * pred_x0 + dir_xt

    def guided_ddim_step(self, cond_output, uncond_output, sample, timestep_index, w, prediction_type="epsilon"):
        """The teacher's CFG + DDIM step from raw teacher outputs in one fused pass: returns
        (x_prev, pred_x0), i.e. the script's get_predicted_original_sample / get_predicted_noise on
        both outputs, the guidance lines and ddim_step (w: [B], not reshaped)."""
        return ops.guided_ddim_step(
            cond_output,
            uncond_output,
            sample,
            self.ddim_timesteps[timestep_index],
            self.ddim_timesteps_prev[timestep_index],
            w.reshape(-1),
            self.alphas_cumprod,
            prediction_type,
        )
