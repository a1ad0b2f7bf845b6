"""The paper-style comparison on the digits world (issue #6): the 50-step DDIM teacher with CFG, plain LCD
and RG-LCD (direct expert RM, latent proxy RM) at 1, 2 and 4 steps, every row from the same prompts and
initial noise. Columns: mean expert reward, held-out evaluator accuracy on the prompted digit, Fréchet
distance to the real digits in the evaluator's features, milliseconds per image.

`rglcd-fast eval` trains the three students with `rglcd-fast train`'s digits preset (unless their
folders already hold a finished run), then writes the table and one sample grid per row."""
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from .classifiers import load_classifier, prompted_digit
from .digits import DIGIT_WORDS, DigitsDataset, prompt_for
from .teacher import load_teacher

VARIANTS = {"LCD": "none", "RG-LCD (direct RM)": "direct", "RG-LCD (LRM)": "lrm"}


@dataclass
class Row:
    name: str
    steps: int
    reward: float
    accuracy: float
    frechet: float
    ms_per_image: float
    grid: str | None = None


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½) of two feature sets [N, D] (float64)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # near-singular product: regularise, as pytorch-fid does
        eye = np.eye(len(mu_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


class Judge:
    """The expert reward model and the held-out evaluator, with the real digits' evaluator features."""

    def __init__(self):
        from ..reward import load_reward_model

        self.expert = load_reward_model("digits", None)
        self.evaluator = load_classifier("evaluator")
        with torch.no_grad():
            self.real_features = self.evaluator.features(DigitsDataset().images).double().numpy()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> tuple:
        """images [N, 3, 32, 32] in [0, 1] -> (mean expert reward, evaluator accuracy, Fréchet distance)."""
        reward = self.expert.logits(images, prompts).mean().item()  # the prompted digit's logit
        x = images.float() * 2 - 1
        targets = torch.tensor([prompted_digit(p) for p in prompts])
        accuracy = (self.evaluator(x).argmax(1) == targets).float().mean().item()
        frechet = frechet_distance(self.evaluator.features(x).double().numpy(), self.real_features)
        return reward, accuracy, frechet


def eval_prompts(per_digit: int) -> list:
    return [prompt_for(d) for d in range(len(DIGIT_WORDS)) for _ in range(per_digit)]


def _to_tensor(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]).float() / 255


def _grid(images, path, per_digit):
    """Column d holds digit d; the first 5 samples of each digit as rows."""
    from ..sample import image_grid

    rows = min(per_digit, 5)
    picked = [images[d * per_digit + r] for r in range(rows) for d in range(len(DIGIT_WORDS))]
    image_grid(picked, columns=len(DIGIT_WORDS)).save(path)
    return path


def _initial_latents(count, shape, seed):
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


def load_teacher_pipeline(teacher_dir):
    """The teacher as a diffusers StableDiffusionPipeline with DDIMScheduler."""
    from diffusers import DDIMScheduler

    pipe = load_teacher(teacher_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def teacher_images(pipe, prompts, seed, steps=50, guidance_scale=7.5, batch_size=100):
    """Classifier-free guided DDIM; the initial noise of sample i is the same as in every other row."""
    unet = pipe.unet.config
    latents = _initial_latents(len(prompts), (unet.in_channels, unet.sample_size, unet.sample_size), seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        images += pipe(prompts[chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                       latents=latents[chunk] * pipe.scheduler.init_noise_sigma).images
    return images


def student_images(sampler, prompts, seed, steps, guidance_scale=8.0, batch_size=100):
    """An LCM through our sampler (fused scheduler), from the same initial noise as the teacher's rows."""
    unet = sampler.unet.config
    latents = _initial_latents(len(prompts), (unet.in_channels, unet.sample_size, unet.sample_size), seed)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        conditioning = sampler.encode_prompts(prompts[chunk])
        sampler.scheduler.set_timesteps(steps)
        w = sampler._guidance(guidance_scale, len(conditioning))
        generator = torch.Generator().manual_seed(seed + start)
        with torch.no_grad():
            denoised = sampler.denoise(conditioning, latents[chunk] * sampler.scheduler.init_noise_sigma, w, generator)
        images += sampler.decode(denoised)
    return images


def evaluate(runs: dict, teacher_dir: str, out_dir: str, per_digit: int = 50, steps=(1, 2, 4), seed: int = 0,
             teacher_steps: int = 50) -> list:
    """runs: {row name: trained output folder (holding pipeline/)}. Writes one grid per row into out_dir
    and returns the rows."""
    os.makedirs(out_dir, exist_ok=True)
    judge, prompts, rows = Judge(), eval_prompts(per_digit), []

    def measure(name, n_steps, make_images):
        start = time.perf_counter()
        images = make_images()
        ms = (time.perf_counter() - start) * 1000 / len(images)
        slug = "-".join(re.findall(r"[a-z0-9]+", name.split(" (DDIM")[0].lower()))
        grid = _grid(images, os.path.join(out_dir, f"{slug}-{n_steps}step.png"), per_digit)
        rows.append(Row(name, n_steps, *judge(_to_tensor(images), prompts), ms, grid))

    pipe = load_teacher_pipeline(teacher_dir)
    measure("Teacher (DDIM, CFG 7.5)", teacher_steps, lambda: teacher_images(pipe, prompts, seed, steps=teacher_steps))
    from ..sample import LCMSampler

    for name, folder in runs.items():
        lora = os.path.join(folder, "lora")
        sampler = LCMSampler.from_pretrained(os.path.join(folder, "pipeline"), device="cpu",
                                             lora=lora if os.path.isdir(lora) else None)
        for n_steps in steps:
            measure(name, n_steps, lambda: student_images(sampler, prompts, seed, n_steps))
    return rows


def markdown_table(rows, relative_to=None) -> str:
    lines = ["| model | steps | expert reward ↑ | evaluator accuracy ↑ | Fréchet distance ↓ | ms / image |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        grid = os.path.relpath(r.grid, relative_to) if relative_to and r.grid else r.grid
        name = f"[{r.name}]({grid})" if grid else r.name
        lines.append(f"| {name} | {r.steps} | {r.reward:.3f} | {r.accuracy:.3f} | {r.frechet:.3f} | {r.ms_per_image:.2f} |")
    return "\n".join(lines) + "\n"
