"""Training pieces for RG-LCD distillation."""
from .data import (ImageCaptionDataset, ResumableDataLoader, ResumableSampler, braceexpand,
                   collate_image_caption, make_dataloader, preprocess_image)

__all__ = ["ImageCaptionDataset", "ResumableDataLoader", "ResumableSampler", "braceexpand",
           "collate_image_caption", "make_dataloader", "preprocess_image"]
