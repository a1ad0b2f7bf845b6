"""Few-step LCM sampling on the fused scheduler, optionally as one CUDA graph.

`LCMSampler.from_pretrained(folder)` loads a diffusers-format Stable Diffusion or SDXL folder whose
UNet is a latent consistency model (it has a guidance embedding, `time_cond_proj_dim`), or a base model
plus LCM-LoRA weights (`lora=`). Calling the sampler encodes the prompts, runs 1–8 fused LCM steps, decodes
with the VAE and returns PIL images. With `cuda_graph=True` everything from the token ids to the images'
bytes (text encoders, initial latents, UNet calls, fused steps with their noise, VAE decode, conversion to
8-bit) is captured once per (batch, height, width, steps, guidance) and replayed: no Python, no launch
overhead and one copy to the host per call. `compile()` compiles the UNet and the VAE decoder with
torch.compile; the compiled kernels run inside the graph too.
"""

import math
import numbers
import os
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..files import check_pipeline_folder
from ..lcd import guidance_scale_embedding
from ..prompts import encode_sd, encode_sdxl, fixed_time_ids, token_ids
from ..schedulers import FusedLCMScheduler

MAX_STEPS = 8
# torch.compile modes that can run inside the sampler's CUDA graph (the others capture graphs of their own)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


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


@dataclass
class _Graph:
    """A captured sampling run and the static tensors it reads and writes."""

    graph: "torch.cuda.CUDAGraph"
    token_ids: list  # what it reads: each tokenizer's ids, copied in before a replay
    generator: torch.Generator  # where it draws the initial latents and the noise: seeded before a replay
    output: tuple  # what it writes: (the images' bytes [B, H, W, 3], each image finite [B]) or (latents,)
    keep_alive: tuple  # tensors made before the capture that the graph reads (size ids, guidance, timesteps)


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
        device = _device(device)
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
                "not a latent consistency model; pass its LCM-LoRA weights with lora= (rglcd-fast sample: --lora)"
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

    def compile(self, mode: str = "default") -> "LCMSampler":
        """Compiles the UNet and the VAE decoder with torch.compile (each shape compiles on its first call; the
        CUDA graph captures the compiled kernels; graphs captured before are dropped). mode: one of
        COMPILE_MODES, torch.compile's modes that leave CUDA graphs to the sampler."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"mode: expected one of {COMPILE_MODES}, got {mode!r}")
        self.unet = torch.compile(getattr(self.unet, "_orig_mod", self.unet), mode=mode, dynamic=False)
        decoder = self.vae.decoder
        self.vae.decoder = torch.compile(getattr(decoder, "_orig_mod", decoder), mode=mode, dynamic=False)
        self._graphs.clear()
        return self

    def token_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each tokenizer's ids for the prompts on the sampler's device (SD: one tensor, SDXL: two)."""
        tokenizers = (self.tokenizer,) if self.text_encoder_2 is None else (self.tokenizer, self.tokenizer_2)
        return [token_ids(tokenizer, prompts, self.device) for tokenizer in tokenizers]

    def time_ids(self, batch: int, height: int, width: int) -> torch.Tensor | None:
        """SDXL's size / crop ids (original and target size = height × width, crop at 0, 0); SD: None."""
        if self.text_encoder_2 is None:
            return None
        return fixed_time_ids(batch, height, width).to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, ids: list[torch.Tensor], time_ids: torch.Tensor | None = None) -> Conditioning:
        """The UNet's conditioning from the token ids, as diffusers' pipelines encode prompts without
        classifier-free guidance. SDXL: both encoders' penultimate hidden states side by side, the second
        encoder's pooled projection, and time_ids."""
        if self.text_encoder_2 is None:
            return Conditioning(encode_sd(self.text_encoder, ids[0]).to(self.dtype))
        prompt_embeds, pooled = encode_sdxl(self.text_encoder, self.text_encoder_2, *ids)
        return Conditioning(prompt_embeds.to(self.dtype), {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids})

    def encode_prompts(self, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
        """encode() of the prompts' token ids; SDXL's size ids for height × width (default: the model's size)."""
        return self.encode(self.token_ids(prompts), self.time_ids(len(prompts), *self.size(height, width)))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width), each defaulting to the UNet's sample size in pixels."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side if height is None else height, side if width is None else width

    def _check_size(self, height: int, width: int) -> None:
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, numbers.Integral) or value <= 0 or value % factor:
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
        """The LCM loop over the scheduler's timesteps (set_timesteps first), from the first step: a UNet call
        and a fused step per timestep; returns the last denoised latents. Nothing in it copies between host
        and device."""
        self.scheduler.restart()
        denoised = latents
        unet_kwargs = conditioning.unet_kwargs()
        for t in self.scheduler.timesteps:
            model_pred = self.unet(latents, t, timestep_cond=w_embedding, return_dict=False, **unet_kwargs)[0]
            latents, denoised = self.scheduler.step(model_pred, t, latents, generator=generator, return_dict=False)
            if progress is not None:
                progress.update()
        return denoised

    def decode_bytes(self, denoised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's images as 8-bit RGB [B, H, W, 3] on the device, rounded as diffusers' image processor does,
        and per image whether every decoded value was finite [B] (a byte cannot hold a NaN: it would be black)."""
        images = self.vae.decode((denoised / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False)[0]
        finite = images.isfinite().flatten(1).all(1)
        pixels = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous(), finite

    @torch.no_grad()
    def decode(self, denoised: torch.Tensor) -> list[Image.Image]:
        return _pil_images(*self.decode_bytes(denoised))

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
    ) -> torch.Tensor:
        """The final denoised latents for the prompts (what __call__ decodes)."""
        (latents,) = self._sample(
            prompts, steps, guidance_scale, seed, height, width, cuda_graph, progress, decode=False
        )
        return latents

    @torch.no_grad()
    def __call__(self, prompts, steps: int = 4, guidance_scale: float = 8.0, seed: int = 0, height=None, width=None,
                 cuda_graph: bool = False, progress=None) -> list[Image.Image]:  # fmt: skip
        """The images for the prompts (the arguments as latents())."""
        return _pil_images(
            *self._sample(prompts, steps, guidance_scale, seed, height, width, cuda_graph, progress, True)
        )

    def _sample(self, prompts, steps, guidance_scale, seed, height, width, cuda_graph, progress, decode):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: expected at least one prompt")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps: expected 1 to {MAX_STEPS} LCM steps, got {steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise ValueError(f"guidance_scale: expected a number, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale):  # its embedding would make every latent NaN: black images
            raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale}")
        height, width = self.size(height, width)
        self._check_size(height, width)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: needs a CUDA device, the sampler runs on {self.device}")
        ids = self.token_ids(prompts)
        if not cuda_graph:
            generator = torch.Generator(self.device).manual_seed(seed)
            sample, _ = self._sampling_run(ids, height, width, steps, guidance_scale, generator, decode, progress)
            return sample()
        graph = self._graph_for(ids, height, width, steps, guidance_scale, decode)
        for static, new in zip(graph.token_ids, ids):
            static.copy_(new)
        graph.generator.manual_seed(seed)  # the graph draws the initial latents and the noise from here
        graph.graph.replay()
        if progress is not None:
            progress.update(steps)
        return tuple(output.clone() for output in graph.output)

    def _sampling_run(self, ids, height, width, steps, guidance_scale, generator, decode, progress=None):
        """Returns (run, constants): the run from token ids to (denoised latents,) (decode: to decode_bytes'
        (bytes, finite)) as a function of no arguments, which can run any number of times, and the tensors it
        reads that are made now, outside any capture (the size ids, the guidance embedding, the scheduler's
        timesteps)."""
        batch = ids[0].shape[0]
        time_ids = self.time_ids(batch, height, width)
        w_embedding = self._guidance(guidance_scale, batch)
        self.scheduler.set_timesteps(steps, device=self.device)

        def sample():
            conditioning = self.encode(ids, time_ids)
            latents = self.initial_latents(batch, height, width, generator)
            denoised = self.denoise(conditioning, latents, w_embedding, generator, progress)
            return self.decode_bytes(denoised) if decode else (denoised,)

        return sample, (time_ids, w_embedding, self.scheduler.timesteps)

    def _graph_for(self, ids, height, width, steps, guidance_scale, decode) -> _Graph:
        """The captured run for this (token shapes, size, steps, guidance, decode), captured on first use. It
        draws the initial latents and the per-step noise from its own generator, whose state is registered
        with the graph: seeding that generator before a replay gives the eager run's draws for that seed."""
        key = (tuple(tuple(i.shape) for i in ids), height, width, steps, float(guidance_scale), decode)
        if key not in self._graphs:
            static_ids = [i.clone() for i in ids]
            generator = torch.Generator(self.device)
            sample, constants = self._sampling_run(static_ids, height, width, steps, guidance_scale, generator, decode)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, compilation
                sample()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                output = sample()
            self._graphs[key] = _Graph(graph, static_ids, generator, output, constants)
        return self._graphs[key]


def _device(device) -> torch.device:
    """The sampler's device: as given (checked), else CUDA when there is one."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"device: {device!r} is not a device torch knows ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r}, but this torch sees no CUDA device")
    return device


def _pil_images(images: torch.Tensor, finite: torch.Tensor) -> list[Image.Image]:
    """PIL images of the bytes; images whose decode was not finite are refused, not returned black."""
    images, finite = images.cpu(), finite.cpu()
    if not finite.all():
        raise ValueError(
            f"images {(~finite).nonzero().flatten().tolist()} decoded to non-finite values (NaN/Inf): the model's "
            "weights or the sampling settings are not finite"
        )
    return [Image.fromarray(image) for image in images.numpy()]


def _fuse_lora(unet, lora: str, xl: bool):
    """The UNet with LCM-LoRA weights (diffusers' LoRA format, as load_lora_weights reads it) fused in."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    try:
        state_dict, network_alphas = pipeline.lora_state_dict(lora)
    except (OSError, ValueError) as error:  # no LoRA file in the folder, or a file torch/safetensors cannot read
        raise ValueError(f"lora: {lora!r} holds no LoRA weights diffusers can read ({error})") from error
    if not any("lora" in key for key in state_dict):  # diffusers would load nothing and only warn
        raise ValueError(f"lora: {lora!r} holds no LoRA weights (no lora keys among its {len(state_dict)} tensors)")
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
