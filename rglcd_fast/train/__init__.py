"""Training pieces for RG-LCD distillation."""
from .data import (ImageCaptionDataset, ResumableDataLoader, ResumableSampler, braceexpand,
                   collate_image_caption, make_dataloader, preprocess_image)
from .step import DistillationConfig, DistillationStep, StepOutput, update_ema

__all__ = ["ImageCaptionDataset", "ResumableDataLoader", "ResumableSampler", "braceexpand",
           "collate_image_caption", "make_dataloader", "preprocess_image", "DistillationConfig",
           "DistillationStep", "StepOutput", "update_ema"]
