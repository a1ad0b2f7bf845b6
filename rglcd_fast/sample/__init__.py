"""Fast few-step LCM sampling: the fused scheduler, optionally captured in one CUDA graph."""

from .sampler import Conditioning, LCMSampler, image_grid

__all__ = ["Conditioning", "LCMSampler", "image_grid"]
