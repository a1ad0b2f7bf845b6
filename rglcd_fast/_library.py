"""The op library: every schema is declared once here (torch.ops.rglcd_fast.*), the compiled
extension registers CPU/CUDA kernels and the differentiable ops' autograd for them, and the pure-PyTorch
references are registered for every backend the extension does not cover (or for all of them when it is
absent; then also at the Autograd key of the differentiable ops, where PyTorch's autograd runs through them)."""

import importlib
import os
from typing import Callable

import torch

NAMESPACE = "rglcd_fast"
_LIB = torch.library.Library(NAMESPACE, "DEF")
_REFERENCE_KERNELS: dict[str, Callable] = {}
_DIFFERENTIABLE: set[str] = set()
_STATE = {"extension": False, "cuda_kernels": False, "load_error": None, "loaded": False}
_BACKENDS = ("CPU", "CUDA")


def define(name: str, signature: str, reference_kernel: Callable, tags=(), differentiable: bool = False):
    """Declares rglcd_fast::<name><signature> (with torch.Tag tags); reference_kernel serves where no kernel is
    compiled. differentiable: where the compiled autograd (csrc/autograd/) is absent, the reference also serves
    at the Autograd key, so plain PyTorch autograd differentiates through its operations."""
    _LIB.define(name + signature, tags=tags)
    _REFERENCE_KERNELS[name] = reference_kernel
    if differentiable:
        _DIFFERENTIABLE.add(name)
    return getattr(torch.ops.rglcd_fast, name).default


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), key)


def load() -> None:
    """Loads the compiled kernels (unless RGLCD_FAST_NO_EXT=1) and fills the gaps with references."""
    if _STATE["loaded"]:
        return
    _STATE["loaded"] = True
    if os.environ.get("RGLCD_FAST_NO_EXT", "0") != "1":
        try:
            importlib.import_module("rglcd_fast._C")
            _STATE["extension"] = True
        except (ImportError, OSError) as error:  # a missing or ABI-incompatible build
            _STATE["load_error"] = error
    names = list(_REFERENCE_KERNELS)
    _STATE["cuda_kernels"] = _STATE["extension"] and all(_has_kernel(n, "CUDA") for n in names)
    for name in names:
        for key in _BACKENDS:
            if not _has_kernel(name, key):
                _LIB.impl(name, _REFERENCE_KERNELS[name], key)
    for name in _DIFFERENTIABLE:
        if not _has_kernel(name, "Autograd"):
            _LIB.impl(name, _REFERENCE_KERNELS[name], "Autograd")


def has_extension() -> bool:
    """True when the compiled C++ kernels are active."""
    return _STATE["extension"]


def has_cuda_kernels() -> bool:
    """True when the compiled CUDA kernels are active (else CUDA tensors run the references)."""
    return _STATE["cuda_kernels"]


def extension_load_error():
    """Why the compiled library could not be loaded (None when it loaded or was switched off)."""
    return _STATE["load_error"]
