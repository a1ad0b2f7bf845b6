"""Shared test machinery: devices and dtypes, memory layouts, the schedule, and the comparison of an
op (forward and backward) against its pure-PyTorch reference.

Low-precision error is judged against the error PyTorch itself makes in that dtype: the reference is
run once on the inputs as given (PyTorch's answer in that dtype) and once on the same inputs cast to
float64 (the exact answer); the op may be off the exact answer by at most twice PyTorch's own error
plus one unit of the dtype's precision."""

import contextlib
import os

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# CUDA graphs need the caching allocator (compute-sanitizer runs set PYTORCH_NO_CUDA_MEMORY_CACHING=1)
CUDA_GRAPHS = torch.cuda.is_available() and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") != "1"
LOW_PRECISION = [torch.float16, torch.bfloat16]


def dtypes_for(device):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if device == "cpu" else [])


def device_dtype_params():
    return [(d, t) for d in DEVICES for t in dtypes_for(d)]


def sd_alphas_cumprod(device="cpu", num_train_timesteps=1000):
    """Stable Diffusion's scaled-linear schedule (beta 0.00085 .. 0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(device)


# Sampling-step x0 limits as (op keyword arguments = diffusers scheduler config entries)
LIMITS = {
    "none": {},
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5),
}
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def fake_model(x, t, base):
    """A deterministic stand-in for the UNet: a function of (sample, timestep)."""
    return 0.8 * x * torch.cos(t / 300) + base * torch.sin(t / 170 + 0.3)


def assert_tight(actual, expected, name, tol=5e-6, scale=None):
    """float32: within tol of the largest magnitude involved (a few float32 ulps after many steps)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected)), f"{name}: non-finite positions differ"
    scale = max(1.0, expected.abs().max().item(), scale or 0.0)
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"{name}: error {error:.3g} (scale {scale:.3g})"


LAYOUTS = ["contiguous", "channels_last", "strided", "batch_inner"]


def in_layout(t, layout):
    """The same values as t (4-d, batch first) in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider buffer: not dense
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "batch_inner":  # dense, but the batch dimension is not outermost
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(layout)


def randn(*shape, dtype=torch.float32, device="cpu", generator=None):
    return torch.randn(*shape, generator=generator, dtype=torch.float32, device="cpu").to(device=device, dtype=dtype)


def to_float64(value):
    """The exact answer's arguments: float64, on the CPU (torch's CUDA float64 sort can misplace a NaN:
    torch.quantile then ignores it, which the CPU's never does)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype)
    return value


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def assert_close(actual, lowp, exact, name="output"):
    """actual vs the exact answer, within 2x PyTorch's own error (lowp vs exact) + one dtype ulp."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    dtype = actual.dtype
    actual, lowp, exact = actual.detach().double().cpu(), lowp.detach().double().cpu(), exact.detach().double().cpu()
    if dtype in (torch.float16, torch.bfloat16):  # an exact answer beyond the dtype's range is ±inf in it
        exact = torch.where(exact.abs() > torch.finfo(dtype).max, exact.sign() * float("inf"), exact)
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(actual), torch.isnan(exact)), f"{name}: NaN positions differ"
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite positions differ"
    assert torch.equal(actual[torch.isinf(exact)], exact[torch.isinf(exact)]), f"{name}: signs of infinities differ"
    if not finite.any():
        return
    scale = max(1.0, exact[finite].abs().max().item())
    # where PyTorch's own result in the dtype is NaN (an overflow on its way) its error is unbounded
    torch_error = (lowp[finite] - exact[finite]).abs().nan_to_num(nan=float("inf")).max().item()
    our_error = (actual[finite] - exact[finite]).abs().max().item()
    eps = torch.finfo(torch.float32 if dtype == torch.float64 else dtype).eps
    floor = 4 * torch.finfo(torch.float32).eps * scale
    assert our_error <= 2 * torch_error + max(floor, eps * scale), (
        f"{name}: error {our_error:.3g} vs PyTorch's own {torch_error:.3g} (scale {scale:.3g})"
    )


def check_against_reference(op, reference, args, grad_argnums=(), seed=0):
    """Forward of op(*args) vs reference(*args); with grad_argnums, the gradients of every floating
    output (random upstream gradients) with respect to those arguments as well."""
    exact_args = [to_float64(a) for a in args]
    diff_args = [a.detach().requires_grad_() if i in grad_argnums else a for i, a in enumerate(args)]
    diff_ref = [a.detach().requires_grad_() if i in grad_argnums else a for i, a in enumerate(args)]
    diff_exact = [a.detach().requires_grad_() if i in grad_argnums else a for i, a in enumerate(exact_args)]
    with torch.enable_grad():
        ours = _as_tuple(op(*diff_args))
        lowp = _as_tuple(reference(*diff_ref))
        exact = _as_tuple(reference(*diff_exact))
    assert len(ours) == len(exact)
    for k, (o, low, e) in enumerate(zip(ours, lowp, exact)):
        assert o.dtype == low.dtype, f"output {k}: dtype {o.dtype} != reference {low.dtype}"
        assert o.device == low.device
        assert_close(o, low, e, f"output {k}")
    if not grad_argnums:
        return ours
    generator = torch.Generator().manual_seed(seed)
    upstream = [
        torch.randn(o.shape, generator=generator, dtype=torch.float64) if o.is_floating_point() else None for o in ours
    ]
    diffable = [k for k, u in enumerate(upstream) if u is not None and ours[k].requires_grad]

    def grads(outs, inputs):
        outs_k = [outs[k] for k in diffable]
        ups = [upstream[k].to(device=outs[k].device, dtype=outs[k].dtype) for k in diffable]
        wrt = [inputs[i] for i in grad_argnums]
        return torch.autograd.grad(outs_k, wrt, ups, allow_unused=True, materialize_grads=True)

    for i, g_ours, g_lowp, g_exact in zip(
        grad_argnums, grads(ours, diff_args), grads(lowp, diff_ref), grads(exact, diff_exact)
    ):
        assert g_ours.dtype == args[i].dtype, f"grad of argument {i}: dtype {g_ours.dtype}"
        assert_close(g_ours, g_lowp, g_exact, f"grad of argument {i}")
    return ours


@contextlib.contextmanager
def no_tf32():
    """Float32 matmuls and convolutions without TF32 (cuDNN's default is TF32, whose rounding differs
    between eager and compiled kernels)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
