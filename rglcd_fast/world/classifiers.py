"""The digits world's expert reward model and held-out evaluator (docs/design.md §4): two small CNN
classifiers of 32×32 digit images, trained on the two disjoint halves of the data with different
architectures and seeds. The expert rewards the student with its probability of the prompted digit (its
logit is the LRM update's logits and the evaluation's expert reward); the evaluator's
accuracy on the prompted digit and its penultimate features (for a Fréchet distance) judge samples.

Rebuild both with `python -m rglcd_fast.world.classifiers OUT_DIR` (fixed seeds); the package ships
the weights in rglcd_fast/world/weights/.
"""

import os
import re
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..reward.base import RewardModel
from .digits import DIGIT_WORDS, DigitsDataset, load_digits, split_halves

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
# name -> (channel widths, feature dim, the half it trains on, seed)
ARCHITECTURES = {"expert": ((16, 32, 64), 64, 0, 0), "evaluator": ((24, 48, 96), 128, 1, 1)}


class DigitClassifier(torch.nn.Module):
    """conv blocks (3×3 conv, GroupNorm, SiLU, 2× downsampling) -> global pool -> features -> 10 logits.
    Input: [B, 3, 32, 32] images in [-1, 1]."""

    def __init__(self, widths=(16, 32, 64), feature_dim=64):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            layers += [
                torch.nn.Conv2d(channels, width, 3, padding=1),
                torch.nn.GroupNorm(8, width),
                torch.nn.SiLU(),
                torch.nn.Conv2d(width, width, 3, stride=2, padding=1),
                torch.nn.SiLU(),
            ]
            channels = width
        self.trunk = torch.nn.Sequential(*layers)
        self.features_head = torch.nn.Linear(channels, feature_dim)
        self.classifier = torch.nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.silu(self.features_head(self.trunk(images).mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def train_classifier(name: str, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3) -> DigitClassifier:
    """Trains `name` ("expert" or "evaluator") on its half with light augmentation (shifts of up to 2
    pixels), AdamW and a cosine schedule, all from fixed seeds."""
    widths, feature_dim, half, seed = ARCHITECTURES[name]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits()
    indices = split_halves(len(labels))[half]
    data = DigitsDataset(indices)
    model = DigitClassifier(widths, feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(data) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            x = data.images[batch]
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))  # paper is +1 at the borders: rolling keeps it
            loss = F.cross_entropy(model(x), data.labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def load_classifier(name: str, folder: str = WEIGHTS_DIR) -> DigitClassifier:
    widths, feature_dim, _, _ = ARCHITECTURES[name]
    path = os.path.join(folder, f"{name}.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} weights: no file {path!r} (rebuild: python -m rglcd_fast.world.classifiers)")
    model = DigitClassifier(widths, feature_dim)
    model.load_state_dict(load_file(path))
    return model.eval()


_WORD_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b")


def prompted_digit(prompt: str) -> int:
    """The digit a prompt asks for (its digit word, e.g. "seven" -> 7)."""
    match = _WORD_PATTERN.search(prompt.lower())
    if match is None:
        raise ValueError(f"prompts: no digit word ({', '.join(DIGIT_WORDS)}) in {prompt!r}")
    return DIGIT_WORDS.index(match.group(1))


class DigitReward(RewardModel):
    """The digits world's expert RM. Images are [B, 3, H, W] in [0, 1] (the RewardModel convention), resized
    to 32×32.

    reward (the student's) = the classifier's probability of the prompted digit: bounded in [0, 1] as the
    CLIP family's cosine is in [-1, 1], and saturating once a digit is clearly the prompted one, so the
    student's reward term fades instead of pushing the logit ever higher (the over-optimisation a raw
    logit invites). logits (the LRM update's, and the evaluation table's expert reward) = the prompted
    digit's logit."""

    name = "digits"

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.freeze()

    @classmethod
    def from_pretrained(cls, folder: str = WEIGHTS_DIR, name: str = "expert") -> "DigitReward":
        return cls(load_classifier(name, folder))

    def reward_and_logits(self, images: torch.Tensor, prompts):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        prompts = self._check_prompts(images, prompts)
        targets = torch.tensor([prompted_digit(p) for p in prompts], device=images.device)
        x = images.float() * 2 - 1
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        class_logits = self.classifier(x)
        logits = class_logits.gather(1, targets[:, None])[:, 0]
        probability = class_logits.softmax(dim=1).gather(1, targets[:, None])[:, 0]
        return probability, logits

    def image_encoders(self):
        return [self.classifier]


def main(argv=None) -> int:
    folder = (argv or sys.argv[1:] or [WEIGHTS_DIR])[0]
    os.makedirs(folder, exist_ok=True)
    images, labels = load_digits()
    for name in ARCHITECTURES:
        model = train_classifier(name)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, f"{name}.safetensors")
        )
        other = split_halves(len(labels))[1 - ARCHITECTURES[name][2]]
        held_out = DigitsDataset(other)
        with torch.no_grad():
            accuracy = (model(held_out.images).argmax(1) == held_out.labels).float().mean().item()
        print(f"{name}: accuracy on the other half {accuracy:.4f}, saved to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
