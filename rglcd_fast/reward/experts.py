"""Expert (pixel-space) reward model adapters, each loading a real model from local files.

CLIP family (transformers ``CLIPModel``): ``ClipScore`` (score = cos, logit_scale = exp(CLIP's)),
``PickScore`` (score = exp(logit_scale)·cos as PickScore defines it, logit_scale = 1), ``AestheticScore``
(the LAION aesthetic MLP on normalised CLIP image embeddings; text-independent; logit_scale = 1).
Optional extras, imported only when chosen: ``HPSv2`` (open_clip; score = 100·cos as HPSv2 reports it,
logit_scale = exp(model's)/100 so logits = exp(logit_scale)·cos) and ``ImageReward`` (image-reward).
Every ``score`` returns float32 [B]; ``logits == logit_scale * score``.
"""
import glob
import json
import os

import torch

from ..ops import reward_head
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RewardModel, preprocess


def _dtype_kwargs(dtype):
    return {} if dtype is None else {"dtype": dtype}


def _read_image_processor(folder, default_size):
    """(size, mean, std) from a CLIPImageProcessor's preprocessor_config.json, if the folder has one."""
    size, mean, std = default_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
        crop = cfg.get("crop_size", cfg.get("size"))
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"]) if "height" in crop else crop.get("shortest_edge", default_size)
        size = crop if crop is not None else default_size
        mean = tuple(cfg.get("image_mean", mean))
        std = tuple(cfg.get("image_std", std))
    return size, mean, std


def _load_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    for candidate in (folder, os.path.join(folder, "tokenizer")):
        if os.path.isfile(os.path.join(candidate, "vocab.json")) or os.path.isfile(
                os.path.join(candidate, "tokenizer.json")):
            return CLIPTokenizer.from_pretrained(candidate)
    raise FileNotFoundError(f"no CLIP tokenizer (vocab.json/merges.txt or tokenizer.json) in {folder} "
                            f"or {os.path.join(folder, 'tokenizer')}")


class _CLIPReward(RewardModel):
    """Shared machinery of the transformers-CLIP adapters: model, tokenizer, preprocessing."""

    def __init__(self, model, tokenizer=None, image_size=None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size if image_size is not None else model.config.vision_config.image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.freeze()

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None, **kwargs):
        from transformers import CLIPModel

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{cls.__name__}: CLIP model folder not found: {folder}")
        model = CLIPModel.from_pretrained(folder, **_dtype_kwargs(dtype))
        size, mean, std = _read_image_processor(folder, model.config.vision_config.image_size)
        out = cls(model, _load_clip_tokenizer(folder), size, mean, std, **kwargs)
        return out.to(device) if device is not None else out

    def preprocess(self, images):
        return preprocess(images.to(self.device), self.image_size, self.mean, self.std, dtype=self.dtype)

    def image_features(self, images):
        return self.model.get_image_features(pixel_values=self.preprocess(images)).pooler_output

    def text_features(self, prompts):
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        return self.model.get_text_features(input_ids=tokens.input_ids,
                                            attention_mask=tokens.attention_mask).pooler_output

    def cosine(self, images, prompts):
        """cos(image, text) [B] in float32, through the package's reward head with scale 1."""
        prompts = self._check_prompts(images, prompts)
        u = self.image_features(images).float()
        v = self.text_features(prompts).float()
        return reward_head(u, v, 1.0)

    @property
    def clip_logit_scale(self):
        return self.model.logit_scale.detach().float().exp()


class ClipScore(_CLIPReward):
    """CLIP score: score = cos(image, text) in [-1, 1]; logit_scale = exp(CLIP's logit_scale);
    logits = exp(logit_scale)·cos."""

    name = "clip"

    def score(self, images, prompts):
        return self.cosine(images, prompts)

    @property
    def logit_scale(self):
        return self.clip_logit_scale

    def logits(self, images, prompts):
        prompts = self._check_prompts(images, prompts)
        u = self.image_features(images).float()
        v = self.text_features(prompts).float()
        return reward_head(u, v, self.clip_logit_scale)


class PickScore(_CLIPReward):
    """PickScore (a CLIP-H fine-tune, loaded with CLIPModel.from_pretrained): score =
    exp(logit_scale)·cos as PickScore defines it; logit_scale = 1, so logits = score."""

    name = "pickscore"

    def score(self, images, prompts):
        prompts = self._check_prompts(images, prompts)
        u = self.image_features(images).float()
        v = self.text_features(prompts).float()
        return reward_head(u, v, self.clip_logit_scale)


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor MLP (improved-aesthetic-predictor), same parameter names
    (layers.0/2/4/6/7) as its published state dict. Reads L2-normalised CLIP image embeddings."""

    def __init__(self, input_size=768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, embeddings):
        return self.layers(embeddings)

    @classmethod
    def from_file(cls, path, map_location="cpu"):
        """Load from a .pth/.pt/.bin (torch.save'd state dict) or .safetensors file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"aesthetic head file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path, device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
            state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if "layers.0.weight" not in state:
            raise ValueError(f"{path}: not an aesthetic predictor state dict (no layers.0.weight)")
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head

    def save(self, path):
        """Save the state dict as .safetensors (by extension) or with torch.save."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(state, path)
        else:
            torch.save(state, path)


AESTHETIC_HEAD_NAMES = ("aesthetic_head.safetensors", "aesthetic_head.pth", "sac+logos+ava1-l14-linearMSE.pth")


class AestheticScore(_CLIPReward):
    """LAION aesthetic score: head(normalise(CLIP image embedding)); prompts are ignored; logit_scale = 1.
    ``from_pretrained(folder, head_path=None)``: folder holds the CLIP model (ViT-L/14 for the real head);
    head_path defaults to one of AESTHETIC_HEAD_NAMES in that folder."""

    name = "aesthetic"

    def __init__(self, model, tokenizer=None, image_size=None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 head=None):
        if head is None:
            raise ValueError("AestheticScore: head (an AestheticHead) is required")
        if head.input_size != model.config.projection_dim:
            raise ValueError(f"AestheticScore: head reads {head.input_size}-dim embeddings, the CLIP model "
                             f"gives {model.config.projection_dim}")
        super().__init__(model, tokenizer, image_size, mean, std)
        self.head = head.to(device=self.device, dtype=self.dtype)
        self.freeze()

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None, head_path=None):
        from transformers import CLIPModel

        if head_path is None:
            found = [os.path.join(folder, n) for n in AESTHETIC_HEAD_NAMES if os.path.isfile(os.path.join(folder, n))]
            if not found:
                raise FileNotFoundError(f"AestheticScore: no head file ({', '.join(AESTHETIC_HEAD_NAMES)}) in "
                                        f"{folder}; pass head_path=")
            head_path = found[0]
        head = AestheticHead.from_file(head_path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"AestheticScore: CLIP model folder not found: {folder}")
        model = CLIPModel.from_pretrained(folder, **_dtype_kwargs(dtype))
        size, mean, std = _read_image_processor(folder, model.config.vision_config.image_size)
        out = cls(model, None, size, mean, std, head=head)
        return out.to(device) if device is not None else out

    def score(self, images, prompts=None):
        if prompts is not None:
            self._check_prompts(images, prompts)
        u = self.image_features(images)
        u = u / u.norm(dim=-1, keepdim=True)
        return self.head(u.to(self.dtype)).squeeze(-1).float()


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("HPSv2 needs open_clip, an optional extra: `pip install open_clip_torch` "
                          f"(it also needs torchvision and timm importable beside torch); import failed: {e}") from e
    return open_clip


class HPSv2(RewardModel):
    """HPSv2 / HPSv2.1 via open_clip: ``from_pretrained(checkpoint, model_name="ViT-H-14")`` builds the
    open_clip model (no pretrained download) and loads the local checkpoint (HPS_v2*.pt, a state dict or
    {"state_dict": ...}). score = 100·cos as HPSv2 reports it; logit_scale = exp(model's)/100, so
    logits = exp(logit_scale)·cos."""

    name = "hpsv2"

    def __init__(self, model, tokenizer, image_size=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.freeze()

    @classmethod
    def from_pretrained(cls, checkpoint, device=None, dtype=None, model_name="ViT-H-14"):
        open_clip = _import_open_clip()
        if os.path.isdir(checkpoint):
            files = sorted(glob.glob(os.path.join(checkpoint, "*.pt")) + glob.glob(os.path.join(checkpoint, "*.bin"))
                           + glob.glob(os.path.join(checkpoint, "*.safetensors")))
            if len(files) != 1:
                raise FileNotFoundError(f"HPSv2: expected one checkpoint (.pt/.bin/.safetensors) in {checkpoint}, "
                                        f"found {files}")
            checkpoint = files[0]
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"HPSv2: checkpoint not found: {checkpoint}")
        model = open_clip.create_model(model_name, pretrained=None)
        if checkpoint.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            state = state.get("state_dict", state)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        size = getattr(model.visual, "image_size", 224)
        mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
        out = cls(model, open_clip.get_tokenizer(model_name), size, mean, std)
        if dtype is not None:
            out = out.to(dtype=dtype)
        return out.to(device) if device is not None else out

    def _cosine(self, images, prompts):
        prompts = self._check_prompts(images, prompts)
        x = preprocess(images.to(self.device), self.image_size, self.mean, self.std, dtype=self.dtype)
        u = self.model.encode_image(x).float()
        v = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
        return reward_head(u, v, 1.0)

    def score(self, images, prompts):
        return self._cosine(images, prompts) * 100.0

    @property
    def logit_scale(self):
        return self.model.logit_scale.detach().float().exp() / 100.0


class ImageReward(RewardModel):
    """ImageReward via the optional ``image-reward`` package: ``from_pretrained(checkpoint, med_config=)``
    (ImageReward.pt and its med_config.json, both local). score = the model's normalised reward
    ((r − mean)/std); logit_scale = 1. Differentiable in the images (its ``score_gard`` path)."""

    name = "imagereward"

    def __init__(self, model, image_size=224):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.freeze()

    @classmethod
    def from_pretrained(cls, checkpoint, device=None, dtype=None, med_config=None):
        try:
            import ImageReward as reward_lib
        except ImportError as e:
            raise ImportError("ImageReward needs the optional `image-reward` package (`pip install image-reward`); "
                              "it pins old timm and fairscale versions, so it may need its own environment; "
                              f"import failed: {e}") from e
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"ImageReward: checkpoint not found: {checkpoint}")
        if med_config is None:
            guess = os.path.join(os.path.dirname(checkpoint) if os.path.isfile(checkpoint) else checkpoint,
                                 "med_config.json")
            if not os.path.isfile(guess):
                raise FileNotFoundError(f"ImageReward: med_config.json not found beside {checkpoint}; pass med_config=")
            med_config = guess
        if os.path.isdir(checkpoint):
            checkpoint = os.path.join(checkpoint, "ImageReward.pt")
        model = reward_lib.load(checkpoint, device=str(device or "cpu"), med_config=med_config)
        out = cls(model)
        if dtype is not None:
            out = out.to(dtype=dtype)
        return out

    def score(self, images, prompts):
        prompts = self._check_prompts(images, prompts)
        x = preprocess(images.to(self.device), self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, dtype=self.dtype)
        tokens = self.model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                                           return_tensors="pt").to(self.device)
        return self.model.score_gard(tokens.input_ids, tokens.attention_mask, x).reshape(-1).float()


REWARD_MODELS = {"clip": ClipScore, "pickscore": PickScore, "aesthetic": AestheticScore, "hpsv2": HPSv2,
                 "imagereward": ImageReward}


def load_reward_model(name, path, device=None, dtype=None, **kwargs) -> RewardModel:
    """Load an expert reward model by name (clip, pickscore, aesthetic, hpsv2, imagereward, digits) from a
    local path (a CLIP folder; for hpsv2/imagereward a checkpoint file or its folder; for digits, the digits
    world's classifier folder, None: the shipped one). Extra keyword arguments go to the adapter's
    from_pretrained (aesthetic: head_path; hpsv2: model_name; imagereward: med_config)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key == "digits":  # the embedded world's expert (imported here: the world builds on this package)
        from ..world.classifiers import WEIGHTS_DIR, DigitReward
        path = WEIGHTS_DIR if path is None else path
        if not os.path.isdir(path):
            raise FileNotFoundError(f"reward model 'digits': folder not found: {path}")
        return DigitReward.from_pretrained(path, **kwargs).to(device=device, dtype=dtype)
    if key not in REWARD_MODELS:
        raise ValueError(f"unknown reward model {name!r}; expected one of: {', '.join(REWARD_MODELS)}, digits")
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"reward model {key!r}: path not found: {path}")
    return REWARD_MODELS[key].from_pretrained(path, device=device, dtype=dtype, **kwargs)
