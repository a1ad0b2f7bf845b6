"""Tiny randomly initialised Stable Diffusion and SDXL components built from configs (no downloads):
LCM pipeline folders, base-model folders and LCM-LoRA weights for them."""

import json
import os
import string

import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from helpers import SD_SCHEDULE
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HIDDEN = 8


def tiny_unet(time_cond_proj_dim=8, xl=False):
    """xl: SDXL's conditioning (both text encoders' states side by side, pooled text embeddings and six
    size / crop ids through addition_embed_type "text_time")."""
    added = (
        dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + HIDDEN,
        )
        if xl
        else {}
    )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * HIDDEN if xl else HIDDEN,
        norm_num_groups=4,
        attention_head_dim=2,
        time_cond_proj_dim=time_cond_proj_dim,
        **added,
    )


def tiny_vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )


def tiny_tokenizer(folder):
    """A character-level CLIP tokenizer: every letter and digit, alone and word-final."""
    symbols = list(string.ascii_lowercase + string.digits)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=12
    ), len(vocab)


def save_tiny_pipeline(folder, lcm=True, seed=0, xl=False):
    """A diffusers-format folder: unet (an LCM's when lcm, else a base model's), vae, text encoder,
    tokenizer, LCM scheduler; xl: an SDXL folder (also text_encoder_2 with a projection, tokenizer_2)."""
    torch.manual_seed(seed)
    text_config = dict(
        hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12
    )
    encoders = [("text_encoder", "tokenizer", CLIPTextModel)]
    if xl:
        encoders.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
    for encoder_name, tokenizer_name, encoder_class in encoders:
        tokenizer, vocab_size = tiny_tokenizer(os.path.join(folder, tokenizer_name))
        tokenizer.save_pretrained(os.path.join(folder, tokenizer_name))
        encoder_class(CLIPTextConfig(vocab_size=vocab_size, projection_dim=HIDDEN, **text_config)).save_pretrained(
            os.path.join(folder, encoder_name)
        )
    tiny_unet(8 if lcm else None, xl=xl).save_pretrained(os.path.join(folder, "unet"))
    tiny_vae().save_pretrained(os.path.join(folder, "vae"))
    LCMScheduler(**SD_SCHEDULE).save_pretrained(os.path.join(folder, "scheduler"))
    index = {
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "LCMScheduler"],
    }
    if xl:
        index.update(
            _class_name="StableDiffusionXLPipeline",
            force_zeros_for_empty_prompt=True,
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            image_encoder=[None, None],
            feature_extractor=[None, None],
        )
    else:
        index.update(
            _class_name="LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline",
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


def save_tiny_lcm_lora(base_folder, lora_folder, seed=1, xl=False):
    """Random LoRA weights for the base model's UNet attention, saved through save_lora_weights in peft's key form
    (the form whose attention adapters diffusers' load_lora_weights loads: see rglcd_fast.train.outputs.save_lora)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base_folder, subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    layers = get_peft_model_state_dict(unet)
    (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(
        lora_folder, unet_lora_layers=layers, safe_serialization=True
    )
    return lora_folder


def save_tiny_world(root, xl=False):
    """(teacher, data): a tiny base SD folder (xl: SDXL) and 12 captioned 16×16 images in ``root`` (captions name
    a digit, for the digits expert)."""
    from PIL import Image

    teacher = save_tiny_pipeline(os.path.join(root, "teacher"), lcm=False, xl=xl)
    data = os.path.join(root, "data")
    os.makedirs(data)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(os.path.join(data, f"{i}.png"))
        with open(os.path.join(data, f"{i}.txt"), "w") as f:
            f.write(f"a digit {('zero', 'one', 'two', 'three')[i % 4]}")
    return teacher, data


def tiny_config(world, out, **overrides):
    """A trainer config over the `world` fixture (conftest.py): 4 steps of batch 4, tiny LRM and LoRA."""
    from rglcd_fast.train.config import make_config

    teacher, data = world
    settings = dict(
        teacher=teacher,
        data=data,
        output_dir=str(out),
        max_train_steps=4,
        train_batch_size=4,
        time_cond_proj_dim=8,
        lrm_widths=(8, 16),
        lrm_embed_dim=8,
        lrm_batch_size=2,
        checkpointing_steps=2,
        logging_steps=1,
        validation_steps=0,
        validation_lcm_steps=(1,),
        lora_rank=2,
        lora_alpha=2,
        progress=False,
        learning_rate=1e-3,
        lrm_learning_rate=1e-3,
        lr_warmup_steps=1,
    )
    settings.update(overrides)
    return make_config(**settings)


def assert_sdxl_sampler_matches_pipeline(folder, lora=None, guidance_scale=1.0, height=None, width=None):
    """LCMSampler on an SDXL folder (with LCM-LoRA weights) against diffusers' StableDiffusionXLPipeline with
    LCMScheduler (no classifier-free guidance, as LCMs sample): the same latents for the same seed. Returns
    the sampler."""
    from diffusers import StableDiffusionXLPipeline

    from rglcd_fast.sample import LCMSampler

    prompts = ["a digit seven", "a digit one"]
    sampler = LCMSampler.from_pretrained(folder, lora=lora, device="cpu")
    assert sampler.text_encoder_2 is not None
    ours = sampler.latents(prompts, steps=4, guidance_scale=guidance_scale, seed=3, height=height, width=width)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    if lora:
        pipe.load_lora_weights(lora)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(
        prompts,
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    return sampler
