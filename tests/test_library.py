"""The op library: registration, the compiled kernels, and the pure-PyTorch fallback."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import sd_alphas_cumprod

import rglcd_fast


def test_every_op_has_a_cpu_kernel_and_a_schema():
    assert rglcd_fast._library._REFERENCE_KERNELS, "no ops registered"
    for name in rglcd_fast._library._REFERENCE_KERNELS:
        assert hasattr(torch.ops.rglcd_fast, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rglcd_fast::{name}", "CPU"), name


def fallback_case():
    """A small forward + backward through the public API (run with and without the extension)."""
    g = torch.Generator().manual_seed(0)
    m, x, y = (torch.randn(2, 4, 5, 5, generator=g) for _ in range(3))
    m.requires_grad_()
    loss, pred = rglcd_fast.ops.consistency_loss(m, x, torch.tensor([3, 700]), y, sd_alphas_cumprod())
    (grad,) = torch.autograd.grad(loss + pred.sum(), m)
    return {"extension": rglcd_fast.has_extension(), "loss": loss.detach(), "pred": pred.detach(), "grad": grad}


def test_fallback_without_extension_matches_kernels(tmp_path):
    """RGLCD_FAST_NO_EXT=1: the references serve as kernels behind the same API."""
    out = tmp_path / "fallback.pt"
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); import test_library; "
        "torch.save(test_library.fallback_case(), sys.argv[1])"
    )
    env = dict(os.environ, RGLCD_FAST_NO_EXT="1")
    subprocess.run([sys.executable, "-c", script, str(out), os.path.dirname(__file__)], check=True, env=env)
    fallback, compiled = torch.load(out), fallback_case()
    assert not fallback.pop("extension") and compiled.pop("extension")
    for key, value in compiled.items():
        torch.testing.assert_close(fallback[key], value, msg=key)


def _direct_calls(device):
    """Each op called through torch.ops with valid arguments on `device`: {op: (call, tensor argument names)}."""
    ops, ac = torch.ops.rglcd_fast, sd_alphas_cumprod().to(device)
    m, x, y = (torch.randn(2, 4, 3, 3, device=device) for _ in range(3))
    t, prev, w = (torch.tensor(v, device=device) for v in ([500, 20], [480, 0], [7.5, 7.5]))
    image, text, scale = torch.randn(3, 2, 8, device=device), torch.randn(2, 8, device=device), torch.tensor(14.3)
    logits = torch.randn(3, 2, device=device)
    return {
        "consistency_output": (
            lambda a: ops.consistency_output(
                a["model_output"], a["sample"], a["timesteps"], a["alphas_cumprod"], "epsilon", 10.0, 0.5
            ),
            dict(model_output=m, sample=x, timesteps=t, alphas_cumprod=ac),
        ),
        "consistency_loss": (
            lambda a: ops.consistency_loss(
                a["model_output"],
                a["sample"],
                a["timesteps"],
                a["target"],
                a["alphas_cumprod"],
                "epsilon",
                "huber",
                0.001,
                10.0,
                0.5,
            ),
            dict(model_output=m, sample=x, timesteps=t, target=y, alphas_cumprod=ac),
        ),
        "guided_ddim_step": (
            lambda a: ops.guided_ddim_step(
                a["cond_output"],
                a["uncond_output"],
                a["sample"],
                a["timesteps"],
                a["prev_timesteps"],
                a["guidance_scale"],
                a["alphas_cumprod"],
                "epsilon",
            ),
            dict(
                cond_output=m,
                uncond_output=y,
                sample=x,
                timesteps=t,
                prev_timesteps=prev,
                guidance_scale=w,
                alphas_cumprod=ac,
            ),
        ),
        "reward_head": (
            lambda a: ops.reward_head(a["image_features"], a["text_features"], a["logit_scale"]),
            dict(image_features=image, text_features=text, logit_scale=scale.to(device)),
        ),
        "pairwise_preference_loss": (
            lambda a: ops.pairwise_preference_loss(a["logits"], a["expert_logits"], "kl"),
            dict(logits=logits, expert_logits=logits.clone()),
        ),
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "op", ["consistency_output", "consistency_loss", "guided_ddim_step", "reward_head", "pairwise_preference_loss"]
)
def test_a_direct_call_with_an_argument_on_another_device_names_it(op):
    """torch.ops dispatches on the highest-priority device among the arguments: a CPU tensor among CUDA ones
    reaches the CUDA kernel, which must refuse it (naming it) instead of reading a host pointer."""
    call, arguments = _direct_calls("cuda")[op]
    call(arguments)  # valid on one device
    for name in list(arguments)[1:]:
        moved = dict(arguments, **{name: arguments[name].cpu()})
        with pytest.raises(ValueError, match=f"{name}: expected device cuda"):
            call(moved)
