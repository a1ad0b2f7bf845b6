"""Checks rglcd_fast.reward.preprocess against the official reward functions' own transforms, run with
torchvision: rg-lcd's reward_fn.py (CLIP_RESIZE + CLIP_NORMALIZE for the CLIP family and the aesthetic score;
Resize + CenterCrop + CLIP_NORMALIZE for ImageReward) and HPSv2's preprocess_val.transforms[2:] built by HPSv2's
own transform.py (ResizeMaxSize with light_augmentation, + its normalisation), image by image as the official
score function applies them, on square and non-square batches in [0, 1].

rg-lcd pins torchvision 0.16.2, whose tensor resize does not antialias (antialias="warn" is off for tensors);
later versions antialias by default, so the check runs torchvision's resize with antialias=False, 0.16.2's
tensor behaviour. Needs torchvision and the HPSv2 source, which the tests do not:
    git clone https://github.com/tgxs002/HPSv2
    python scripts/check_official_preprocessing.py --hpsv2-src HPSv2
"""

import argparse
import importlib.util
import os
import sys
import types

import torch


def hpsv2_transform_module(hpsv2_src):
    """HPSv2's hpsv2/src/open_clip/transform.py (and the constants it imports), without importing the rest of
    its package (which loads the models)."""
    folder = os.path.join(hpsv2_src, "hpsv2", "src", "open_clip")
    package = types.ModuleType("hpsv2_open_clip")
    package.__path__ = [folder]
    sys.modules["hpsv2_open_clip"] = package
    spec = importlib.util.spec_from_file_location("hpsv2_open_clip.transform", os.path.join(folder, "transform.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hpsv2-src", required=True, help="a checkout of tgxs002/HPSv2")
    args = parser.parse_args(argv)
    from official_code import resize_tensors_as_torchvision_0_16, verdict
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    from rglcd_fast.reward import preprocess
    from rglcd_fast.reward.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    resize_tensors_as_torchvision_0_16()
    bicubic = InterpolationMode.BICUBIC
    clip_normalize = Normalize(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    clip_resize = Resize(224, interpolation=bicubic)  # reward_fn.py's CLIP_RESIZE
    hps = hpsv2_transform_module(args.hpsv2_src).image_transform(224, is_train=False, resize_longest_max=True)
    official = {
        "CLIP family, aesthetic (CLIP_RESIZE + CLIP_NORMALIZE)": (Compose([clip_resize, clip_normalize]), "crop"),
        "ImageReward (Resize + CenterCrop + normalise)": (
            Compose([clip_resize, CenterCrop(224), clip_normalize]),
            "crop",
        ),
        "HPSv2 (preprocess_val.transforms[2:])": (Compose(hps.transforms[2:]), "pad"),
    }
    sizes = [(512, 512), (768, 768), (300, 300), (224, 224), (512, 768), (600, 333), (97, 401)]
    torch.manual_seed(0)
    worst = 0.0
    for name, (transform, fit) in official.items():
        for h, w in sizes:
            if fit == "crop" and "CenterCrop" not in name and h != w:
                continue  # CLIP_RESIZE alone leaves a non-square image non-square: the official runs square ones
            images = torch.rand(2, 3, h, w, dtype=torch.float64)
            theirs = torch.stack([transform(image) for image in images])  # image by image, as the score functions
            ours = preprocess(images, 224, fit=fit)
            error = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
            worst = max(worst, error)
            print(f"{name}, {h}×{w}: {tuple(theirs.shape[1:])}, max |ours - official| = {error:.1e}")
    return verdict(worst, 1e-9)


if __name__ == "__main__":
    sys.exit(main())
