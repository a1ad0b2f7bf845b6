"""Schedule look-ups shared by the references, written as the public LCD script writes them."""

import torch


def check_timesteps(
    timesteps: torch.Tensor, num_train_timesteps: int, name: str = "timesteps", allow_negative: bool = False
) -> None:
    """ValueError naming the argument for a value outside [0, T) (CPU only: never syncs a GPU); inside a
    compiled graph, a runtime assert with the same message (no host read of the values there)."""
    if timesteps.device.type != "cpu" or timesteps.numel() == 0:
        return
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode(timesteps) is not None:  # being traced
        inside = (timesteps < num_train_timesteps).all()
        if not allow_negative:
            inside = inside & (timesteps >= 0).all()
        torch._assert_async(inside, f"{name}: a value is outside the schedule [0, {num_train_timesteps})")
        return
    low, high = int(timesteps.min()), int(timesteps.max())
    if (low < 0 and not allow_negative) or high >= num_train_timesteps:
        bad = high if high >= num_train_timesteps else low
        raise ValueError(f"{name}: value {bad} is outside the schedule [0, {num_train_timesteps})")


def extract_into_tensor(schedule: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """schedule[timesteps] shaped [B, 1, ..., 1] to broadcast over a batch-first tensor of ndim dims."""
    out = schedule.gather(-1, timesteps.reshape(-1).long())
    return out.reshape(-1, *([1] * (ndim - 1)))


def alphas_sigmas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor):
    """Per-sample α = sqrt(ᾱ_t), σ = sqrt(1 - ᾱ_t), shaped to broadcast over `like` and computed in its
    accumulation dtype (float64 latents: float64 square roots of the schedule)."""
    check_timesteps(timesteps, alphas_cumprod.numel())
    alphas_cumprod, ndim = alphas_cumprod.to(accumulation_dtype(like.dtype)), like.dim()
    alphas = extract_into_tensor(alphas_cumprod.sqrt(), timesteps, ndim)
    sigmas = extract_into_tensor((1 - alphas_cumprod).sqrt(), timesteps, ndim)
    return alphas, sigmas


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
