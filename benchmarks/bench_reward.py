"""Benchmarks of the reward family: the latent reward model update of docs/design.md §1 step 9 — LRM
logits S = reward_head(image features [3, B, 1024], text features [B, 1024], logit scale), the
pairwise KL against random expert logits over the 3 candidates, gradients to both feature tensors
and the logit scale. CPU: pytest-benchmark, eager reference vs rglcd_fast at 3×16×1024
(`pytest benchmarks --benchmark-only`). GPU: gpu_cases() for bench_ops.py (eager, torch.compile of
the reference, rglcd_fast) at 3×16×1024 and 3×256×1024 (K candidates × batch × embedding width)."""

import pytest
import torch
from gpu_cases import Case

from rglcd_fast import ops
from rglcd_fast.reference import reward as ref

CANDIDATES = 3  # model_pred, target, x0 (§1 step 9)
FEATURE_DIM = 1024
CPU_BATCH = 16
GPU_BATCHES = {"3×16×1024": 16, "3×256×1024": 256}
LOGIT_SCALE = 100.0  # CLIP's trained exp(logit_scale)
PROVIDERS = {"eager": ref, "rglcd_fast": ops}
CASE_NAME = "reward head + pairwise KL (3 candidates) fwd+bwd"


def inputs(batch, dtype=torch.float32, device="cpu"):
    """Image and text features and the logit scale (float32, as CLIP keeps it), all differentiable;
    expert logits (the expert RM's scores × its scale) as a target."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(CANDIDATES, batch, FEATURE_DIM, generator=g).to(device=device, dtype=dtype)
    text = torch.randn(batch, FEATURE_DIM, generator=g).to(device=device, dtype=dtype)
    expert = (5 * torch.randn(CANDIDATES, batch, generator=g)).to(device=device, dtype=dtype)
    scale = torch.tensor(LOGIT_SCALE, device=device)
    return image.requires_grad_(), text.requires_grad_(), scale.requires_grad_(), expert


def lrm_step(module):
    def step(image, text, scale, expert):
        logits = module.reward_head(image, text, scale)
        return module.pairwise_preference_loss(logits, expert, "kl")

    return step


def step_fn(provider):
    if provider == "compile":
        return torch.compile(lrm_step(ref), dynamic=False)
    return lrm_step(PROVIDERS[provider])


def fwd_bwd(step, image, text, scale, expert):
    return lambda: torch.autograd.grad(step(image, text, scale, expert)[0], (image, text, scale))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_lrm_step_fwd_bwd(benchmark, provider):
    """Reward head + pairwise KL, forward and backward to the features and the logit scale."""
    image, text, scale, expert = inputs(CPU_BATCH)
    benchmark.group = f"{CASE_NAME} 3×{CPU_BATCH}×{FEATURE_DIM} float32"
    grads = benchmark(fwd_bwd(step_fn(provider), image, text, scale, expert))
    assert [g.shape for g in grads] == [image.shape, text.shape, scale.shape]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_reward_head_fwd(benchmark, provider):
    image, text, scale, _ = inputs(CPU_BATCH)
    head = PROVIDERS[provider].reward_head

    def run():
        with torch.no_grad():
            return head(image, text, scale)

    benchmark.group = f"reward_head fwd 3×{CPU_BATCH}×{FEATURE_DIM} float32"
    benchmark(run)


def gpu_cases(quick, dtypes):
    batches = {name: b for name, b in GPU_BATCHES.items() if not quick or b == CPU_BATCH}
    for shape_name, batch in batches.items():
        for dtype in dtypes:
            image, text, scale, expert = inputs(batch, dtype, "cuda")
            features = (image.numel() + text.numel()) * image.element_size()

            def make(provider, image=image, text=text, scale=scale, expert=expert):
                return fwd_bwd(step_fn(provider), image, text, scale, expert)

            # At least: both feature tensors read, both feature gradients written. Ours: the forward
            # reads (u, v) per image row; the backward's row pass reads them twice and writes grad_u,
            # its text pass reads u and v and writes grad_v.
            image_bytes = image.numel() * image.element_size()
            text_bytes = text.numel() * text.element_size()
            yield Case(CASE_NAME, shape_name, dtype, make, 2 * features, 8 * image_bytes + 2 * text_bytes)
