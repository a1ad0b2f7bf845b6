"""Prompt encoding as diffusers' Stable Diffusion and SDXL pipelines do it (no classifier-free guidance): the
trainer's teacher and the sampler both call these. Nothing here imports the rest of the package."""

import torch


def token_ids(tokenizer, prompts, device) -> torch.Tensor:
    """The prompts padded / truncated to the tokenizer's length, as the pipelines tokenise them."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def fixed_time_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """SDXL's size / crop ids when every image is height × width, uncropped: (height, width, 0, 0, height,
    width) per sample, [B, 6] float32 (the SDXL pipelines' ids, the scripts' --use_fix_crop_and_size)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, 6).contiguous()


@torch.no_grad()
def encode_sd(text_encoder, ids) -> torch.Tensor:
    """SD: the text encoder's last hidden states [B, L, D] for the token ids [B, L] (token_ids)."""
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_sdxl(text_encoder, text_encoder_2, ids, ids_2) -> tuple:
    """SDXL, as StableDiffusionXLPipeline.encode_prompt and the SDXL scripts, from each encoder's token ids:
    both encoders' penultimate hidden states side by side [B, L, D1 + D2], and the second encoder's pooled
    projection [B, D2]."""
    states = []
    for encoder, ids_ in ((text_encoder, ids), (text_encoder_2, ids_2)):
        out = encoder(ids_, output_hidden_states=True)
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out[0]
