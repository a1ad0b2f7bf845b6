"""GPU benchmark: the VAE decode, diffusers' upsamplers (nearest ×2, then a 3×3 convolution) against
rglcd_fast.upsample.fold_upsamplers (both as one stride-2 transposed convolution), eager and compiled, NCHW
and channels_last. The decode the LRM update runs three times a step (SD2.1 architecture, 768 px, batch 8) or
the one a sampler runs per image (--arch sdxl: 1024 px, batch 1). Random weights, bf16 (SDXL's VAE: float32
as the trainer and the pipelines keep it). Median ms over --steps decodes, each from a synchronised device to
a synchronised device; the first call's time (compilation) apart; the largest difference from the eager
unfolded decode; and, in float32 with TF32 off, the folded decode against the unfolded one.

    python benchmarks/bench_vae_decode.py [--arch sd21|sdxl] [--batch 8] [--resolution 768] [--steps 10]
           [--cudnn-benchmark]
"""

import argparse
import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

from helpers import no_tf32  # noqa: E402
from train_step_harness import timed  # noqa: E402
from train_step_models import sdxl_vae_config, vae_config  # noqa: E402

from rglcd_fast.cli import commit_id  # noqa: E402
from rglcd_fast.upsample import fold_upsamplers  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sd21", "sdxl"], default="sd21")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (sd21), 1 (sdxl)")
    parser.add_argument("--resolution", type=int, default=None, help="default 768 (sd21), 1024 (sdxl)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark: cuDNN times its algorithms"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from diffusers import AutoencoderKL

    sdxl = args.arch == "sdxl"
    batch = args.batch or (1 if sdxl else 8)
    resolution = args.resolution or (1024 if sdxl else 768)
    dtype = torch.float32 if sdxl else torch.bfloat16
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    card = torch.cuda.get_device_name()
    out = args.out or os.path.join(
        HERE, "results", f"vae_decode_{args.arch}_{card.replace('NVIDIA ', '').split()[0]}.md"
    )
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**(sdxl_vae_config(False) if sdxl else vae_config(False))).eval().requires_grad_(False)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)

    with no_tf32():  # float32: the folded decode against diffusers' (one latent, a quarter of the size)
        small = latents[:1, :, : resolution // 32, : resolution // 32]
        folded32 = copy.deepcopy(vae)
        fold_upsamplers(folded32.decoder)
        exact = (folded32.decode(small).sample - vae.decode(small).sample).abs().max().item()
        del folded32

    vae.to(dtype)
    z = latents.to(dtype)
    rows, reference = [], None
    for compiled in (False, True) if not args.no_compile else (False,):
        for folded in (False, True):
            for channels_last in (False, True):
                model = copy.deepcopy(vae)
                if folded:
                    fold_upsamplers(model.decoder)
                if channels_last:
                    model.to(memory_format=torch.channels_last)
                if compiled:
                    model.decoder.compile()
                with torch.no_grad():
                    first, ms = timed(lambda: model.decode(z).sample, device, args.steps, warmup=1)
                    image = model.decode(z).sample.float()
                reference = image if reference is None else reference
                diff = (image - reference).abs().max().item()
                rows.append((compiled, folded, channels_last, ms, first, diff))
                print(
                    f"compiled={compiled} folded={folded} channels_last={channels_last}: {ms:.1f} ms "
                    f"(first call {first:.1f} s), max diff {diff:.3g}",
                    flush=True,
                )
                torch._dynamo.reset()

    base = rows[0][3]
    lines = [
        f"# VAE decode: {card}",
        "",
        f"torch {torch.__version__}, commit {commit_id()}; {args.arch} VAE architecture (random weights), "
        f"{resolution} px, batch {batch}, {str(dtype).replace('torch.', '')}; median of {args.steps} decodes; "
        f"cudnn.benchmark {args.cudnn_benchmark}. "
        f"Folded = rglcd_fast.upsample.fold_upsamplers on the decoder. Float32 (TF32 off): the folded decode "
        f"differs from diffusers' by at most {exact:.3g}.",
        "",
        "| decoder | upsamplers | layout | ms | vs eager diffusers | first call s | max diff vs eager diffusers |",
        "|---|---|---|---|---|---|---|",
    ]
    for compiled, folded, channels_last, ms, first, diff in rows:
        lines.append(
            f"| {'compiled' if compiled else 'eager'} | {'folded' if folded else 'diffusers'} | "
            f"{'channels_last' if channels_last else 'NCHW'} | {ms:.1f} | {base / ms:.2f}× | {first:.1f} | {diff:.3g} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
