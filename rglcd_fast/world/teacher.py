"""The digits world's teacher (docs/design.md §4): a tiny Stable-Diffusion-class latent diffusion model of the
32×32 digit images, built from the same classes as Stable Diffusion (diffusers `AutoencoderKL` and
`UNet2DConditionModel`, transformers `CLIPTextModel` and `CLIPTokenizer`, SD's `DDPMScheduler` config)
and shipped as a diffusers-format `StableDiffusionPipeline` folder, so the trainer loads it exactly as
it loads a real SD folder.

Rebuild the whole world (the two classifiers, the teacher, then the pre-trained latent reward model) with
fixed seeds:
`python -m rglcd_fast.world.teacher` (see `main` for the options).
"""

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import classifiers
from .classifiers import WEIGHTS_DIR
from .digits import DigitsDataset, prompt_for, save_tokenizer

TEACHER_DIR = os.path.join(WEIGHTS_DIR, "teacher")

# 32×32×3 pixels -> 4×8×8 latents (two 2× downsamplings).
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16
)
# attention_head_dim is the number of heads (diffusers' legacy naming, as in SD's own config).
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
    attention_head_dim=4,
)
# Stable Diffusion's training schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)


def build_vae():
    """An untrained `AutoencoderKL` of VAE_CONFIG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_text_encoder(tokenizer):
    """An untrained `CLIPTextModel` of TEXT_CONFIG over the tokenizer's vocabulary and special tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int):
    """An untrained epsilon-prediction `UNet2DConditionModel` of UNET_CONFIG on 4×8×8 latents, attending to
    text features of width `cross_attention_dim` (no time_cond_proj_dim: the distilled student adds it)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(cross_attention_dim=cross_attention_dim, **UNET_CONFIG)


def build_scheduler():
    """A `DDPMScheduler` with Stable Diffusion's config (from_config keeps set_alpha_to_one, which DDPM does not
    use, in the saved config, so DDIMScheduler.from_config(teacher.scheduler.config) gets SD's setting)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SCHEDULER_CONFIG)


def _batches(num_samples: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches from successive seeded permutations (epochs) of range(num_samples)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(num_samples, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _cosine_schedule(optimizer, steps: int, warmup: int):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256):
    """(mean, std) of the VAE posterior for images [N, 3, 32, 32] in [-1, 1], each [N, 4, 8, 8] (unscaled)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_vae(
    vae,
    images: torch.Tensor,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-5,
    generator: torch.Generator | None = None,
    progress: bool = True,
):
    """Trains the VAE on images [N, 3, 32, 32] in [-1, 1]: loss = L1 + L2 reconstruction of a posterior
    sample (means over pixels) + kl_weight · KL(posterior ‖ N(0, I)) (summed over the latent, as SD's VAE
    loss sums it), AdamW with warm-up and cosine decay. Then sets `vae.config.scaling_factor` to 1 / std
    of the data set's latents (posterior samples), as SD does. Returns the VAE in eval mode."""
    generator = generator or torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = _cosine_schedule(optimizer, steps, warmup=min(100, steps // 10 + 1))
    vae.train()
    bar = tqdm(_batches(len(images), batch_size, steps, generator), total=steps, desc="vae", disable=not progress)
    for batch in bar:
        x = images[batch]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        error = reconstruction - x
        loss = error.abs().mean() + error.square().mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    mean, std = encode_latents(vae, images)
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    return vae


def _encode_prompts(tokenizer, prompts):
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_unet(
    unet,
    text_encoder,
    tokenizer,
    vae,
    scheduler,
    dataset: DigitsDataset,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 1e-3,
    uncond_prob: float = 0.1,
    ema_decay: float = 0.999,
    generator: torch.Generator | None = None,
    progress: bool = True,
):
    """Trains the UNet and the text encoder jointly with SD's objective: latents x0 = VAE posterior
    sample × scaling_factor (the VAE frozen), t uniform in [0, T), x_t = scheduler.add_noise(x0, ε, t),
    loss = ‖unet(x_t, t, text_encoder(caption)) − ε‖²; a fraction `uncond_prob` of the captions is
    replaced by "" (for classifier-free guidance). AdamW with warm-up and cosine decay; an EMA (decay
    warming up to `ema_decay`) of both models' weights is what this returns: (unet, text_encoder), eval mode."""
    generator = generator or torch.Generator().manual_seed(0)
    mean, std = encode_latents(vae.eval(), dataset.images)
    scaling_factor = vae.config.scaling_factor
    captions = _encode_prompts(tokenizer, [dataset[i]["caption"] for i in range(len(dataset))])
    empty = _encode_prompts(tokenizer, [""])

    models = torch.nn.ModuleList([unet, text_encoder]).train()
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(models.parameters(), lr=lr, weight_decay=1e-2)
    schedule = _cosine_schedule(optimizer, steps, warmup=min(200, steps // 10 + 1))
    bar = tqdm(_batches(len(dataset), batch_size, steps, generator), total=steps, desc="unet", disable=not progress)
    for step, batch in enumerate(bar):
        b = len(batch)
        x0 = (mean[batch] + std[batch] * torch.randn(mean[batch].shape, generator=generator)) * scaling_factor
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        ids = torch.where((torch.rand(b, generator=generator) < uncond_prob)[:, None], empty, captions[batch])
        prediction = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), models.parameters()):
                e.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema[0], ema[1]


def make_teacher(
    out_dir: str = TEACHER_DIR, seed: int = 0, vae_steps: int = 600, unet_steps: int = 1500, progress: bool = True
) -> str:
    """Builds and trains the whole teacher from `seed` (VAE on every digit, then UNet + text encoder) and
    saves it as a StableDiffusionPipeline folder at `out_dir` (written into a temporary folder beside it,
    then moved into place, so a crash never leaves a half-written folder). Returns out_dir."""
    from diffusers import StableDiffusionPipeline

    from ..files import write_folder

    def build(folder):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        dataset = DigitsDataset()
        tokenizer = save_tokenizer(os.path.join(folder, "tokenizer"))
        vae = train_vae(build_vae(), dataset.images, steps=vae_steps, generator=generator, progress=progress)
        text_encoder = build_text_encoder(tokenizer)
        scheduler = build_scheduler()
        unet, text_encoder = train_unet(
            build_unet(text_encoder.config.hidden_size),
            text_encoder,
            tokenizer,
            vae,
            scheduler,
            dataset,
            steps=unet_steps,
            generator=generator,
            progress=progress,
        )
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(folder, safe_serialization=True)

    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    write_folder(out_dir, build)
    return out_dir


def load_teacher(folder: str = TEACHER_DIR, device=None, dtype=None):
    """The teacher as a diffusers `StableDiffusionPipeline` (on `device`, in `dtype` when given)."""
    from diffusers import StableDiffusionPipeline

    if not os.path.exists(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(
            f"teacher: no pipeline folder at {folder!r} (rebuild: python -m rglcd_fast.world.teacher)"
        )
    pipeline = StableDiffusionPipeline.from_pretrained(folder, **({"torch_dtype": dtype} if dtype else {}))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device) if device is not None else pipeline


@torch.no_grad()
def reconstruction_accuracy(vae, evaluator, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of `evaluator` on the VAE round trip (posterior mean, decoded) of images in [-1, 1]."""
    mean, _ = encode_latents(vae, images)
    reconstructions = torch.cat([vae.decode(m).sample for m in mean.split(256)]).clamp(-1, 1)
    return (evaluator(reconstructions).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def sample_accuracy(
    pipeline, evaluator, per_digit: int = 20, num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0
) -> float:
    """Accuracy of `evaluator` on the prompted digit of teacher samples: `per_digit` samples of
    "a handwritten digit <word>" for each digit, DDIM (diffusers DDIMScheduler) with classifier-free
    guidance, 32×32, from a generator seeded with `seed`."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline = type(pipeline)(**{**pipeline.components, "scheduler": scheduler}, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [prompt_for(label) for label in range(10) for _ in range(per_digit)]
    images = pipeline(
        prompts,
        height=32,
        width=32,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    labels = torch.arange(10).repeat_interleave(per_digit)
    return (evaluator(images.float() * 2 - 1).argmax(1) == labels).float().mean().item()


def main(argv=None, prog="python -m rglcd_fast.world.teacher") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default=TEACHER_DIR,
        help="the teacher's pipeline folder; the classifiers are saved "
        "in the folder above it (default: the package's shipped weights)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument(
        "--skip-classifiers", action="store_true", help="rebuild only the teacher (the shipped evaluator judges it)"
    )
    parser.add_argument("--skip-lrm", action="store_true", help="do not rebuild the pre-trained latent reward model")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    classifiers_dir = WEIGHTS_DIR if args.skip_classifiers else os.path.dirname(os.path.abspath(args.out))
    if not args.skip_classifiers:
        classifiers.main([classifiers_dir])
    folder = make_teacher(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    print(f"teacher saved to {folder} ({time.perf_counter() - start:.0f} s)")
    evaluator = classifiers.load_classifier("evaluator", classifiers_dir)
    pipeline = load_teacher(folder)
    dataset = DigitsDataset()
    reconstructions = reconstruction_accuracy(pipeline.vae, evaluator, dataset.images, dataset.labels)
    samples = sample_accuracy(pipeline, evaluator, per_digit=10)
    print(f"evaluator accuracy: VAE reconstructions {reconstructions:.4f}, DDIM-50 samples at CFG 7.5 {samples:.4f}")
    if not args.skip_lrm:  # the pre-trained LRM reads this teacher's latents
        from .lrm import build_digits_lrm

        build_digits_lrm(
            os.path.join(os.path.dirname(os.path.abspath(folder)), "lrm"), folder, classifiers_dir, seed=args.seed
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
