"""Few-step LCM sampling on the fused scheduler, optionally as one CUDA graph.

`LCMSampler.from_pretrained(folder)` loads a diffusers-format Stable Diffusion folder whose UNet is a
latent consistency model (it has a guidance embedding, `time_cond_proj_dim`), or a base model plus
LCM-LoRA weights (`lora=`). Calling the sampler encodes the prompts, runs 1–8 fused LCM steps, decodes
with the VAE and returns PIL images. With `cuda_graph=True` the whole denoising loop (UNet calls,
fused steps and the per-step noise) is captured once per (batch, height, width, steps, guidance) and
replayed: no Python and no launch overhead per step.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..lcd import guidance_scale_embedding
from ..schedulers import FusedLCMScheduler

MAX_STEPS = 8


@dataclass
class _Graph:
    """A captured denoising loop and the static tensors it reads and writes."""
    graph: "torch.cuda.CUDAGraph"
    prompt_embeds: torch.Tensor
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
    _graphs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, model: str, lora: str | None = None, device=None, dtype=None) -> "LCMSampler":
        """Loads the UNet, VAE, text encoder, tokenizer and scheduler config of a diffusers folder."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if not os.path.isdir(model):
            raise FileNotFoundError(f"model: no such folder {model!r} (expected a diffusers pipeline folder)")
        missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(model, p))]
        if missing:
            raise ValueError(f"model: {model!r} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)})")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        if lora is not None:
            if not os.path.exists(lora):
                raise FileNotFoundError(f"lora: no such file or folder {lora!r}")
            unet = _fuse_lora(unet, lora)
        elif not unet.config.time_cond_proj_dim:
            raise ValueError(f"model: the UNet in {model!r} has no guidance embedding (time_cond_proj_dim), so it is "
                             "not a latent consistency model; pass its LCM-LoRA weights with lora=")
        sampler = cls(
            unet=unet.to(device).eval(),
            vae=AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype).to(device).eval(),
            text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype).to(device)
            .eval(),
            tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            scheduler=FusedLCMScheduler.from_pretrained(model, subfolder="scheduler"),
            device=device, dtype=dtype)
        return sampler

    # ---- the pieces ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(tokens)[0].to(self.dtype)

    def _check_size(self, height: int, width: int) -> None:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(f"{name}: expected a positive multiple of {factor} (the VAE's downsampling), got {value}")

    def _guidance(self, guidance_scale: float, batch: int):
        """The guidance embedding of an LCM (w = guidance_scale - 1, as diffusers' LCM pipeline), or None
        for an LCM-LoRA model, which samples without classifier-free guidance."""
        dim = self.unet.config.time_cond_proj_dim
        if not dim:
            return None
        w = torch.full((batch,), guidance_scale - 1.0)
        return guidance_scale_embedding(w, embedding_dim=dim).to(self.device, self.dtype)

    def denoise(self, prompt_embeds, latents, w_embedding, generator, progress=None):
        """The LCM loop over the scheduler's timesteps (set_timesteps first): a UNet call and a fused step
        per timestep; returns the last denoised latents. Nothing in it copies between host and device."""
        denoised = latents
        for t in self.scheduler.timesteps:
            model_pred = self.unet(latents, t, timestep_cond=w_embedding, encoder_hidden_states=prompt_embeds,
                                   return_dict=False)[0]
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
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (batch, self.unet.config.in_channels, height // factor, width // factor)
        latents = torch.randn(shape, generator=generator, device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma

    # ---- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def latents(self, prompts: list[str], steps: int = 4, guidance_scale: float = 8.0, seed: int = 0,
                height: int | None = None, width: int | None = None, cuda_graph: bool = False, progress=None):
        """The final denoised latents for the prompts (what __call__ decodes)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps: expected 1 to {MAX_STEPS} LCM steps, got {steps}")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        height = height or self.unet.config.sample_size * factor
        width = width or self.unet.config.sample_size * factor
        self._check_size(height, width)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a CUDA device, the sampler runs on {self.device}")
        prompt_embeds = self.encode_prompts(prompts)
        self.scheduler.set_timesteps(steps, device=self.device)
        if not cuda_graph:
            generator = torch.Generator(self.device).manual_seed(seed)
            latents = self.initial_latents(len(prompts), height, width, generator)
            w_embedding = self._guidance(guidance_scale, len(prompts))
            return self.denoise(prompt_embeds, latents, w_embedding, generator, progress)
        graph = self._graph_for(prompt_embeds, height, width, steps, guidance_scale)
        graph.prompt_embeds.copy_(prompt_embeds)
        graph.generator.manual_seed(seed)  # the graph draws the initial latents and the noise from here
        graph.graph.replay()
        if progress is not None:
            progress.update(steps)
        return graph.denoised.clone()

    def __call__(self, prompts, **kwargs) -> list[Image.Image]:
        return self.decode(self.latents(prompts, **kwargs))

    def _graph_for(self, prompt_embeds, height, width, steps, guidance_scale) -> _Graph:
        """The captured loop for this (batch, size, steps, guidance), captured on first use. It draws the
        initial latents and the per-step noise from its own generator, whose state is registered with
        the graph: seeding that generator before a replay gives the eager loop's draws for that seed."""
        key = (tuple(prompt_embeds.shape), height, width, steps, float(guidance_scale))
        if key not in self._graphs:
            batch = prompt_embeds.shape[0]
            static_embeds = prompt_embeds.clone()
            w_embedding = self._guidance(guidance_scale, batch)
            generator = torch.Generator(self.device)

            def sample():
                latents = self.initial_latents(batch, height, width, generator)
                return self.denoise(static_embeds, latents, w_embedding, generator)

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
            self._graphs[key] = _Graph(graph, static_embeds, generator, denoised,
                                       (w_embedding, self.scheduler.timesteps))
        return self._graphs[key]


def _fuse_lora(unet, lora: str):
    """The UNet with LCM-LoRA weights (diffusers' LoRA format, as load_lora_weights reads it) fused in."""
    from diffusers import StableDiffusionPipeline

    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(lora)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=unet)
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
