"""The paper-style comparison on the digits world: the 50-step DDIM teacher with CFG, plain LCD and RG-LCD
(the direct expert RM; the latent proxy RM from random weights, pre-trained and fine-tuned online, pre-trained
and frozen) at 1, 2 and 4 steps, every row from the same prompts and initial noise, over several training seeds
(mean ± std). Columns: mean expert reward (the prompted digit's logit), held-out evaluator accuracy on the
prompted digit, Fréchet distance to the real digits in the evaluator's features, per-prompt diversity (the
mean pairwise feature distance between samples of one prompt, as a fraction of the real digits'),
milliseconds per image.

`rglcd-fast eval` trains every student with `rglcd-fast train`'s digits preset (a folder is reused only when
it holds a run of exactly the requested settings), then writes the table and one sample grid per row;
`rglcd-fast sweep` trains the reward variants over several reward scales and plots expert reward against
Fréchet distance."""

import json
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .classifiers import load_classifier, prompted_digit
from .digits import DIGIT_WORDS, DigitsDataset, prompt_for
from .teacher import load_teacher

# row name -> the training settings over the digits preset
REWARD_VARIANTS = {
    "RG-LCD (direct RM)": dict(reward_mode="direct"),
    # the LRM from random weights, trained online at the rate a random LRM needs to learn in a short run
    "RG-LCD (LRM, random init)": dict(reward_mode="lrm", lrm_path=None, lrm_learning_rate=1e-3),
    # the shipped pre-trained LRM, fine-tuned online at the official rate (3.3e-6) or frozen
    "RG-LCD (LRM, pre-trained)": dict(reward_mode="lrm", lrm_path="digits", lrm_learning_rate=None),
    "RG-LCD (LRM, pre-trained, frozen)": dict(reward_mode="lrm", lrm_path="digits", lrm_frozen=True),
}
VARIANTS = {"LCD": dict(reward_mode="none"), **REWARD_VARIANTS}
TEACHER = "Teacher (DDIM, CFG 7.5)"


@dataclass
class Row:
    """One table row: every metric as a list over seeds."""

    name: str
    steps: int
    metrics: dict = field(default_factory=dict)  # metric -> [value per seed]
    grid: str | None = None

    def add(self, **values):
        for name, value in values.items():
            self.metrics.setdefault(name, []).append(value)

    def mean(self, metric):
        return float(np.mean(self.metrics[metric]))

    def std(self, metric):
        values = self.metrics[metric]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


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


def mean_pairwise_distance(features: np.ndarray, groups) -> float:
    """The mean over groups of the mean Euclidean distance between two different members of a group
    (features [N, D], groups: N hashable labels)."""
    groups = np.asarray(groups)
    means = []
    for g in np.unique(groups):
        x = torch.from_numpy(features[groups == g])
        if len(x) > 1:
            d = torch.cdist(x, x)
            means.append(d.sum().item() / (len(x) * (len(x) - 1)))
    return float(np.mean(means))


class Judge:
    """The expert reward model and the held-out evaluator, with the real digits' evaluator features."""

    def __init__(self):
        from ..reward import load_reward_model

        self.expert = load_reward_model("digits", None)
        self.evaluator = load_classifier("evaluator")
        real = DigitsDataset()
        with torch.no_grad():
            self.real_features = self.evaluator.features(real.images).double().numpy()
        self.real_spread = mean_pairwise_distance(self.real_features, real.labels.numpy())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> dict:
        """images [N, 3, 32, 32] in [0, 1] -> {reward: the mean expert reward (the prompted digit's logit),
        accuracy: the evaluator's on the prompted digit, frechet: the Fréchet distance to the real digits,
        diversity: the mean pairwise distance between samples of one prompt / the same between real digits
        of one class}, all in the evaluator's features."""
        x = images.float() * 2 - 1
        targets = torch.tensor([prompted_digit(p) for p in prompts])
        features = self.evaluator.features(x).double().numpy()
        return {
            "reward": self.expert.logits(images, prompts).mean().item(),
            "accuracy": (self.evaluator(x).argmax(1) == targets).float().mean().item(),
            "frechet": frechet_distance(features, self.real_features),
            "diversity": mean_pairwise_distance(features, prompts) / self.real_spread,
        }


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
        images += pipe(
            prompts[chunk],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=latents[chunk] * pipe.scheduler.init_noise_sigma,
        ).images
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


def evaluate(
    runs: dict,
    teacher_dir: str,
    out_dir: str,
    per_digit: int = 50,
    steps=(1, 2, 4),
    seeds=(0,),
    teacher_steps: int = 50,
) -> list:
    """runs: {row name: [trained output folder (holding pipeline/) per seed]}. Seed s draws the initial noise
    of every row from s; the teacher row is sampled once per seed. Writes one grid per row into out_dir (the
    first seed's samples) and returns the rows (metrics over the seeds)."""
    os.makedirs(out_dir, exist_ok=True)
    judge, prompts, rows = Judge(), eval_prompts(per_digit), []
    from ..sample import LCMSampler

    def measure(name, n_steps, make_images):
        row = Row(name, n_steps)
        for seed in seeds:
            start = time.perf_counter()
            images = make_images(seed)
            row.add(
                ms_per_image=(time.perf_counter() - start) * 1000 / len(images), **judge(_to_tensor(images), prompts)
            )
            if row.grid is None:
                row.grid = _grid(
                    images, os.path.join(out_dir, f"{_slug(name.split(' (DDIM')[0])}-{n_steps}step.png"), per_digit
                )
        rows.append(row)

    pipe = load_teacher_pipeline(teacher_dir)
    measure(TEACHER, teacher_steps, lambda seed: teacher_images(pipe, prompts, seed, steps=teacher_steps))
    for name, folders in runs.items():
        samplers = {
            seed: LCMSampler.from_pretrained(os.path.join(folder, "pipeline"), device="cpu")
            for seed, folder in zip(seeds, folders)
        }
        for n_steps in steps:
            measure(name, n_steps, lambda seed: student_images(samplers[seed], prompts, seed, n_steps))
    return rows


COLUMNS = (
    ("reward", "expert reward ↑", 2),
    ("accuracy", "evaluator accuracy ↑", 3),
    ("frechet", "Fréchet distance ↓", 1),
    ("diversity", "diversity ↑", 3),
    ("ms_per_image", "ms / image", 1),
)


def markdown_table(rows, relative_to=None) -> str:
    """Mean ± std over the seeds (the mean alone for one seed)."""
    lines = [
        "| model | steps | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        grid = os.path.relpath(r.grid, relative_to) if relative_to and r.grid else r.grid
        name = f"[{r.name}]({grid})" if grid else r.name
        cells = [
            f"{r.mean(m):.{digits}f}" + (f" ± {r.std(m):.{digits}f}" if len(r.metrics[m]) > 1 else "")
            for m, _, digits in COLUMNS
        ]
        lines.append(f"| {name} | {r.steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# settings that do not change what a run trains
_RUN_ONLY = {"output_dir", "resume_from_checkpoint", "progress", "dataloader_num_workers"}


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(settings, default=list)).items() if k not in _RUN_ONLY}


def _slug(name: str) -> str:
    return "-".join(re.findall(r"[a-z0-9]+", name.lower()))


def run_folder(work_dir: str, name: str, seed: int, reward_scale: float | None = None) -> str:
    scale = [] if reward_scale is None else [f"scale-{reward_scale:g}"]
    return os.path.join(work_dir, _slug(name), *scale, f"seed-{seed}")


def train_runs(runs: dict, jobs: int = 1, quiet: bool = False) -> None:
    """runs: {output folder: settings over the digits preset}. A folder whose config.json holds exactly
    these settings and a finished pipeline/ is reused; one holding the same settings unfinished resumes
    from its latest checkpoint; one holding other settings raises (never a student trained otherwise).
    jobs > 1 trains in that many `rglcd-fast train` processes at once (log: <folder>.log)."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from ..train.config import make_config

    todo = []
    for folder, settings in runs.items():
        config = make_config(output_dir=folder, **settings)
        saved = os.path.join(folder, "config.json")
        if os.path.isfile(saved):
            with open(saved) as f:
                previous = _comparable(json.load(f))
            requested = _comparable(config.to_dict())
            differ = sorted(k for k in previous.keys() | requested.keys() if previous.get(k) != requested.get(k))
            if differ:
                raise ValueError(
                    f"{folder} holds a run with other settings ({', '.join(differ)}): remove it or "
                    "choose another --work-dir"
                )
            if os.path.isdir(os.path.join(folder, "pipeline")):
                print(f"{folder}: reusing the finished run")
                continue
            config.resume_from_checkpoint = "latest"
        todo.append(config)

    def train(config):
        from ..train.trainer import Trainer

        print(f"training {config.output_dir}")
        if jobs == 1:
            config.progress = not quiet
            trainer = Trainer(config)
            trainer.train()
            trainer.finish()
            return
        os.makedirs(config.output_dir, exist_ok=True)
        request = config.output_dir.rstrip("/") + ".json"
        config.progress = False
        config.save(request)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
        with open(config.output_dir.rstrip("/") + ".log", "w") as log:
            done = subprocess.run(
                [sys.executable, "-m", "rglcd_fast.cli", "train", "--config", request],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if done.returncode != 0:
            raise RuntimeError(f"training {config.output_dir} failed (exit {done.returncode}): see {log.name}")

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(train, todo))


def plot_reward_vs_frechet(rows, path: str, title: str) -> str:
    """Expert reward against Fréchet distance: one line per reward variant through its reward scales
    (rows named "<variant> @ <scale>"), the teacher and plain LCD as single points; error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    lines = {}
    for r in rows:
        variant, _, scale = r.name.partition(" @ ")
        lines.setdefault(variant, []).append((float(scale) if scale else None, r))
    for variant, points in lines.items():
        x = [r.mean("frechet") for _, r in points]
        y = [r.mean("reward") for _, r in points]
        style = dict(marker="o", capsize=3) if points[0][0] is not None else dict(marker="*", markersize=14, capsize=3)
        axes.errorbar(
            x,
            y,
            xerr=[r.std("frechet") for _, r in points],
            yerr=[r.std("reward") for _, r in points],
            label=variant,
            **style,
        )
        for scale, r in points:
            if scale is not None:
                axes.annotate(
                    f"{scale:g}",
                    (r.mean("frechet"), r.mean("reward")),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
    axes.set_xlabel("Fréchet distance to the real digits ↓ (held-out evaluator's features)")
    axes.set_ylabel("expert reward ↑ (the prompted digit's logit)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
