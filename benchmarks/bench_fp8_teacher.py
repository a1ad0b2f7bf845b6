"""GPU experiment: the frozen teacher UNet in float8 (torchao) inside the distillation step.

SD2.1 architecture (random weights), 768 px, batch 8, the trainer's bf16 autocast. The teacher's cond + uncond
pass (its nn.Linear layers: attention projections, feed-forwards, time / text projections) runs in one of:
  fp32  float32 weights and activations, autocast and TF32 off: the reference loss
  bf16  bfloat16 weights under autocast: what the trainer runs today
  fp8   the bf16 teacher with torchao's Float8DynamicActivationFloat8WeightConfig (e4m3 weights and
        activations, per-row scales) on its Linear layers; convolutions stay bf16
The student and the EMA target are the same float32 modules under the same autocast in every variant, and
every variant sees the same latents, prompts and draws, so the losses differ only through the teacher.
Keep fp8 only if |loss_fp8 - loss_fp32| stays within |loss_bf16 - loss_fp32| (bf16's own rounding error).
Timings: the distillation step's forward + backward (no optimiser; the teacher's share is what changes),
eager and with the teacher compiled (torchao's float8 is meant to run under torch.compile), medians.

    python benchmarks/bench_fp8_teacher.py [--batches 4] [--steps 10] [--no-compile] [--out FILE]
"""

import argparse
import copy
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from helpers import no_tf32  # noqa: E402
from train_step_harness import timed  # noqa: E402
from train_step_models import HUBER_C, TIME_COND_PROJ_DIM, build_teacher_parts  # noqa: E402

from rglcd_fast.cli import commit_id  # noqa: E402
from rglcd_fast.train.models import make_student  # noqa: E402
from rglcd_fast.train.step import DistillationConfig, DistillationStep  # noqa: E402
from rglcd_fast.train.trainer import make_target  # noqa: E402


class Float32Teacher(torch.nn.Module):
    """The teacher outside the caller's autocast, in float32 (TF32 is off for the whole comparison)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = copy.deepcopy(unet).float()
        self.config = self.unet.config

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        with torch.autocast("cuda", enabled=False):
            return self.unet(sample.float(), timestep, encoder_hidden_states=encoder_hidden_states.float(), **kwargs)


def float8_teacher(unet):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    unet = copy.deepcopy(unet)
    # set_inductor_config=False: torchao's default turns on process-wide inductor settings (coordinate-descent
    # tuning) that would also slow the bf16 teacher's compilation
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return unet


def cell(value, spec=".1f"):
    return "–" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="batches the losses are compared on")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--steps", type=int, default=10, help="timed forward + backward passes a variant")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled-teacher timings")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        parser.error("needs a CUDA GPU with float8 matmuls (compute capability 8.9 or newer)")
    device = torch.device("cuda")
    card = torch.cuda.get_device_name()
    out = args.out or os.path.join(HERE, "results", f"fp8_teacher_{card.replace('NVIDIA ', '').split()[0]}.md")

    parts = build_teacher_parts(False, device, torch.bfloat16, "epsilon")
    teacher = parts["unet"]
    student = make_student(teacher, TIME_COND_PROJ_DIM)
    target = make_target(student)
    student.enable_gradient_checkpointing()
    teachers = {"fp32": Float32Teacher(teacher), "bf16": teacher, "fp8": float8_teacher(teacher)}
    step = DistillationStep(
        parts["noise_scheduler"], DistillationConfig(loss_type="huber", huber_c=HUBER_C), device=device
    )
    latent = args.resolution // 8
    text = teacher.config.cross_attention_dim

    def inputs(seed):
        g = torch.Generator(device).manual_seed(seed)
        latents = torch.randn(args.batch, 4, latent, latent, device=device, generator=g)
        embeds = torch.randn(args.batch, 77, text, device=device, generator=g)
        # the unconditional embedding as the text encoder gives it for "" (not zeros: torchao's per-row float8
        # scale of an all-zero row is 0, and the row quantises to 0 / 0 = NaN)
        uncond = torch.randn(1, 77, text, device=device, generator=g).expand_as(embeds)
        return latents, embeds, uncond, torch.Generator(device).manual_seed(seed + 1000)

    def run(unet, seed, backward=False):
        latents, embeds, uncond, g = inputs(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = step(student, unet, target, latents, embeds, uncond, generator=g)
        if backward:
            result.loss.backward()
            student.zero_grad(set_to_none=True)
        return result

    losses, target_err = {k: [] for k in teachers}, {k: [] for k in teachers}
    timings, compile_s = {}, {}

    def report():
        """The report so far, written to --out after each stage (a device call may end before the last)."""
        lines = [
            f"# The teacher in float8: {card}",
            "",
            f"torch {torch.__version__}, torchao {__import__('torchao').__version__}, commit {commit_id()}; SD2.1 "
            f"architecture (random weights), {args.resolution} px, batch {args.batch}, Huber c = {HUBER_C}, the "
            "trainer's bf16 autocast for the student and the target (float32 weights). The teacher's cond + uncond "
            "pass in float32 (autocast and TF32 off), bfloat16 (today's), or float8 (torchao "
            "Float8DynamicActivationFloat8WeightConfig, per-row scales, on its Linear layers; convolutions bf16).",
            "",
            "## Loss against the float32 teacher (same latents, prompts and draws)",
            "",
            "| batch | loss, fp32 teacher | bf16: loss − fp32's | fp8: loss − fp32's | target rel. error bf16 | fp8 |",
            "|---|---|---|---|---|---|",
        ]
        for i, reference in enumerate(losses["fp32"]):
            lines.append(
                f"| {i} | {reference:.6g} | {losses['bf16'][i] - reference:+.3e} | {losses['fp8'][i] - reference:+.3e} "
                f"| {target_err['bf16'][i]:.2e} | {target_err['fp8'][i]:.2e} |"
            )
        bf16_err = statistics.mean(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"]))
        fp8_err = statistics.mean(abs(a - b) for a, b in zip(losses["fp8"], losses["fp32"]))
        verdict = (
            "stays within bf16's rounding error" if fp8_err <= bf16_err else "exceeds bf16's rounding error: not kept"
        )
        lines += [
            "",
            f"Mean |loss − fp32's|: bf16 {bf16_err:.3e}, fp8 {fp8_err:.3e} → **fp8 {verdict}**",
            "",
            "## Distillation step, forward + backward (no optimiser), median ms",
            "",
            "| teacher | eager | compiled teacher | compile s |",
            "|---|---|---|---|",
        ]
        for k in ("bf16", "fp8"):
            eager, compiled = cell(timings.get((k, "eager"))), cell(timings.get((k, "compiled")))
            lines.append(f"| {k} | {eager} | {compiled} | {cell(compile_s.get(k), '.0f')} |")
        peak = torch.cuda.max_memory_allocated() / 2**30
        lines += ["", f"Peak memory (all three teachers, student, target): {peak:.1f} GiB.", ""]
        with open(out, "w") as f:
            f.write("\n".join(lines))
        return "\n".join(lines)

    with no_tf32():
        for seed in range(args.batches):
            results = {k: run(unet, seed) for k, unet in teachers.items()}
            reference = results["fp32"].target.float()
            for k, r in results.items():
                losses[k].append(r.distill_loss.item())
                target_err[k].append(((r.target.float() - reference).norm() / reference.norm()).item())
            print(f"batch {seed}: losses " + ", ".join(f"{k} {v[-1]:.6g}" for k, v in losses.items()), flush=True)
    report()
    for k in ("bf16", "fp8"):
        _, timings[(k, "eager")] = timed(lambda: run(teachers[k], 0, backward=True), device, args.steps, warmup=1)
        print(f"{k} eager: {timings[(k, 'eager')]:.1f} ms", flush=True)
        report()
    for k in () if args.no_compile else ("bf16", "fp8"):
        teachers[k].compile()
        compile_s[k], timings[(k, "compiled")] = timed(lambda: run(teachers[k], 0, backward=True), device, args.steps)
        print(f"{k} compiled: {timings[(k, 'compiled')]:.1f} ms (compiled in {compile_s[k]:.0f} s)", flush=True)
        report()
    print(report())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
