"""Tiny randomly initialised Stable Diffusion components built from configs (no downloads): an LCM
pipeline folder, a base-model folder and LCM-LoRA weights for it."""
import json
import os
import string

import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from helpers import SD_SCHEDULE

HIDDEN = 8


def tiny_unet(time_cond_proj_dim=8):
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN,
                                norm_num_groups=4, attention_head_dim=2, time_cond_proj_dim=time_cond_proj_dim)


def tiny_vae():
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16)


def tiny_tokenizer(folder):
    """A character-level CLIP tokenizer: every letter and digit, alone and word-final."""
    symbols = list(string.ascii_lowercase + string.digits)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=12), len(vocab)


def save_tiny_pipeline(folder, lcm=True, seed=0):
    """A diffusers-format folder: unet (an LCM's when lcm, else a base model's), vae, text encoder,
    tokenizer, LCM scheduler."""
    torch.manual_seed(seed)
    tokenizer, vocab_size = tiny_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=16,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=12))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    tiny_unet(8 if lcm else None).save_pretrained(os.path.join(folder, "unet"))
    tiny_vae().save_pretrained(os.path.join(folder, "vae"))
    LCMScheduler(**SD_SCHEDULE).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline",
                   "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "LCMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f)
    return folder


def save_tiny_lcm_lora(base_folder, lora_folder, seed=1):
    """Random LoRA weights for the base model's UNet attention, saved as diffusers' LoRA format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(lora_folder, unet_lora_layers=layers, safe_serialization=True)
    return lora_folder
