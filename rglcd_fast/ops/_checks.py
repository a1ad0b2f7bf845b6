"""Argument validation shared by the op wrappers: clear Python exceptions that name the argument.
Everything here reads only metadata (shape, dtype, device), so it is free under torch.compile and
never synchronises with the device."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def latents(**named: torch.Tensor) -> torch.Tensor:
    """Latent-shaped tensors: floating, batch-first, and of one shape, dtype and device (the first's)."""
    (first_name, first), *rest = named.items()
    tensor(first_name, first)
    if first.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{first_name}: expected float16, bfloat16, float32 or float64, got {first.dtype}")
    if first.dim() < 1:
        raise ValueError(f"{first_name}: expected a batch-first tensor [B, ...], got a 0-d tensor")
    for name, value in rest:
        tensor(name, value)
        if value.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (as {first_name}), got {value.device}")
        if value.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (as {first_name}), got {value.dtype}")
        if value.shape != first.shape:
            raise ValueError(f"{name}: expected shape {tuple(first.shape)} (as {first_name}), got {tuple(value.shape)}")
    return first


def per_sample(name: str, value, batch: int, device: torch.device, integer: bool) -> torch.Tensor:
    """A per-sample tensor of shape [B], [1] or []: returned flat ([B] or [1]) for the kernels."""
    tensor(name, value)
    if integer and value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor (timesteps / indices), got {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name}: expected device {device} (as the latents), got {value.device}")
    if value.dim() > 1 or value.numel() not in (1, batch):
        raise ValueError(
            f"{name}: expected shape [{batch}], [1] or [] (one value per sample), got {tuple(value.shape)}"
        )
    return value.reshape(-1)


def scalar_or_per_sample(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """A float or a per-sample float tensor; a float becomes a filled 0-d tensor (no host copy)."""
    if isinstance(value, (int, float)):
        return torch.full((1,), float(value), dtype=torch.float32, device=device)
    return per_sample(name, value, batch, device, integer=False)


def schedule(alphas_cumprod, device: torch.device) -> torch.Tensor:
    tensor("alphas_cumprod", alphas_cumprod)
    if alphas_cumprod.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"alphas_cumprod: expected float32 (or float64), got {alphas_cumprod.dtype}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(
            f"alphas_cumprod: expected a non-empty 1-d schedule [T], got shape {tuple(alphas_cumprod.shape)}"
        )
    if alphas_cumprod.device != device:
        raise ValueError(f"alphas_cumprod: expected device {device} (as the latents), got {alphas_cumprod.device}")
    return alphas_cumprod


def choice(name: str, value: str, options) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def scalar(name: str, value, device: torch.device) -> torch.Tensor:
    """A float or a one-value float tensor ([] or [1]); a float becomes a filled 0-d float32 tensor
    (no host copy)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((), float(value), dtype=torch.float32, device=device)
    tensor(name, value)
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a float or a floating tensor, got {value.dtype}")
    if value.dim() > 1 or value.numel() != 1:
        raise ValueError(f"{name}: expected a single value (shape [] or [1]), got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: expected device {device}, got {value.device}")
    return value


def broadcastable_to(name: str, value: torch.Tensor, shape, target_name: str) -> None:
    """ValueError naming the argument unless value's shape broadcasts to `shape` (without growing it)."""
    if value.dim() > len(shape) or any(v != 1 and v != s for v, s in zip(reversed(value.shape), reversed(shape))):
        raise ValueError(f"{name}: shape {tuple(value.shape)} does not broadcast to {target_name} {tuple(shape)}")
