"""Benchmarks of the consistency family. CPU: pytest-benchmark, eager reference vs rglcd_fast at
SD1.5-512 latents, batch 4 (`pytest benchmarks --benchmark-only`). GPU: gpu_cases() for
bench_ops.py (eager, torch.compile of the reference, rglcd_fast)."""

import pytest
import torch
from gpu_cases import Case, shapes
from helpers import sd_alphas_cumprod

from rglcd_fast import ops
from rglcd_fast.reference import consistency as ref

CPU_SHAPE = (4, 4, 64, 64)
PROVIDERS = {"eager": ref, "rglcd_fast": ops}


def inputs(shape, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    m, x, y = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return m, x, torch.randint(0, 1000, (shape[0],), generator=g).to(device), y, sd_alphas_cumprod(device)


def loss_fn(provider):
    if provider == "compile":
        return torch.compile(ref.consistency_loss, dynamic=False)
    return {"eager": ref.consistency_loss, "rglcd_fast": ops.consistency_loss}[provider]


def output_fn(provider):
    if provider == "compile":
        return torch.compile(ref.consistency_output, dynamic=False)
    return {"eager": ref.consistency_output, "rglcd_fast": ops.consistency_output}[provider]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_consistency_loss_fwd_bwd(benchmark, provider, dtype):
    """The distillation loss as training uses it: loss and model_pred forward, gradient to the student output."""
    m, x, t, y, ac = inputs(CPU_SHAPE, dtype)
    m.requires_grad_()
    loss = loss_fn(provider)
    benchmark.group = f"consistency_loss fwd+bwd {dtype}"
    benchmark(lambda: torch.autograd.grad(loss(m, x, t, y, ac)[0], m))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_consistency_output_fwd(benchmark, provider):
    m, x, t, _, ac = inputs(CPU_SHAPE)
    benchmark.group = "consistency_output fwd float32"
    benchmark(output_fn(provider), m, x, t, ac, "epsilon")


def gpu_cases(quick, dtypes):
    for shape_name, shape in shapes(quick).items():
        for dtype in dtypes:
            m, x, t, y, ac = inputs(shape, dtype, "cuda")
            m.requires_grad_()
            n, size = m.numel(), m.element_size()

            def fwd_bwd(provider, m=m, x=x, t=t, y=y, ac=ac):
                loss = loss_fn(provider)
                return lambda: torch.autograd.grad(loss(m, x, t, y, ac)[0], m)

            def fwd(provider, m=m, x=x, t=t, y=y, ac=ac):
                loss = loss_fn(provider)

                def run():
                    with torch.no_grad():
                        return loss(m, x, t, y, ac)

                return run

            def bwd(provider, m=m, x=x, t=t, y=y, ac=ac):
                # The forward is built once per stream: autograd runs a node's backward on the stream its
                # forward ran on, and a graph captured on a side stream cannot launch on another one.
                loss, built = loss_fn(provider), {}

                def run():
                    stream = torch.cuda.current_stream()
                    if built.get("stream") != stream:
                        built.update(stream=stream, out=loss(m, x, t, y, ac)[0])
                    return torch.autograd.grad(built["out"], m, retain_graph=True)

                return run

            def output(provider, m=m, x=x, t=t, ac=ac):
                f = output_fn(provider)

                def run():
                    with torch.no_grad():
                        return f(m, x, t, ac)

                return run

            # loss fwd+bwd: at least m, x, y in and pred, grad out (5N); ours: forward 4N, backward 4N.
            yield Case("LCD loss fwd+bwd (Huber)", shape_name, dtype, fwd_bwd, 5 * n * size, 8 * n * size)
            yield Case("LCD loss fwd", shape_name, dtype, fwd, 4 * n * size, 4 * n * size)
            yield Case("LCD loss bwd", shape_name, dtype, bwd, 4 * n * size, 4 * n * size)
            yield Case("consistency_output fwd", shape_name, dtype, output, 3 * n * size, 3 * n * size)
