"""Training pieces for RG-LCD distillation."""

from .checkpoint import (
    RngState,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    write_folder,
)
from .data import (
    ImageCaptionDataset,
    ResumableDataLoader,
    ResumableSampler,
    braceexpand,
    collate_image_caption,
    make_dataloader,
    preprocess_image,
    sdxl_time_ids,
)
from .step import DistillationConfig, DistillationStep, StepOutput, update_ema

__all__ = [
    "ImageCaptionDataset",
    "ResumableDataLoader",
    "ResumableSampler",
    "braceexpand",
    "collate_image_caption",
    "make_dataloader",
    "preprocess_image",
    "sdxl_time_ids",
    "DistillationConfig",
    "DistillationStep",
    "StepOutput",
    "update_ema",
    "RngState",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "write_folder",
]
