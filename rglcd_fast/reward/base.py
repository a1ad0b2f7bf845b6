"""The expert reward model interface and torch-only image preprocessing.

Two quantities per reward model, as the official RG-LCD reward functions return them (docs/fidelity.md):
  * ``reward(images, prompts) -> [B]``: what the student maximises (the official ``return_logits=False``),
    scale-free: the plain cosine for the CLIP family, ImageReward's min(r, 2), the aesthetic rating.
  * ``logits(images, prompts) -> [B]``: what the latent reward model's pairwise preference loss compares
    (``return_logits=True``; docs/design.md §1 step 9): the cosine × exp(the model's logit scale) for the CLIP
    family, the reward itself where the model has no logit scale.
Each adapter writes both once, in ``reward_and_logits``. Images are float tensors [B, 3, H, W] in [0, 1];
the models are frozen (eval mode, no gradient to their weights) but differentiable with respect to the
images (the "direct" reward variant).
"""

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, dtype=None, fit="crop"):
    """The official reward functions' image transforms, with torch ops only (differentiable in the images).
    They run torchvision 0.16 (the official README pins 0.16.2), whose tensor resize does not antialias
    (``antialias="warn"``: off for tensors, on only from 0.17), so neither does this one.

    fit="crop": ``Resize(size, BICUBIC)`` (the shortest side to ``size``, the other truncated as torchvision)
    + ``CenterCrop`` + ``Normalize``: the CLIP family and ImageReward (the crop is a no-op on square images).
    fit="pad": HPSv2's ``ResizeMaxSize(size)`` (the longest side to ``size``, bicubic, zeros padded around to
    size×size) + ``Normalize``: what the official script's ``preprocess_val.transforms[2:]`` is.
    images [B, 3, H, W] in [0, 1]; size an int or (h, w) (crop only). Returns [B, 3, h, w] in ``dtype``
    (default: the images')."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images: expected a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a float tensor in [0, 1], got {images.dtype}")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit: expected 'crop' or 'pad', got {fit!r}")
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    h, w = x.shape[-2:]
    if fit == "pad":
        if out_h != out_w:
            raise ValueError(f"size: fit='pad' resizes to a square (an int), got {size}")
        scale = out_h / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)  # Python's round, as ResizeMaxSize
    elif h / out_h <= w / out_w:  # the shortest side (relative to the output) to its size, as torchvision
        new_h, new_w = out_h, max(out_w, int(out_h * w / h))
    else:
        new_h, new_w = max(out_h, int(out_w * h / w)), out_w
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=False)
    if fit == "pad":  # left/top get the smaller half, as ResizeMaxSize's F.pad
        pad_h, pad_w = out_h - new_h, out_w - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    else:
        top, left = int(round((new_h - out_h) / 2)), int(round((new_w - out_w) / 2))  # as CenterCrop
        x = x[..., top : top + out_h, left : left + out_w]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - mean_t) / std_t
    return x.to(dtype) if dtype is not None else x.to(images.dtype)


class RewardModel(torch.nn.Module):
    """A frozen expert reward model. Subclasses implement ``reward_and_logits``."""

    name = "reward"
    # True where the official code scales this expert's preference logits by the LRM's exp(logit_scale)
    # (ImageReward): the LRM update multiplies ``logits`` by it.
    logits_use_lrm_scale = False

    def freeze(self):
        """Eval mode and no gradient to the weights (images stay differentiable)."""
        super().train(False)
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        # An expert stays in eval mode (dropout off) whatever the caller's module tree asks.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def reward_and_logits(self, images: torch.Tensor, prompts):  # pragma: no cover - abstract
        """(reward [B], logits [B]), both float32."""
        raise NotImplementedError

    def image_encoders(self) -> list:
        """The modules that encode the images, most of an expert's time: what `--compile-unets` compiles with a
        reward on. An expert that names none (the default, e.g. a user's own) stays eager."""
        return []

    def reward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return self.reward_and_logits(images, prompts)[0]

    def logits(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return self.reward_and_logits(images, prompts)[1]

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return self.reward(images, prompts)

    @staticmethod
    def _check_prompts(images, prompts):
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: expected {images.shape[0]} (one per image), got {len(prompts)}")
        return prompts
