"""Expert (pixel-space) reward model adapters, each loading a real model from local files, with the units of
the official RG-LCD reward functions (reward_fn.py; docs/fidelity.md has the table):

| expert | reward (the student's) | logits (the LRM update's) |
|---|---|---|
| ``ClipScore``, ``PickScore``, ``HPSv2`` | cos(image, text) | exp(logit_scale)·cos |
| ``ImageReward`` | −relu(2 − r) = min(r, 2) − 2 | the same × the LRM's exp(logit_scale) |
| ``AestheticScore`` (LAION linear head) | the rating | the rating |
| ``WeightedReward`` (HPSv2 + 0.1·ImageReward) | Σ w·reward | Σ w·logits |

``AestheticMLPScore`` keeps the improved-aesthetic-predictor MLP under its own name. HPSv2 (open_clip) and
ImageReward (image-reward) are optional extras, imported only when chosen.
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


def _pooled(output):
    """get_image_features / get_text_features: a tensor in transformers 4.x, an output object whose
    pooler_output is the projected embedding in 5.x."""
    return output if torch.is_tensor(output) else output.pooler_output


def _load_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    for candidate in (folder, os.path.join(folder, "tokenizer")):
        if os.path.isfile(os.path.join(candidate, "vocab.json")) or os.path.isfile(
            os.path.join(candidate, "tokenizer.json")
        ):
            return CLIPTokenizer.from_pretrained(candidate)
    raise FileNotFoundError(
        f"no CLIP tokenizer (vocab.json/merges.txt or tokenizer.json) in {folder} "
        f"or {os.path.join(folder, 'tokenizer')}"
    )


class _CLIPReward(RewardModel):
    """Shared machinery of the transformers-CLIP adapters: model, tokenizer, preprocessing, features."""

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
        return _pooled(self.model.get_image_features(pixel_values=self.preprocess(images)))

    def text_features(self, prompts):
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        return _pooled(self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))

    @property
    def clip_logit_scale(self):
        return self.model.logit_scale.detach().float().exp()

    def image_encoders(self):
        return [self.model.vision_model]


class ClipScore(_CLIPReward):
    """CLIP score: reward = cos(image, text) in [-1, 1]; logits = exp(CLIP's logit_scale)·cos. The cosine
    goes through the package's fused reward head."""

    name = "clip"

    def reward_and_logits(self, images, prompts):
        prompts = self._check_prompts(images, prompts)
        cos = reward_head(self.image_features(images).float(), self.text_features(prompts).float(), 1.0)
        return cos, cos * self.clip_logit_scale


class PickScore(ClipScore):
    """PickScore (a CLIP-H fine-tune, loaded with CLIPModel.from_pretrained): as the official RG-LCD code, the
    student's reward is the cosine and the logits are exp(logit_scale)·cos (PickScore's published score)."""

    name = "pickscore"


def load_state_file(path, what: str, containers=("state_dict",)) -> dict:
    """A state dict from .safetensors or a torch.save'd .pt/.pth/.bin (optionally under one of the keys
    `containers`, keys without DDP's "module." prefix). Pickles load with weights_only=True: tensors and plain
    containers only, so a crafted checkpoint cannot run code; one that holds other objects is refused with a way
    out, and so is one that holds no state dict of tensors."""
    import pickle

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{what}: {path} holds pickled objects besides tensors, and unpickling them could run code, so it is "
                'not loaded. If you trust the file, convert it once: python -c "import torch, safetensors.torch as s; '
                f"d = torch.load('{path}', weights_only=False); d = d.get('state_dict', d); "
                "s.save_file({k: v.contiguous() for k, v in d.items()}, "
                f"'{os.path.splitext(path)[0]}.safetensors')\" "
                f"and pass the .safetensors file ({str(error).splitlines()[0]})"
            ) from None
        for key in containers:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{what}: {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_head_state(path, required_key):
    state = load_state_file(path, "aesthetic head")
    if required_key not in state:
        raise ValueError(f"{path}: not the expected aesthetic head (no {required_key!r} in its state dict)")
    return state


def _save_state(module, path):
    """Save a state dict as .safetensors (by extension) or with torch.save."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)


class AestheticLinearHead(torch.nn.Linear):
    """The LAION aesthetic predictor of the official RG-LCD code: ``nn.Linear(768, 1)`` on L2-normalised
    CLIP ViT-L/14 image embeddings (sa_0_4_vit_l_14_linear.pth: keys weight, bias)."""

    def __init__(self, input_size=768):
        super().__init__(input_size, 1)
        self.input_size = input_size

    @classmethod
    def from_file(cls, path):
        state = _load_head_state(path, "weight")
        head = cls(state["weight"].shape[1])
        head.load_state_dict(state)
        return head

    def save(self, path):
        _save_state(self, path)


class AestheticMLPHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP (sac+logos+ava1-l14-linearMSE.pth), same parameter names
    (layers.0/2/4/6/7) as its published state dict. Reads L2-normalised CLIP image embeddings."""

    def __init__(self, input_size=768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings):
        return self.layers(embeddings)

    @classmethod
    def from_file(cls, path):
        state = _load_head_state(path, "layers.0.weight")
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head

    def save(self, path):
        _save_state(self, path)


class AestheticScore(_CLIPReward):
    """LAION aesthetic score, as the official RG-LCD code: reward = logits = the linear head's rating of the
    normalised CLIP image embedding; prompts are ignored. ``from_pretrained(folder, head_path=None)``: folder
    holds the CLIP model (ViT-L/14 for the real head); head_path defaults to one of HEAD_FILES there."""

    name = "aesthetic"
    head_class = AestheticLinearHead
    HEAD_FILES = ("aesthetic_linear.safetensors", "sa_0_4_vit_l_14_linear.pth")

    def __init__(self, model, tokenizer=None, image_size=None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, head=None):
        if head is None:
            raise ValueError(f"{type(self).__name__}: head (an {self.head_class.__name__}) is required")
        if head.input_size != model.config.projection_dim:
            raise ValueError(
                f"{type(self).__name__}: head reads {head.input_size}-dim embeddings, the CLIP model "
                f"gives {model.config.projection_dim}"
            )
        super().__init__(model, tokenizer, image_size, mean, std)
        self.head = head.to(device=self.device, dtype=self.dtype)
        self.freeze()

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None, head_path=None):
        from transformers import CLIPModel

        if head_path is None:
            found = [os.path.join(folder, n) for n in cls.HEAD_FILES if os.path.isfile(os.path.join(folder, n))]
            if not found:
                raise FileNotFoundError(
                    f"{cls.__name__}: no head file ({', '.join(cls.HEAD_FILES)}) in {folder}; pass head_path="
                )
            head_path = found[0]
        head = cls.head_class.from_file(head_path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{cls.__name__}: CLIP model folder not found: {folder}")
        model = CLIPModel.from_pretrained(folder, **_dtype_kwargs(dtype))
        size, mean, std = _read_image_processor(folder, model.config.vision_config.image_size)
        out = cls(model, None, size, mean, std, head=head)
        return out.to(device) if device is not None else out

    def reward_and_logits(self, images, prompts=None):
        if prompts is not None:
            self._check_prompts(images, prompts)
        u = self.image_features(images)
        u = u / u.norm(dim=-1, keepdim=True)
        rating = self.head(u.to(self.dtype)).squeeze(-1).float()
        return rating, rating


class AestheticMLPScore(AestheticScore):
    """The aesthetic score with the improved-aesthetic-predictor MLP instead of the official linear head."""

    name = "aesthetic_mlp"
    head_class = AestheticMLPHead
    HEAD_FILES = ("aesthetic_mlp.safetensors", "sac+logos+ava1-l14-linearMSE.pth")


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(
            "HPSv2 needs open_clip, an optional extra: `pip install open_clip_torch` "
            f"(it also needs torchvision and timm importable beside torch); import failed: {e}"
        ) from e
    return open_clip


class HPSv2(RewardModel):
    """HPSv2 / HPSv2.1 via open_clip: ``from_pretrained(checkpoint, model_name="ViT-H-14")`` builds the
    open_clip model (no pretrained download) and loads the local checkpoint (HPS_v2*.pt, a state dict or
    {"state_dict": ...}). As the official RG-LCD code: reward = cos(image, text) (HPSv2 reports 100·cos;
    the official student reward is the plain cosine), logits = exp(logit_scale)·cos. Preprocessing: the
    official script's ``preprocess_val.transforms[2:]`` (it loads HPSv2 with ``light_augmentation=True``):
    ``ResizeMaxSize(224)`` (the longest side to 224, bicubic, zero padding to a square) and normalisation
    (``preprocess(fit="pad")``)."""

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
            files = sorted(
                glob.glob(os.path.join(checkpoint, "*.pt"))
                + glob.glob(os.path.join(checkpoint, "*.bin"))
                + glob.glob(os.path.join(checkpoint, "*.safetensors"))
            )
            if len(files) != 1:
                raise FileNotFoundError(
                    f"HPSv2: expected one checkpoint (.pt/.bin/.safetensors) in {checkpoint}, found {files}"
                )
            checkpoint = files[0]
        state = load_state_file(checkpoint, "HPSv2")  # HPS_v2*_compressed.pt: tensors only, weights_only loads it
        model = open_clip.create_model(model_name, pretrained=None)
        model.load_state_dict(state)
        size = getattr(model.visual, "image_size", 224)
        mean = getattr(model.visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = getattr(model.visual, "image_std", None) or OPENAI_CLIP_STD
        out = cls(model, open_clip.get_tokenizer(model_name), size, mean, std)
        if dtype is not None:
            out = out.to(dtype=dtype)
        return out.to(device) if device is not None else out

    def reward_and_logits(self, images, prompts):
        prompts = self._check_prompts(images, prompts)
        x = preprocess(images.to(self.device), self.image_size, self.mean, self.std, dtype=self.dtype, fit="pad")
        u = self.model.encode_image(x).float()
        v = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
        cos = reward_head(u, v, 1.0)
        return cos, cos * self.model.logit_scale.detach().float().exp()

    def image_encoders(self):
        return [self.model.visual]


class ImageReward(RewardModel):
    """ImageReward via the optional ``image-reward`` package: ``from_pretrained(checkpoint, med_config=)``
    (ImageReward.pt and its med_config.json, both local). As the official RG-LCD code: reward = −relu(2 − r) =
    min(r, 2) − 2 of the model's normalised reward r = (raw − mean)/std (clipped at 2; the constant −2 changes
    neither the gradient nor a pairwise softmax); logits = the same, which the LRM update multiplies by the
    LRM's exp(logit_scale) (``logits_use_lrm_scale``). Preprocessing: bicubic resize of the shortest side
    to 224, centre crop, CLIP normalisation, as the official ``rm_preprocess``. Differentiable in
    the images (its ``score_gard`` path)."""

    name = "imagereward"
    logits_use_lrm_scale = True
    clip_at = 2.0

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
            raise ImportError(
                "ImageReward needs the optional `image-reward` package (`pip install image-reward`); "
                "it pins old timm and fairscale versions, so it may need its own environment; "
                f"import failed: {e}"
            ) from e
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"ImageReward: checkpoint not found: {checkpoint}")
        if med_config is None:
            guess = os.path.join(
                os.path.dirname(checkpoint) if os.path.isfile(checkpoint) else checkpoint, "med_config.json"
            )
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

    def reward_and_logits(self, images, prompts):
        prompts = self._check_prompts(images, prompts)
        x = preprocess(images.to(self.device), self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, dtype=self.dtype)
        tokens = self.model.blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(self.device)
        r = self.model.score_gard(tokens.input_ids, tokens.attention_mask, x).reshape(-1).float()
        r = -torch.relu(self.clip_at - r)  # the official -relu(-r + 2): NaN stays NaN
        return r, r

    def image_encoders(self):
        return [self.model.blip.visual_encoder]


class WeightedReward(RewardModel):
    """A weighted sum of experts: reward = Σ w·reward_k, logits = Σ w·logits_k. The official weighted expert
    is HPSv2 + 0.1·ImageReward (``weighted_hpsv2_imagereward``; its folder holds hpsv2/ and imagereward/).
    An expert whose logits take the LRM's scale (ImageReward) is not scaled here: its weighted logits are
    its reward as it is (the official code's weighted function has no logits at all: it cannot run the
    LRM update's distillation loss)."""

    name = "weighted"

    def __init__(self, experts, weights):
        super().__init__()
        if len(experts) != len(weights) or not experts:
            raise ValueError(f"weights: expected one weight per expert ({len(experts)}), got {len(weights)}")
        self.experts = torch.nn.ModuleList(experts)
        self.weights = tuple(float(w) for w in weights)
        self.freeze()

    def reward_and_logits(self, images, prompts):
        pairs = [expert.reward_and_logits(images, prompts) for expert in self.experts]
        reward = sum(w * r for w, (r, _) in zip(self.weights, pairs))
        logits = sum(w * lg for w, (_, lg) in zip(self.weights, pairs))
        return reward, logits

    def image_encoders(self):
        return [module for expert in self.experts for module in expert.image_encoders()]

    @classmethod
    def hpsv2_imagereward(cls, folder, device=None, dtype=None, weights=(1.0, 0.1)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"weighted_hpsv2_imagereward: folder not found: {folder}")
        return cls(
            [
                HPSv2.from_pretrained(os.path.join(folder, "hpsv2"), device=device, dtype=dtype),
                ImageReward.from_pretrained(os.path.join(folder, "imagereward"), device=device, dtype=dtype),
            ],
            weights,
        )


# name -> loader(path, device=, dtype=, **kwargs)
REWARD_MODELS = {
    "clip": ClipScore.from_pretrained,
    "pickscore": PickScore.from_pretrained,
    "aesthetic": AestheticScore.from_pretrained,
    "aesthetic_mlp": AestheticMLPScore.from_pretrained,
    "hpsv2": HPSv2.from_pretrained,
    "imagereward": ImageReward.from_pretrained,
    "weighted_hpsv2_imagereward": WeightedReward.hpsv2_imagereward,
}
# the official code's names (reward_fn.py's get_reward_fn) for the same experts
OFFICIAL_NAMES = {
    "pick": "pickscore",
    "img_reward": "imagereward",
    "weighted_hpsv2_img_reward": "weighted_hpsv2_imagereward",
}


def _canonical_name(name) -> str:
    """Our name of an expert from any spelling ('-' and '_' optional, the official code's names too)."""

    def key_of(text):
        return str(text).lower().replace("-", "").replace("_", "")

    names = {key_of(n): n for n in (*REWARD_MODELS, "digits")}
    names.update({key_of(alias): n for alias, n in OFFICIAL_NAMES.items()})
    if key_of(name) not in names:
        raise ValueError(
            f"reward_model: unknown reward model {name!r}; expected one of: {', '.join(REWARD_MODELS)}, digits"
        )
    return names[key_of(name)]


CLIP_FOLDER_EXPERTS = ("clip", "pickscore", "aesthetic", "aesthetic_mlp")


def check_reward_model_path(name, path) -> str:
    """Raises, naming the argument, where `path` cannot hold expert `name` (checked from the files alone, before
    anything is built); returns the path to load (digits: the shipped folder for None)."""
    name = _canonical_name(name)
    if name == "digits":
        from ..world.classifiers import WEIGHTS_DIR

        path = WEIGHTS_DIR if path is None else path
        if not os.path.isfile(os.path.join(path, "expert.safetensors")):
            raise FileNotFoundError(
                f"reward_model_path: the digits expert is a folder holding expert.safetensors "
                f"(the digits world's weights), got {path}"
            )
        return path
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"reward_model_path: reward model {name!r} needs a local path; not found: {path}")
    if name in CLIP_FOLDER_EXPERTS:
        config = os.path.join(path, "config.json")
        model_type = None
        if os.path.isfile(config):
            with open(config) as f:
                model_type = json.load(f).get("model_type")
        if model_type != "clip":
            raise ValueError(
                f"reward_model_path: reward model {name!r} needs a transformers CLIP folder (config.json "
                f"with model_type 'clip'); {path} holds {model_type or 'no config.json'}"
            )
    if name == "weighted_hpsv2_imagereward" and not all(
        os.path.exists(os.path.join(path, part)) for part in ("hpsv2", "imagereward")
    ):
        raise ValueError(
            f"reward_model_path: the weighted expert needs a folder holding hpsv2/ and imagereward/, got {path}"
        )
    return path


def load_reward_model(name, path, device=None, dtype=None, **kwargs) -> RewardModel:
    """Load an expert reward model by name (clip, pickscore, aesthetic, aesthetic_mlp, hpsv2, imagereward,
    weighted_hpsv2_imagereward, digits; the official code's names pick, img_reward and weighted_hpsv2_img_reward
    too; '-' and '_' optional) from a local path: a CLIP folder; for hpsv2/imagereward a checkpoint file or its
    folder; for the weighted expert a folder holding hpsv2/ and imagereward/; for digits, the digits world's
    classifier folder (None: the shipped one). Extra keyword arguments go to the loader (aesthetic: head_path;
    hpsv2: model_name; imagereward: med_config)."""
    path = check_reward_model_path(name, path)
    name = _canonical_name(name)
    if name == "digits":  # the embedded world's expert (imported here: the world builds on this package)
        from ..world.classifiers import DigitReward

        return DigitReward.from_pretrained(path, **kwargs).to(device=device, dtype=dtype)
    return REWARD_MODELS[name](path, device=device, dtype=dtype, **kwargs)
