"""The official RG-LCD latent reward model, read into a LatentRewardModel: an open_clip LatentCLIP checkpoint of
rg-lcd's `latent_ViT` config (a 4-channel patch-4 ViT over 64×64 latents, width 512, 12 layers, and the ViT-H-14
text tower; embed 1024). The weights map one to one: open_clip's VisionTransformer onto LatentViTEncoder, its
TextTransformer onto a transformers CLIPTextModel (the fused in_proj split into q/k/v, as transformers' own
CLIP conversion), the [width, embed] projection matrices transposed into Linear weights. Head counts are not in
the weights: open_clip's are width / 64 (its head_width) in both towers, as rg-lcd's config gives."""

import html
import os
import re
import zipfile

from .experts import load_state_file
from .lrm import LatentRewardModel

OPEN_CLIP_HEAD_WIDTH = 64
_REQUIRED = (
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "transformer.resblocks.0.mlp.c_fc.weight",
    "text_projection",
    "logit_scale",
)
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_VISION_BLOCK = {  # open_clip ResidualAttentionBlock → _ViTBlock
    "ln_1": "ln_1",
    "attn.in_proj": "qkv",
    "attn.out_proj": "out",
    "ln_2": "ln_2",
    "mlp.c_fc": "mlp.0",
    "mlp.c_proj": "mlp.2",
}
_TEXT_BLOCK = {  # open_clip ResidualAttentionBlock → transformers CLIPEncoderLayer (in_proj split below)
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_VISION = {
    "visual.conv1.weight": "image_encoder.conv_in.weight",
    "visual.class_embedding": "image_encoder.class_embedding",
    "visual.positional_embedding": "image_encoder.positional_embedding",
    "visual.ln_pre.weight": "image_encoder.ln_pre.weight",
    "visual.ln_pre.bias": "image_encoder.ln_pre.bias",
    "visual.ln_post.weight": "image_encoder.ln_post.weight",
    "visual.ln_post.bias": "image_encoder.ln_post.bias",
}
_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def open_clip_clean(text: str) -> str:
    """open_clip's tokenizer.py text cleaning before BPE: ftfy.fix_text, HTML entities unescaped twice,
    whitespace runs to one space, stripped, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def check_checkpoint_file(path: str) -> None:
    """The cheap check of a checkpoint file before any model is built: a torch zip archive or .safetensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lrm_path: no file at {path}")
    if not (path.endswith(".safetensors") or zipfile.is_zipfile(path)):
        raise ValueError(f"lrm_path: {path} is not a torch checkpoint (torch.save's zip archive) or .safetensors file")


def read_open_clip_checkpoint(path: str) -> dict:
    """The state dict of an official latent CLIP file: open_clip's training checkpoint ({"state_dict": ...},
    `module.`-prefixed under DDP), rg-lcd's `checkpoint-<step>-rm.pt` ({"latent_rm": ...}, the LRM after online
    updates), a bare state dict, or a .safetensors file."""
    check_checkpoint_file(path)
    return load_state_file(path, "lrm_path", containers=("state_dict", "latent_rm"))


def _layers(state, tower):
    """How many transformer blocks a tower has (tower: "visual." or "" for the text one)."""
    blocks = [m for m in map(_BLOCK.fullmatch, state) if m and (m[1] or "") == tower]
    return 1 + max((int(m[2]) for m in blocks), default=-1)


def lrm_from_open_clip(state: dict, tokenizer=None) -> LatentRewardModel:
    """A float32 LatentRewardModel holding an official latent_ViT LatentCLIP's weights (state: from
    read_open_clip_checkpoint, or open_clip's model.state_dict()). tokenizer: a CLIPTokenizer for its text
    tower (open_clip's ViT-H-14 tokenizer is CLIP's BPE; SD 2.1's tokenizer/ folder is one)."""
    if "visual.conv1.weight" not in state or "visual.transformer.resblocks.0.attn.in_proj_weight" not in state:
        kind = "a ModifiedResNet (latent_RN50)" if "visual.attnpool.positional_embedding" in state else "no ViT"
        raise ValueError(f"lrm_path: only open_clip latent_ViT checkpoints are read; this image tower is {kind}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:  # e.g. a CustomTextCLIP's `text.*` tower
        raise ValueError(f"lrm_path: not an open_clip CLIP with its own text tower: no {', '.join(missing)}")
    conv, positions = state["visual.conv1.weight"], state["visual.positional_embedding"]
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    grid = round((positions.shape[0] - 1) ** 0.5)
    text_width = state["token_embedding.weight"].shape[1]
    embed_dim = state["visual.proj"].shape[1]
    vit_config = dict(
        latent_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=_layers(state, "visual."),
        heads=width // OPEN_CLIP_HEAD_WIDTH,
    )
    text_config = dict(
        vocab_size=state["token_embedding.weight"].shape[0],
        hidden_size=text_width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(state, ""),
        num_attention_heads=text_width // OPEN_CLIP_HEAD_WIDTH,
        max_position_embeddings=state["positional_embedding"].shape[0],
        hidden_act="gelu",  # rg-lcd's configs leave quick_gelu off: nn.GELU in both towers
        layer_norm_eps=1e-5,
        projection_dim=embed_dim,
        # the pooled token: the first end-of-text (CLIP's 49407), where open_clip takes the argmax id
        bos_token_id=49406 if tokenizer is None else tokenizer.bos_token_id,
        eos_token_id=49407 if tokenizer is None else tokenizer.eos_token_id,
    )
    if state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] != 4 * width:
        raise ValueError("lrm_path: the image tower's MLP is not 4× its width (open_clip's mlp_ratio 4 is read)")
    model = LatentRewardModel(
        text_config,
        embed_dim=embed_dim,
        latent_channels=channels,
        tokenizer=tokenizer,
        logit_scale_init=float(state["logit_scale"]),
        image_tower="vit",
        vit_config=vit_config,
        text_preprocessing="open_clip",
    )
    model.load_flat_state_dict(_ours(state))
    return model


def _block_part(rest):
    """A block's key after its index → (part, parameter): "attn.in_proj_weight" → ("attn.in_proj", "weight")."""
    part, parameter = rest.rsplit(".", 1)
    if parameter.startswith("in_proj_"):
        return f"{part}.in_proj", parameter.removeprefix("in_proj_")
    return part, parameter


def _ours(state):
    """open_clip's keys → the LRM's (as transformers 5 names the text tower); a key left over raises. The SD
    VAE that LatentCLIP carries (`vae.*`) is left out: the LRM reads latents."""
    ours, unread = {}, []
    for key, value in state.items():
        if key.startswith("vae."):
            continue
        block = _BLOCK.fullmatch(key)
        part, parameter = _block_part(block[3]) if block else (None, None)
        if key in _VISION:
            ours[_VISION[key]] = value
        elif key in _TEXT:
            ours[_TEXT[key]] = value
        elif key in ("visual.proj", "text_projection"):  # x @ proj: a Linear's weight is its transpose
            ours["image_encoder.proj.weight" if key == "visual.proj" else "text_projection.weight"] = value.T
        elif block and block[1] and part in _VISION_BLOCK:
            ours[f"image_encoder.blocks.{block[2]}.{_VISION_BLOCK[part]}.{parameter}"] = value
        elif block and not block[1] and part == "attn.in_proj":  # the fused [3·width] in_proj: q, k, v
            for name, chunk in zip("qkv", value.chunk(3)):
                ours[f"text_model.encoder.layers.{block[2]}.self_attn.{name}_proj.{parameter}"] = chunk
        elif block and not block[1] and part in _TEXT_BLOCK:
            ours[f"text_model.encoder.layers.{block[2]}.{_TEXT_BLOCK[part]}.{parameter}"] = value
        else:
            unread.append(key)
    if unread:
        raise ValueError(f"lrm_path: open_clip weights with no place in the latent_ViT LRM: {', '.join(unread[:5])}")
    return ours
