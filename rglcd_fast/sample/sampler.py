"""Few-step LCM sampling on the fused scheduler, optionally as one CUDA graph.

`LCMSampler.from_pretrained(folder)` loads a diffusers-format Stable Diffusion or SDXL folder whose
UNet is a latent consistency model (it has a guidance embedding, `time_cond_proj_dim`), or a base model
plus LCM-LoRA weights (`lora=`). Calling the sampler encodes the prompts, runs 1–8 fused LCM steps, decodes
with the VAE and returns PIL images. With `cuda_graph=True` the whole denoising loop (UNet calls,
fused steps and the per-step noise) is captured once per (batch, height, width, steps, guidance) and
replayed: no Python and no launch overhead per step.
"""

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..files import check_pipeline_folder
from ..lcd import guidance_scale_embedding
from ..prompts import encode_sd, encode_sdxl, fixed_time_ids
from ..schedulers import FusedLCMScheduler

MAX_STEPS = 8


@dataclass
class Conditioning:
    """What the UNet reads besides the latents, the timestep and the guidance embedding: the prompt
    embeddings and, for SDXL, added_cond_kwargs (the pooled text embeddings and the size / crop ids)."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.prompt_embeds}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def tensors(self) -> list:
        return [self.prompt_embeds] + list((self.added_cond_kwargs or {}).values())

    def clone(self) -> "Conditioning":
        added = None if self.added_cond_kwargs is None else {k: v.clone() for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.prompt_embeds.clone(), added)

    def copy_(self, other: "Conditioning") -> None:
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)


@dataclass
class _Graph:
    """A captured denoising loop and the static tensors it reads and writes."""

    graph: "torch.cuda.CUDAGraph"
    conditioning: Conditioning
    generator: torch.Generator
    denoised: torch.Tensor
    keep_alive: tuple  # tensors made before the capture that the graph reads (guidance embedding, timesteps)


@dataclass
class LCMSampler:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: FusedLCMScheduler
    device: torch.device
    dtype: torch.dtype
    text_encoder_2: torch.nn.Module | None = None  # SDXL: the second text encoder (with projection) and
    tokenizer_2: object = None  # its tokenizer
    _graphs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, model: str, lora: str | None = None, device=None, dtype=None) -> "LCMSampler":
        """Loads the UNet, VAE, text encoder(s), tokenizer(s) and scheduler config of a diffusers folder
        (SDXL: the folder also has text_encoder_2 and tokenizer_2)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        check_pipeline_folder(model, "model")
        xl = os.path.isdir(os.path.join(model, "text_encoder_2"))
        if xl and not os.path.isdir(os.path.join(model, "tokenizer_2")):
            raise ValueError(f"model: {model!r} has text_encoder_2 but no tokenizer_2 (an incomplete SDXL folder)")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        if (unet.config.addition_embed_type == "text_time") != xl:
            raise ValueError(
                f"model: the UNet in {model!r} {'expects' if not xl else 'does not take'} SDXL's added "
                f"conditioning, but the folder {'has no' if not xl else 'has a'} text_encoder_2"
            )
        if lora is not None:
            if not os.path.exists(lora):
                raise FileNotFoundError(f"lora: no such file or folder {lora!r}")
            unet = _fuse_lora(unet, lora, xl)
        elif not unet.config.time_cond_proj_dim:
            raise ValueError(
                f"model: the UNet in {model!r} has no guidance embedding (time_cond_proj_dim), so it is "
                "not a latent consistency model; pass its LCM-LoRA weights with lora="
            )
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        if xl and dtype == torch.float16 and vae.config.force_upcast:  # SDXL's VAE overflows in float16, so
            # diffusers' SDXL pipelines decode in float32
            vae = vae.to(torch.float32)
        return cls(
            unet=unet.to(device).eval(),
            vae=vae.to(device).eval(),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype)
            .to(device)
            .eval(),
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            scheduler=FusedLCMScheduler.from_pretrained(model, subfolder="scheduler"),
            device=device,
            dtype=dtype,
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder_2", torch_dtype=dtype
            )
            .to(device)
            .eval()
            if xl
            else None,
            tokenizer_2=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2") if xl else None,
        )

    # ---- the pieces ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
        """The UNet's conditioning for the prompts, as diffusers' pipelines encode it without classifier-free
        guidance. SDXL: both encoders' penultimate hidden states side by side, the second encoder's pooled
        projection, and the size / crop ids (original and target size = height × width, crop at 0, 0)."""
        if self.text_encoder_2 is None:
            return Conditioning(encode_sd(self.text_encoder, self.tokenizer, prompts).to(self.dtype))
        prompt_embeds, pooled = encode_sdxl(
            self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2, prompts
        )
        height, width = self.size(height, width)
        time_ids = fixed_time_ids(len(prompts), height, width).to(self.device, self.dtype)
        return Conditioning(prompt_embeds.to(self.dtype), {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids})

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width), each defaulting to the UNet's sample size in pixels."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return height or side, width or side

    def _check_size(self, height: int, width: int) -> None:
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(
                    f"{name}: expected a positive multiple of {factor} (the VAE's downsampling), got {value}"
                )

    def _guidance(self, guidance_scale: float, batch: int):
        """The guidance embedding of an LCM (w = guidance_scale - 1, as diffusers' LCM pipeline), or None
        for an LCM-LoRA model, which samples without classifier-free guidance."""
        dim = self.unet.config.time_cond_proj_dim
        if not dim:
            return None
        w = torch.full((batch,), guidance_scale - 1.0)
        return guidance_scale_embedding(w, embedding_dim=dim).to(self.device, self.dtype)

    def denoise(self, conditioning: Conditioning, latents, w_embedding, generator, progress=None):
        """The LCM loop over the scheduler's timesteps (set_timesteps first): a UNet call and a fused step
        per timestep; returns the last denoised latents. Nothing in it copies between host and device."""
        denoised = latents
        unet_kwargs = conditioning.unet_kwargs()
        for t in self.scheduler.timesteps:
            model_pred = self.unet(latents, t, timestep_cond=w_embedding, return_dict=False, **unet_kwargs)[0]
            latents, denoised = self.scheduler.step(model_pred, t, latents, generator=generator, return_dict=False)
            if progress is not None:
                progress.update()
        return denoised

    @torch.no_grad()
    def decode(self, denoised: torch.Tensor) -> list[Image.Image]:
        images = self.vae.decode((denoised / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]

    def initial_latents(self, batch, height, width, generator):
        factor = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, height // factor, width // factor)
        latents = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma

    # ---- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def latents(
        self,
        prompts: list[str],
        steps: int = 4,
        guidance_scale: float = 8.0,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        cuda_graph: bool = False,
        progress=None,
    ):
        """The final denoised latents for the prompts (what __call__ decodes)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps: expected 1 to {MAX_STEPS} LCM steps, got {steps}")
        height, width = self.size(height, width)
        self._check_size(height, width)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a CUDA device, the sampler runs on {self.device}")
        conditioning = self.encode_prompts(prompts, height, width)
        self.scheduler.set_timesteps(steps, device=self.device)
        if not cuda_graph:
            generator = torch.Generator(self.device).manual_seed(seed)
            latents = self.initial_latents(len(prompts), height, width, generator)
            w_embedding = self._guidance(guidance_scale, len(prompts))
            return self.denoise(conditioning, latents, w_embedding, generator, progress)
        graph = self._graph_for(conditioning, height, width, steps, guidance_scale)
        graph.conditioning.copy_(conditioning)
        graph.generator.manual_seed(seed)  # the graph draws the initial latents and the noise from here
        graph.graph.replay()
        if progress is not None:
            progress.update(steps)
        return graph.denoised.clone()

    def __call__(self, prompts, **kwargs) -> list[Image.Image]:
        return self.decode(self.latents(prompts, **kwargs))

    def _graph_for(self, conditioning: Conditioning, height, width, steps, guidance_scale) -> _Graph:
        """The captured loop for this (batch, size, steps, guidance), captured on first use. It draws the
        initial latents and the per-step noise from its own generator, whose state is registered with
        the graph: seeding that generator before a replay gives the eager loop's draws for that seed."""
        key = (tuple(tuple(t.shape) for t in conditioning.tensors()), height, width, steps, float(guidance_scale))
        if key not in self._graphs:
            batch = len(conditioning)
            static = conditioning.clone()
            w_embedding = self._guidance(guidance_scale, batch)
            generator = torch.Generator(self.device)

            def sample():
                latents = self.initial_latents(batch, height, width, generator)
                return self.denoise(static, latents, w_embedding, generator)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, autotuning
                sample()
            torch.cuda.current_stream().wait_stream(side)
            self.scheduler.set_timesteps(steps, device=self.device)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                denoised = sample()
            self._graphs[key] = _Graph(graph, static, generator, denoised, (w_embedding, self.scheduler.timesteps))
        return self._graphs[key]


def _fuse_lora(unet, lora: str, xl: bool):
    """The UNet with LCM-LoRA weights (diffusers' LoRA format, as load_lora_weights reads it) fused in."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    state_dict, network_alphas = pipeline.lora_state_dict(lora)
    pipeline.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=unet)
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """The images tiled row by row into one picture."""
    columns = columns or min(len(images), 8)
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
