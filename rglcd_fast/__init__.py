"""rglcd_fast: fused PyTorch ops for Reward Guided Latent Consistency Distillation and LCM sampling."""

from . import ops, reference
from ._library import extension_load_error, has_cuda_kernels, has_extension
from ._library import load as _load

_load()

__all__ = ["ops", "reference", "has_extension", "has_cuda_kernels", "extension_load_error"]
__version__ = "0.1.0"
