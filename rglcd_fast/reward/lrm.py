"""The latent proxy reward model (LRM, DESIGN.md §1 steps 8-9): a CLIP-like model whose image tower reads
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
WEIGHTS_NAME = "model.safetensors"


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


class LatentRewardModel(nn.Module):
    """CLIP-like reward model over VAE latents ([B, C, h, w], divided by the VAE scaling factor).

    text_config: a transformers CLIPTextConfig (or its dict); embed_dim: the joint embedding size;
    tokenizer: optional CLIPTokenizer used when prompts are strings. ``reward(latents, prompts_or_ids)`` -> [B]
    float32 = cos(image_emb, text_emb) (also ``forward``); ``logits`` = exp(logit_scale)·cos, through the fused
    reward head; logit_scale is learnable, initialised at log(1/0.07) as CLIP's."""

    def __init__(self, text_config, embed_dim=512, latent_channels=4, widths=(64, 128, 256), groups=32,
                 tokenizer=None, logit_scale_init=math.log(1 / 0.07)):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if isinstance(text_config, dict):
            text_config = CLIPTextConfig(**text_config)
        self.config = {"embed_dim": embed_dim, "latent_channels": latent_channels, "widths": list(widths),
                       "groups": groups, "logit_scale_init": logit_scale_init}
        self.image_encoder = LatentImageEncoder(latent_channels, tuple(widths), embed_dim, groups)
        self.text_model = CLIPTextModel(text_config)
        self.text_projection = nn.Linear(text_config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.tokenizer = tokenizer

    @property
    def text_config(self):
        return self.text_model.config

    # -- towers -------------------------------------------------------------------------------------
    def tokenize(self, prompts):
        if self.tokenizer is None:
            raise ValueError("LatentRewardModel: prompts are strings but the model has no tokenizer; "
                             "pass token ids or set .tokenizer")
        max_length = min(self.tokenizer.model_max_length, self.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt")
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

    def preference_loss(self, latent_candidates, prompts, expert_logits, kind="kl", real_index=None,
                        smooth_gt_label=False):
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
        return pairwise_preference_loss(scores, expert_logits.detach().to(device=scores.device, dtype=scores.dtype),
                                        kind, real_index=real_index, smooth_gt_label=smooth_gt_label)

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
        model.text_model.load_state_dict(clip.text_model.state_dict())
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
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return folder

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
        model = cls(text_config, tokenizer=tokenizer, **config)
        model.load_state_dict(load_file(os.path.join(folder, WEIGHTS_NAME)))
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model.to(device) if device is not None else model
