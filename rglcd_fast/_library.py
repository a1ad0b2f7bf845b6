"""The op library: every schema is declared once here (torch.ops.rglcd_fast.*), the compiled
extension registers CPU/CUDA kernels for them, and the pure-PyTorch references are registered for
every backend the extension does not cover (or for all of them when it is absent)."""

import importlib
import os
from typing import Callable

import torch

NAMESPACE = "rglcd_fast"
_LIB = torch.library.Library(NAMESPACE, "DEF")
_REFERENCE_KERNELS: dict[str, Callable] = {}
_PYTHON_AUTOGRAD: dict[str, Callable] = {}
_STATE = {"extension": False, "cuda_kernels": False, "load_error": None, "loaded": False}
_BACKENDS = ("CPU", "CUDA")


def define(name: str, signature: str, reference_kernel: Callable, tags=()):
    """Declares rglcd_fast::<name><signature> (with torch.Tag tags); reference_kernel serves where no
    kernel is compiled."""
    _LIB.define(name + signature, tags=tags)
    _REFERENCE_KERNELS[name] = reference_kernel
    return getattr(torch.ops.rglcd_fast, name).default


def register_autograd(name: str, setup_context: Callable, backward: Callable) -> None:
    """Autograd for rglcd_fast::<name>, with the contract of torch.library.register_autograd
    (setup_context(ctx, inputs, output); backward(ctx, *grads) -> one gradient or None per input) but
    a plain autograd.Function behind it: the generic wrapper costs ~100 µs of Python a call, which
    would dominate these small fused ops. Unused output gradients arrive as None. Registered by load()
    unless the compiled library has its own (C++) autograd for the op (csrc/autograd/)."""
    op = getattr(torch.ops.rglcd_fast, name).default

    class Node(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            ctx.set_materialize_grads(False)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Node.__name__ = Node.__qualname__ = f"{name}_backward_node"

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Node.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _PYTHON_AUTOGRAD[name] = autograd_kernel


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
    for name, kernel in _PYTHON_AUTOGRAD.items():
        if not _has_kernel(name, "Autograd"):
            _LIB.impl(name, kernel, "Autograd")


def has_extension() -> bool:
    """True when the compiled C++ kernels are active."""
    return _STATE["extension"]


def has_cuda_kernels() -> bool:
    """True when the compiled CUDA kernels are active (else CUDA tensors run the references)."""
    return _STATE["cuda_kernels"]


def extension_load_error():
    """Why the compiled library could not be loaded (None when it loaded or was switched off)."""
    return _STATE["load_error"]
