"""The op library: registration, the compiled kernels, and the pure-PyTorch fallback."""

import os
import subprocess
import sys

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
