"""bench_train_step.py's models and data: SD2.1-size (or, small, tiny) configs built with random weights, the
teacher's parts, the expert, random images."""

import tempfile

import torch

TIME_COND_PROJ_DIM = 256  # the script's --unet_time_cond_proj_dim default
HUBER_C = 0.001
EMA_DECAY = 0.95
MAX_GRAD_NORM = 1.0
LR, LRM_LR, WEIGHT_DECAY = 1e-6, 1e-5, 1e-2
LRM_WIDTHS, LRM_EMBED_DIM = (64, 128, 256), 512  # TrainConfig defaults
SUBJECTS = [
    "cat",
    "dog",
    "red car",
    "mountain lake",
    "city street at night",
    "bowl of fruit",
    "old lighthouse",
    "portrait of a woman",
]


# ---- models (configs only, random weights) ---------------------------------------------------------


def unet_config(small):
    if small:
        return dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=8,
        )
    # stabilityai/stable-diffusion-2-1 unet/config.json
    return dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
    )


def vae_config(small):
    if small:
        return dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.18215,
        )
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=768,
        scaling_factor=0.18215,
    )


def sdxl_vae_config(small):
    """SDXL's VAE: SD's architecture, its own latent scale, decoded in float32 (force_upcast)."""
    return dict(vae_config(small), scaling_factor=0.13025, force_upcast=True)


def clip_text_config(**size):
    """A CLIP text tower's config over the local tokenizer's ids (<|startoftext|> 0, <|endoftext|> 1, also the
    pad token) and CLIP's 49408-token vocabulary, 77 positions."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=49408, max_position_embeddings=77,
                          **size)  # fmt: skip


TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def text_config(small):
    if small:
        return clip_text_config(**TINY_TEXT, hidden_act="gelu")
    # stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower, 23 layers)
    return clip_text_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                            hidden_act="gelu", projection_dim=512)  # fmt: skip


def expert_config(small):
    from transformers import CLIPConfig

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if small:
        return CLIPConfig(
            text_config=dict(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                **ids,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        )
    # openai/clip-vit-large-patch14
    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            **ids,
        ),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
        ),
        projection_dim=768,
    )


def sdxl_unet_config(small):
    """stabilityai/stable-diffusion-xl-base-1.0's UNet config (small: a tiny UNet of the same kind)."""
    if small:
        return dict(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1),
            attention_head_dim=(2, 4),
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
            norm_num_groups=8,
        )
    return dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
        norm_num_groups=32,
    )


def clip_l_text_config(small):
    """CLIP ViT-L/14's text tower: SD1.5's text encoder and SDXL's first (small: a tiny one)."""
    if small:
        return clip_text_config(**TINY_TEXT)
    return clip_text_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu")  # fmt: skip


def big_g_text_config(small):
    """OpenCLIP bigG/14's text tower with its projection: SDXL's second text encoder (small: a tiny one, whose
    width and clip_l_text_config's add up to the tiny SDXL UNet's cross-attention width)."""
    if small:
        return clip_text_config(**TINY_TEXT, projection_dim=32)
    return clip_text_config(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280)  # fmt: skip


def make_tokenizer():
    """A local character-level CLIP tokenizer (tests/tiny_pipeline.py) with model_max_length 77."""
    from tiny_pipeline import tiny_tokenizer

    # a folder of its own: ranks started together would read each other's half-written vocab.json
    with tempfile.TemporaryDirectory(prefix="rglcd_bench_tokenizer_") as folder:
        tokenizer, _ = tiny_tokenizer(folder)
    tokenizer.model_max_length = 77
    return tokenizer


def make_scheduler(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def frozen(module, device, dtype):
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()


def build_teacher_parts(small, device, dtype, prediction_type):
    """The frozen teacher components shared by every provider: UNet, VAE, text encoder (dtype), tokenizer,
    DDPM schedule. Weights initialised on the device (no host round trip for ~1.2 B parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(small))
        vae = AutoencoderKL(**vae_config(small))
        text_encoder = CLIPTextModel(text_config(small))
    return dict(
        unet=frozen(unet, device, dtype),
        vae=frozen(vae, device, dtype),
        text_encoder=frozen(text_encoder, device, dtype),
        tokenizer=make_tokenizer(),
        noise_scheduler=make_scheduler(prediction_type),
    )


def build_sdxl_teacher_parts(small, device, dtype, prediction_type):
    """build_teacher_parts for an SDXL-architecture teacher: the UNet and both text encoders in dtype, the VAE
    in float32 (as the trainer keeps SDXL's), one local tokenizer for both encoders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config(small))
        vae = AutoencoderKL(**sdxl_vae_config(small))
        text_encoder = CLIPTextModel(clip_l_text_config(small))
        text_encoder_2 = CLIPTextModelWithProjection(big_g_text_config(small))
    tokenizer = make_tokenizer()
    return dict(
        unet=frozen(unet, device, dtype),
        vae=frozen(vae, device, torch.float32),
        text_encoder=frozen(text_encoder, device, dtype),
        text_encoder_2=frozen(text_encoder_2, device, dtype),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        noise_scheduler=make_scheduler(prediction_type),
    )


def build_expert(small, device, dtype, tokenizer):
    """The expert reward model: rglcd_fast.reward.ClipScore around a ViT-L/14-size CLIPModel."""
    from transformers import CLIPModel

    from rglcd_fast.reward import ClipScore

    torch.manual_seed(1)
    with torch.device(device):
        model = CLIPModel(expert_config(small))
    return ClipScore(frozen(model, device, dtype), tokenizer)


class RandomImages(torch.utils.data.Dataset):
    """A pool of random images in [-1, 1] ([3, R, R] float32) with captions."""

    def __init__(self, size, resolution, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, 3, resolution, resolution, generator=g) * 2 - 1
        self.captions = [f"a photo of a {SUBJECTS[i % len(SUBJECTS)]} number {i}" for i in range(size)]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "caption": self.captions[i]}


def infinite(loader):
    while True:
        yield from loader


# ---- timing -----------------------------------------------------------------------------------------
