"""The latent proxy reward model (LRM, docs/design.md §1 steps 8-9): a CLIP-like model whose image tower reads
VAE latents (already divided by the VAE scaling factor) and whose text tower is a transformers
CLIPTextModel + projection. As the official RG-LCD code: the student's reward is the plain cosine
cos(image_emb, text_emb) (scale-free, so reward_scale keeps its meaning while the learnable logit scale moves);
the preference loss compares logits = exp(logit_scale)·cos."""

import json
import math
import os

import torch
from torch import nn

from ..ops import pairwise_preference_loss, reward_head

CONFIG_NAME = "lrm_config.json"
IMAGE_TOWERS = ("conv", "vit")
# How prompts become tokens: the tokenizer's own way, or open_clip's (the official LRM's: see tokenize)
TEXT_PREPROCESSING = ("transformers", "open_clip")
WEIGHTS_NAME = "model.safetensors"
_NESTED, _FLAT = "text_model.text_model.", "text_model."  # LRM state keys of the text transformer


CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial logit scale


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class LatentImageEncoder(nn.Module):
    """conv_in → per width: a residual block (GroupNorm/SiLU/conv) then a stride-2 downsample (not after
    the last) → GroupNorm/SiLU → global average pool → Linear to embed_dim."""

    def __init__(self, latent_channels=4, widths=(64, 128, 256), embed_dim=512, groups=32):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_ResBlock(cin, w, groups))
            if i < len(widths) - 1:
                blocks.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(min(groups, cin), cin)
        self.act = nn.SiLU()
        self.proj = nn.Linear(cin, embed_dim)

    def forward(self, latents):
        h = self.blocks(self.conv_in(latents))
        h = self.act(self.norm_out(h)).mean(dim=(-2, -1))
        return self.proj(h)

    def lock_groups(self):
        """The tower's parts from input to output, for freezing the first ones (as open_clip's lock)."""
        return [[self.conv_in], *self.blocks[:-1], [self.blocks[-1], self.norm_out], [self.proj]]


class _ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (GELU, 4× width)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + self.out(attended)
        return x + self.mlp(self.ln_2(x))


class LatentViTEncoder(nn.Module):
    """A ViT over latents, as the official RG-LCD latent_ViT (open_clip's VisionTransformer with 4 input
    channels: patch 4 over SD's 64×64 latents, width 512, 12 layers): patch embedding (a strided conv) →
    class token + learned positions → LayerNorm → pre-norm transformer blocks → LayerNorm of the class
    token → Linear to embed_dim. Latents of another size than latent_size interpolate the position grid
    (bicubic)."""

    def __init__(self, latent_channels=4, embed_dim=512, latent_size=64, patch_size=4, width=512, layers=12, heads=8):
        super().__init__()
        if latent_size % patch_size or width % heads:
            raise ValueError(
                f"vit_config: latent_size ({latent_size}) must be a multiple of patch_size "
                f"({patch_size}) and width ({width}) of heads ({heads})"
            )
        self.grid = latent_size // patch_size
        self.conv_in = nn.Conv2d(latent_channels, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(_ViTBlock(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def _positions(self, h, w):
        if (h, w) == (self.grid, self.grid):
            return self.positional_embedding
        cls, grid = self.positional_embedding[:1], self.positional_embedding[1:]
        grid = grid.T.reshape(1, -1, self.grid, self.grid)
        grid = nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.reshape(-1, h * w).T])

    def forward(self, latents):
        x = self.conv_in(latents)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self._positions(h, w).to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))

    def lock_groups(self):
        """open_clip's VisionTransformer.lock groups: [patch embedding, class token, positions, ln_pre],
        every block but the last, [last block, ln_post], the projection."""
        return [
            [self.conv_in, self.class_embedding, self.positional_embedding, self.ln_pre],
            *self.blocks[:-1],
            [self.blocks[-1], self.ln_post],
            [self.proj],
        ]


def _set_trainable(parts, trainable):
    for part in parts:
        for p in [part] if isinstance(part, nn.Parameter) else part.parameters():
            p.requires_grad_(trainable)


class LatentRewardModel(nn.Module):
    """CLIP-like reward model over VAE latents ([B, C, h, w], divided by the VAE scaling factor).

    text_config: a transformers CLIPTextConfig (or its dict); embed_dim: the joint embedding size;
    tokenizer: optional CLIPTokenizer used when prompts are strings. ``reward(latents, prompts_or_ids)`` -> [B]
    float32 = cos(image_emb, text_emb) (also ``forward``); ``logits`` = exp(logit_scale)·cos, through the fused
    reward head; logit_scale is learnable, initialised at log(1/0.07) as CLIP's."""

    def __init__(
        self,
        text_config,
        embed_dim=512,
        latent_channels=4,
        widths=(64, 128, 256),
        groups=32,
        tokenizer=None,
        logit_scale_init=CLIP_LOGIT_SCALE_INIT,
        image_tower="conv",
        vit_config=None,
        text_preprocessing="transformers",
    ):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if isinstance(text_config, dict):
            text_config = CLIPTextConfig(**text_config)
        if image_tower not in IMAGE_TOWERS:
            raise ValueError(f"image_tower: expected one of {', '.join(IMAGE_TOWERS)}, got {image_tower!r}")
        if text_preprocessing not in TEXT_PREPROCESSING:
            raise ValueError(
                f"text_preprocessing: expected one of {', '.join(TEXT_PREPROCESSING)}, got {text_preprocessing!r}"
            )
        self.config = {
            "embed_dim": embed_dim,
            "latent_channels": latent_channels,
            "widths": list(widths),
            "groups": groups,
            "logit_scale_init": logit_scale_init,
            "image_tower": image_tower,
            "vit_config": dict(vit_config or {}),
            "text_preprocessing": text_preprocessing,
        }
        if image_tower == "conv":
            self.image_encoder = LatentImageEncoder(latent_channels, tuple(widths), embed_dim, groups)
        else:
            self.image_encoder = LatentViTEncoder(latent_channels, embed_dim, **self.config["vit_config"])
        self.text_model = CLIPTextModel(text_config)
        self.text_projection = nn.Linear(text_config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.tokenizer = tokenizer

    @property
    def text_config(self):
        return self.text_model.config

    @property
    def text_transformer(self):
        """The text tower's transformer (transformers 4.x nests it in CLIPTextModel.text_model, 5.x does not)."""
        return getattr(self.text_model, "text_model", self.text_model)

    # -- towers -------------------------------------------------------------------------------------
    def tokenize(self, prompts):
        if self.tokenizer is None:
            raise ValueError(
                "LatentRewardModel: prompts are strings but the model has no tokenizer; "
                "pass token ids or set .tokenizer"
            )
        max_length = min(self.tokenizer.model_max_length, self.text_config.max_position_embeddings)
        prompts, options = list(prompts), {}
        if self.config["text_preprocessing"] == "open_clip":
            from .open_clip_lrm import open_clip_clean

            # open_clip's SimpleTokenizer: its cleaning, and no special token matched inside the text (SD 2.1's
            # tokenizer pads with "!", which transformers would otherwise split out of "!!")
            prompts, options = [open_clip_clean(p) for p in prompts], dict(split_special_tokens=True)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt", **options
        )
        return tokens.input_ids.to(self.logit_scale.device)

    def encode_text(self, prompts_or_input_ids):
        ids = prompts_or_input_ids
        if isinstance(ids, str):
            ids = [ids]
        if not torch.is_tensor(ids):
            ids = self.tokenize(ids)
        pooled = self.text_model(input_ids=ids.to(self.logit_scale.device)).pooler_output
        return self.text_projection(pooled)

    def encode_latents(self, latents):
        p = self.logit_scale
        return self.image_encoder(latents.to(device=p.device, dtype=self.image_encoder.proj.weight.dtype))

    # -- freezing (as the official code's lock_image_tower / lock_text_tower) ------------------------
    def default_unlocked_text_layers(self) -> int:
        """The official 5 of the 24 blocks of its ViT-H-14 text tower, scaled to this tower's depth (>= 1)."""
        return max(1, round(5 * self.text_config.num_hidden_layers / 24))

    def lock(self, unlocked_image_groups=2, unlocked_text_layers=None):
        """Freeze all but the last parts, as the official fine-tuning: the image tower's last
        ``unlocked_image_groups`` groups stay trainable (its lock_groups(): 2 = the last block with its final
        norm, and the projection), the text tower's last ``unlocked_text_layers`` transformer layers with the
        final LayerNorm and the text projection (None: default_unlocked_text_layers(); 0 freezes the whole
        text side). The logit scale stays trainable. Returns self."""
        image_groups = self.image_encoder.lock_groups()
        if not 0 <= unlocked_image_groups <= len(image_groups):
            raise ValueError(f"unlocked_image_groups: expected 0..{len(image_groups)}, got {unlocked_image_groups}")
        layers = self.text_transformer.encoder.layers
        if unlocked_text_layers is None:
            unlocked_text_layers = self.default_unlocked_text_layers()
        if not 0 <= unlocked_text_layers <= len(layers):
            raise ValueError(f"unlocked_text_layers: expected 0..{len(layers)}, got {unlocked_text_layers}")
        _set_trainable([self.image_encoder, self.text_model, self.text_projection], False)
        _set_trainable([m for group in image_groups[len(image_groups) - unlocked_image_groups :] for m in group], True)
        if unlocked_text_layers:
            _set_trainable(
                [
                    *layers[len(layers) - unlocked_text_layers :],
                    self.text_transformer.final_layer_norm,
                    self.text_projection,
                ],
                True,
            )
        return self

    def _scores(self, latents, prompts_or_input_ids, scale):
        u = self.encode_latents(latents).float()
        v = self.encode_text(prompts_or_input_ids).float()
        if v.shape[0] == 1 and u.shape[0] > 1:
            v = v.expand(u.shape[0], -1)
        return reward_head(u, v, scale)

    def reward(self, latents, prompts_or_input_ids):
        """[B] float32: cos(image_emb(latents), text_emb(prompts)), the student's reward."""
        return self._scores(latents, prompts_or_input_ids, 1.0)

    def logits(self, latents, prompts_or_input_ids):
        """[B] float32: exp(logit_scale)·cos(image_emb(latents), text_emb(prompts))."""
        return self._scores(latents, prompts_or_input_ids, self.logit_scale.float().exp())

    def forward(self, latents, prompts_or_input_ids):
        return self.reward(latents, prompts_or_input_ids)

    def preference_loss(
        self, latent_candidates, prompts, expert_logits, kind="kl", real_index=None, smooth_gt_label=False
    ):
        """LRM update loss (§1 step 9). latent_candidates: K tensors [B, C, h, w] (latents / scaling
        factor); expert_logits [K, B] (the expert RM's logits, a target: detached). The text is encoded
        once. Returns (loss, accuracy) from ops.pairwise_preference_loss (kind, real_index and
        smooth_gt_label as there)."""
        if len(latent_candidates) < 2:
            raise ValueError(f"latent_candidates: expected K >= 2 tensors, got {len(latent_candidates)}")
        k, b = len(latent_candidates), latent_candidates[0].shape[0]
        if tuple(expert_logits.shape) != (k, b):
            raise ValueError(f"expert_logits: expected shape {(k, b)}, got {tuple(expert_logits.shape)}")
        u = self.encode_latents(torch.cat(list(latent_candidates), 0)).float().view(k, b, -1)
        v = self.encode_text(prompts).float()
        scores = reward_head(u, v.expand(b, -1) if v.shape[0] == 1 else v, self.logit_scale.float().exp())
        return pairwise_preference_loss(
            scores,
            expert_logits.detach().to(device=scores.device, dtype=scores.dtype),
            kind,
            real_index=real_index,
            smooth_gt_label=smooth_gt_label,
        )

    # -- construction / persistence -----------------------------------------------------------------
    @classmethod
    def from_clip(cls, clip, tokenizer=None, **kwargs):
        """Start the text tower and text projection from an image-space CLIPModel (or its folder, whose
        tokenizer is loaded too when present); the latent image tower is fresh. embed_dim defaults to the
        CLIP projection_dim; other kwargs go to __init__."""
        from transformers import CLIPModel

        if isinstance(clip, (str, os.PathLike)):
            folder = str(clip)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"LatentRewardModel.from_clip: CLIP folder not found: {folder}")
            clip = CLIPModel.from_pretrained(folder)
            if tokenizer is None:
                from .experts import _load_clip_tokenizer

                try:
                    tokenizer = _load_clip_tokenizer(folder)
                except FileNotFoundError:
                    tokenizer = None
        kwargs.setdefault("embed_dim", clip.config.projection_dim)
        model = cls(clip.config.text_config.to_dict(), tokenizer=tokenizer, **kwargs)
        model.text_transformer.load_state_dict(clip.text_model.state_dict())
        if model.text_projection.weight.shape == clip.text_projection.weight.shape:
            model.text_projection.load_state_dict(clip.text_projection.state_dict())
        return model.to(clip.logit_scale.device)

    def save_pretrained(self, folder):
        """folder/lrm_config.json (image tower settings + text_config) and folder/model.safetensors; the
        tokenizer too when the model has one."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        config = dict(self.config, text_config=self.text_config.to_dict())
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, default=str)
        # the file's keys as transformers 5 names them (4.x nests the text transformer one level deeper)
        state = {k.replace(_NESTED, _FLAT, 1): v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return folder

    def load_flat_state_dict(self, state):
        """load_state_dict (strict) of a state whose text transformer keys are transformers 5's, as
        save_pretrained writes them (on transformers 4.x they nest one level deeper)."""
        if any(k.startswith(_NESTED) for k in self.state_dict()):
            state = {k.replace(_FLAT, _NESTED, 1) if not k.startswith(_NESTED) else k: v for k, v in state.items()}
        self.load_state_dict(state)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None):
        from safetensors.torch import load_file

        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LatentRewardModel: no {CONFIG_NAME} in {folder}")
        with open(path) as f:
            config = json.load(f)
        tokenizer = None
        if os.path.isfile(os.path.join(folder, "vocab.json")) or os.path.isfile(os.path.join(folder, "tokenizer.json")):
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(folder)
        text_config = config.pop("text_config")
        model = cls(text_config, tokenizer=tokenizer, **config)  # folders before image_tower: a conv tower
        model.load_flat_state_dict(load_file(os.path.join(folder, WEIGHTS_NAME)))
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model.to(device) if device is not None else model
