"""What bench_ops.py times: a Case per (op, shape, dtype), built by each family's bench_<family>.py."""

import dataclasses
from typing import Callable

import torch

# Latent shapes of the GPU tables: SD1.5 at 512 px, SD2.1 at 768 px (batch 16), SDXL at 1024 px (batch 64).
LATENT_SHAPES = {"SD1.5-512 B16": (16, 4, 64, 64), "SD2.1-768 B16": (16, 4, 96, 96), "SDXL-1024 B64": (64, 4, 128, 128)}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass
class Case:
    name: str
    shape_name: str
    dtype: torch.dtype
    make: Callable[[str], Callable[[], object]]  # provider -> the callable to time
    min_bytes: int  # each input read once, each output written once
    our_bytes: int  # what rglcd_fast's kernels actually move

    @property
    def dtype_name(self):
        return DTYPE_NAMES[self.dtype]


def shapes(quick):
    return {"SD2.1-768 B16": LATENT_SHAPES["SD2.1-768 B16"]} if quick else LATENT_SHAPES
