"""Fast few-step LCM sampling: the fused scheduler, optionally captured in one CUDA graph."""
from .sampler import LCMSampler, image_grid

__all__ = ["LCMSampler", "image_grid"]
