"""Memory of an LCM-LoRA run's UNets at the Stable Diffusion 1.5 UNet config (random weights, no downloads):
"two_unets" — a float32 LoRA copy of the teacher beside the teacher (rglcd_fast before the LoRA student moved
onto the teacher's UNet); "one_unet" — the adapters on the teacher's own UNet, its passes with them off
(rglcd_fast.train.models.add_lora / WithoutAdapters, as diffusers' LCD-LoRA scripts). Each variant runs in a
fresh process: the UNets are built in the weight dtype, then one distillation step (teacher, target = student,
student backward, AdamW over the adapters) at batch 1 runs; reported: resident memory (CPU: RSS after the
models are built and the peak RSS; CUDA: allocated after building and the peak).

    python benchmarks/bench_lora_memory.py [--dtype fp32|bf16] [--device cpu|cuda] [--latent 32] [--out FILE]
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..")]
from report import commit_id  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def measure(variant: str, dtype: torch.dtype, device: str, latent: int) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from rglcd_fast.train import DistillationConfig, DistillationStep
    from rglcd_fast.train.models import LORA_TARGET_MODULES, WithoutAdapters, add_lora

    torch.manual_seed(0)
    with torch.device(device):
        teacher = UNet2DConditionModel(**SD15_UNET).to(dtype).requires_grad_(False).eval()
    if variant == "two_unets":  # a float32 copy of the teacher carries the adapters
        student = copy.deepcopy(teacher).float()
        student.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=LORA_TARGET_MODULES))
        teacher_unet = teacher
    else:
        student = add_lora(teacher, 64, 64)
        teacher_unet = WithoutAdapters(student)
    student.enable_gradient_checkpointing()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if device == "cuda":
        torch.cuda.synchronize()
        built = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        built = rss_gib()
    step = DistillationStep(
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        DistillationConfig(),
        device=device,
    )
    latents = torch.randn(1, 4, latent, latent, device=device)
    embeds, uncond = torch.randn(1, 77, 768, device=device), torch.zeros(1, 77, 768, device=device)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = step(
            student, teacher_unet, student, latents, embeds, uncond, generator=torch.Generator(device).manual_seed(0)
        )
    out.loss.backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return dict(
        variant=variant,
        built_gib=round(built, 2),
        peak_gib=round(peak, 2),
        trainable_m=round(sum(p.numel() for p in params) / 1e6, 2),
        loss=float(out.loss),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the weight dtype (mixed precision)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", type=int, default=32, help="latent size of the step (64: 512 px)")
    parser.add_argument("--out", default=None, help="append the markdown rows here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a child process: one variant
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, DTYPES[args.dtype], args.device, args.latent)))
        return
    rows = []
    for variant in ("two_unets", "one_unet"):
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--dtype",
                args.dtype,
                "--device",
                args.device,
                "--latent",
                str(args.latent),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    kind = "GPU allocated" if args.device == "cuda" else "resident (RSS)"
    lines = [
        f"LCM-LoRA (rank 64) at the SD1.5 UNet config, weights {args.dtype}, one step at batch 1, "
        f"{args.latent}×{args.latent} latents; {where}, torch {torch.__version__}, commit {commit_id()}.",
        "",
        f"| UNets | trainable (M) | {kind} after building (GiB) | peak (GiB) | loss |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['trainable_m']} | {r['built_gib']} | {r['peak_gib']} | {r['loss']:.6f} |" for r in rows
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
