"""File helpers of every layer: crash-safe writes (a whole file or folder, or the old one) and the check that
a folder is a diffusers Stable Diffusion pipeline. Nothing here imports the rest of the package."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PART_CONFIGS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}


def write_text(path: str, text: str) -> None:
    """Write and fsync (the caller publishes the file, e.g. by a rename)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_file_atomic(path: str, text: str) -> None:
    """Replace the text file ``path`` whole or not at all (a crash mid-write leaves the old file)."""
    write_text(path + ".tmp", text)
    os.replace(path + ".tmp", path)


def write_folder(path: str, write: Callable[[str], Any]) -> None:
    """write(tmp) into a temporary sibling folder, then swap it into place: a crash leaves the old folder or
    the new one, never half of one (between the two renames both are aside, as ``path.old`` and the complete
    ``path.tmp``; the next write removes them). A failed write leaves no temporary folder behind."""
    tmp, old = path + ".tmp", path + ".old"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def check_pipeline_folder(folder: str, argument: str) -> None:
    """Raises, naming `argument`, unless `folder` is a diffusers Stable Diffusion folder (PIPELINE_PARTS)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{argument}: no such folder {folder!r} (expected a diffusers Stable Diffusion folder)")
    missing = [p for p in PIPELINE_PARTS if not os.path.isdir(os.path.join(folder, p))]
    for part, config in PART_CONFIGS.items():  # an empty or half-copied part
        if part not in missing and not os.path.isfile(os.path.join(folder, part, config)):
            missing.append(f"{part}/{config}")
    if "tokenizer" not in missing and not os.listdir(os.path.join(folder, "tokenizer")):
        missing.append("the tokenizer's files")
    if missing:
        raise ValueError(
            f"{argument}: {folder!r} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)})"
        )


def is_sdxl_folder(folder: str) -> bool:
    """A diffusers SDXL pipeline folder, by its model_index.json (or, without one, its second text encoder)."""
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return "XL" in json.load(f).get("_class_name", "")
    return os.path.isdir(os.path.join(folder, "text_encoder_2"))
