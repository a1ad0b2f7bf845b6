"""CPU benchmark of the consistency family: eager reference vs rglcd_fast, at SD1.5-512 latents
(batch 4, 4×64×64). Run: pytest benchmarks --benchmark-only (see benchmarks/report.py for the table)."""
import pytest
import torch

from helpers import sd_alphas_cumprod
from rglcd_fast import ops
from rglcd_fast.reference import consistency as ref

SHAPE = (4, 4, 64, 64)
PROVIDERS = {"eager": ref, "rglcd_fast": ops}


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    m, x, y = (torch.randn(SHAPE, generator=g).to(dtype) for _ in range(3))
    return m, x, torch.randint(0, 1000, (SHAPE[0],), generator=g), y, sd_alphas_cumprod()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_consistency_loss_fwd_bwd(benchmark, provider, dtype):
    """The distillation loss as training uses it: loss and model_pred forward, gradient to the student output."""
    m, x, t, y, ac = inputs(dtype)
    m.requires_grad_()
    family = PROVIDERS[provider]

    def step():
        loss, _ = family.consistency_loss(m, x, t, y, ac, "epsilon", "huber", 0.001)
        return torch.autograd.grad(loss, m)

    benchmark.group = f"consistency_loss fwd+bwd {dtype}"
    benchmark(step)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_consistency_output_fwd(benchmark, provider):
    m, x, t, _, ac = inputs()
    benchmark.group = "consistency_output fwd float32"
    benchmark(PROVIDERS[provider].consistency_output, m, x, t, ac, "epsilon")
