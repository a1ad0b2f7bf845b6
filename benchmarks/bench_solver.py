"""Benchmarks of the solver family. CPU: pytest-benchmark, eager reference vs rglcd_fast at SD1.5-512
latents, batch 4 (`pytest benchmarks --benchmark-only`). GPU: gpu_cases() for bench_ops.py (eager,
torch.compile of the reference, rglcd_fast), FusedLCMScheduler.step against diffusers' own LCMScheduler.step.

The teacher's solver step is timed forward only (the teacher is frozen in LCD training); the sampling
steps are inference ops. Sampling uses one timestep for the whole batch, as a pipeline does."""

import pytest
import torch
from gpu_cases import Case, shapes
from helpers import sd_alphas_cumprod

from rglcd_fast import ops
from rglcd_fast.reference import solver as ref

CPU_SHAPE = (4, 4, 64, 64)
PROVIDERS = {"eager": ref, "rglcd_fast": ops}
# Stable Diffusion's training schedule (the scheduler configs of SD 1.5 / 2.1 / LCM-LoRA)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LCM_STEPS = 4
SAMPLING_T, SAMPLING_PREV = 999, 759  # the first step of LCMScheduler.set_timesteps(4): 999, 759, 499, 259


def inputs(shape, dtype=torch.float32, device="cpu"):
    """(cond, uncond, sample, noise, timesteps, prev_timesteps, guidance, alphas_cumprod) of a training
    step: per-sample DDIM timesteps t_start = 20(n + 1) − 1 and prev = max(t_start − 20, 0), w ~ U[5, 15]."""
    g = torch.Generator().manual_seed(0)
    cond, uncond, sample, noise = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    t = (torch.randint(0, 50, (shape[0],), generator=g) + 1) * 20 - 1
    prev = (t - 20).clamp(min=0)
    w = torch.empty(shape[0]).uniform_(5, 15, generator=g)
    return cond, uncond, sample, noise, t.to(device), prev.to(device), w.to(device), sd_alphas_cumprod(device)


def sampling_timesteps(device="cpu"):
    return torch.tensor(SAMPLING_T, device=device), torch.tensor(SAMPLING_PREV, device=device)


def _provider_fn(function_name, provider):
    if provider == "compile":
        return torch.compile(getattr(ref, function_name), dynamic=False)
    return getattr({"eager": ref, "rglcd_fast": ops}[provider], function_name)


def guided_fn(provider):
    return _provider_fn("guided_ddim_step", provider)


def lcm_fn(provider):
    return _provider_fn("lcm_step", provider)


def ddim_fn(provider):
    return _provider_fn("ddim_step", provider)


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.mark.parametrize("provider", PROVIDERS)
@DTYPES
def test_guided_ddim_step(benchmark, provider, dtype):
    """The teacher's CFG + DDIM solver step of LCD training (forward: the teacher is frozen)."""
    c, u, x, _, t, prev, w, ac = inputs(CPU_SHAPE, dtype)
    step = guided_fn(provider)
    benchmark.group = f"guided_ddim_step fwd {dtype}"
    with torch.no_grad():
        benchmark(step, c, u, x, t, prev, w, ac)


@pytest.mark.parametrize("provider", PROVIDERS)
@DTYPES
def test_lcm_step(benchmark, provider, dtype):
    """An LCM sampling step that is not the last (noise injected)."""
    _, m, x, z, _, _, _, ac = inputs(CPU_SHAPE, dtype)
    t, prev = sampling_timesteps()
    step = lcm_fn(provider)
    benchmark.group = f"lcm_step {dtype}"
    with torch.no_grad():
        benchmark(step, m, x, t, prev, ac, z)


@pytest.mark.parametrize("provider", PROVIDERS)
@DTYPES
def test_ddim_step(benchmark, provider, dtype):
    """A deterministic (eta = 0) DDIM sampling step."""
    _, m, x, _, _, _, _, ac = inputs(CPU_SHAPE, dtype)
    t, prev = sampling_timesteps()
    step = ddim_fn(provider)
    benchmark.group = f"ddim_step {dtype}"
    with torch.no_grad():
        benchmark(step, m, x, t, prev, ac)


def _scheduler_lcm_step(m, x, fused):
    """diffusers' LCMScheduler.step (or our drop-in FusedLCMScheduler.step) at the first of 4 timesteps,
    drawing its noise from a generator. The step index is reset before every call (step() advances it),
    so each call is that same step."""
    from diffusers import LCMScheduler

    from rglcd_fast.schedulers import FusedLCMScheduler

    scheduler = (FusedLCMScheduler if fused else LCMScheduler)(**SD_SCHEDULE)
    scheduler.set_timesteps(LCM_STEPS, device=m.device)
    t = scheduler.timesteps[0]
    generator = torch.Generator(device=m.device).manual_seed(0)

    def run():
        scheduler._step_index = 0
        return scheduler.step(m, t, x, generator=generator, return_dict=False)

    run.generators = (generator,)  # bench_ops.graph_us registers it with the CUDA graph it captures
    return run


def gpu_cases(quick, dtypes, device="cuda"):
    for shape_name, shape in shapes(quick).items():
        for dtype in dtypes:
            c, u, x, _, t, prev, w, ac = inputs(shape, dtype, device)
            n, size = x.numel(), x.element_size()
            ts, prev_ts = sampling_timesteps(device)

            def teacher(provider, c=c, u=u, x=x, t=t, prev=prev, w=w, ac=ac):
                step = guided_fn(provider)

                def run():
                    with torch.no_grad():
                        return step(c, u, x, t, prev, w, ac)

                return run

            def lcm(provider, m=u, x=x, ac=ac, ts=ts, prev_ts=prev_ts):
                if provider != "compile":
                    return _scheduler_lcm_step(m, x, fused=provider == "rglcd_fast")
                step = lcm_fn(provider)
                generator = torch.Generator(device=m.device).manual_seed(0)

                def run():  # the noise drawn as the scheduler draws it, then the step
                    with torch.no_grad():
                        z = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
                        return step(m, x, ts, prev_ts, ac, z)

                return run

            def ddim(provider, m=u, x=x, ac=ac, ts=ts, prev_ts=prev_ts):
                step = ddim_fn(provider)

                def run():
                    with torch.no_grad():
                        return step(m, x, ts, prev_ts, ac)

                return run

            # teacher step: cond, uncond, sample in; x_prev, pred_x0 out (5N), which is what we move.
            yield Case("teacher CFG + DDIM solver step", shape_name, dtype, teacher, 5 * n * size, 5 * n * size)
            # LCM step, diffusers' LCMScheduler.step vs our FusedLCMScheduler.step (the compile provider:
            # the reference step compiled, after the same draw): model_output, sample in; prev_sample,
            # denoised out (4N). Ours draws the noise in the step's kernel (Philox, as torch.randn): also 4N.
            yield Case("LCMScheduler.step", shape_name, dtype, lcm, 4 * n * size, 4 * n * size)
            # DDIM step (eta = 0): model_output, sample in; prev_sample, pred_x0 out (4N).
            yield Case("DDIM sampling step", shape_name, dtype, ddim, 4 * n * size, 4 * n * size)
