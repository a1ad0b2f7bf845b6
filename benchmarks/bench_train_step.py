"""GPU benchmark: one RG-LCD / LCD training step at Stable Diffusion 2.1 scale (random weights built from
the SD2.1 configs, no downloads), 768 px, batch 8, bf16 mixed precision, gradient checkpointing.

Providers (each: median wall time per step over --steps CUDA-synchronised steps after --warmup steps,
images/s, peak GPU memory since the provider was built):
  reference           the step as diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py
                      writes it: text encode + VAE encode of the batch in the step, teacher cond and uncond as
                      two UNet calls under the script's torch.autocast, the unfused helpers (tests/lcd_script.py),
                      Huber loss, student fp32 under accelerate bf16 autocast with gradient checkpointing,
                      torch.optim.AdamW (not fused), clip 1.0, fp32 target UNet, the script's update_ema loop.
  reference_noencode  the same step on latents and prompt embeddings encoded once before timing (no data
                      loading, no VAE or text encoder in the step): the scope of a step timed as
                      student + teacher + target + backward + AdamW + EMA.
  rglcd_fast          rglcd_fast.train.Trainer.train_step on an in-memory Teacher and data set, its defaults.
  rglcd_fast_<variant> the same with settings changed (TRAINER_VARIANTS): cl (channels_last=True),
                      bf16_target (the EMA target stored in bf16), nockpt (no gradient checkpointing),
                      decode_one_call (the LRM update's three candidates in one VAE call; reward on only), compile and
                      compile_cl (compile_unets="all", without / with channels_last), compile_frozen (the
                      teacher and target UNets and the VAE encoder), compile_blocks ("student_blocks": frozen plus the
                      student's blocks one by one), compile_blocks_decode_one_call (both: reward on only),
                      compile_blocks_cl (student_blocks with channels_last: the VAE and UNets in NHWC),
                      compile_blocks_lrm (student_blocks with the LRM's image and text towers compiled, forward
                      and backward: reward on only),
                      compile_budget ("all" with compile_memory_budget 0.5): the
                      compile variants run after every other provider, reward off unless --compile-reward
                      says otherwise.
Reward branch (--reward: off, lrm (= on), direct; both = off and lrm; all): "off" (plain LCD); "direct": the
expert's reward of the decoded one-step prediction, differentiated through the VAE decoder; "lrm" (on): the
latent-proxy reward (RG-LCD's LRM variant): reward of the one-step prediction by the LRM, then the LRM update
(decode the {prediction, target, real} latents, score them with the expert, a ViT-L/14-size CLIP with random
weights, pairwise KL, the LRM's own AdamW). For the reference both are written out with plain torch ops.
Also: a spot check that both providers' distillation losses (and student gradients) agree on the same
inputs and draws (fp32, small UNets; also with channels_last UNets), and the two losses at full scale on
one batch.

    python benchmarks/bench_train_step.py [--steps 10] [--warmup 3] [--reward off|lrm|direct|both|all] [--out FILE]
           [--providers reference,rglcd_fast,rglcd_fast_cl,...] [--variant-steps N] [--back-to-back N]
    python benchmarks/bench_train_step.py --small      # CPU smoke run: tiny configs, 2 steps
"""

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

# the pieces (tests/ and the repository are on the path only now)
from helpers import no_tf32  # noqa: E402
from train_step_harness import breakdown, time_steps  # noqa: E402
from train_step_models import RandomImages, build_expert, build_teacher_parts  # noqa: E402
from train_step_providers import (  # noqa: E402
    ReferenceProvider,
    TrainerProvider,
    restore_parts,
    spot_check_full,
    spot_check_small,
)
from train_step_report import PROVIDER_NAMES, Report  # noqa: E402

# variants measured in one reward branch only: the LRM update's decode (on); the target's dtype and
# checkpointing (off: their effect does not depend on the branch)
ONLY_REWARD = {
    "rglcd_fast_decode_one_call": "lrm",
    "rglcd_fast_compile_blocks_decode_one_call": "lrm",
    "rglcd_fast_compile_blocks_lrm": "lrm",
    "rglcd_fast_bf16_target": None,
    "rglcd_fast_nockpt": None,
}
# --reward / --compile-reward: the reward branches to run (None: off; "on" and "both" name the LRM branch)
BRANCHES = {
    "off": [None], "on": ["lrm"], "lrm": ["lrm"], "direct": ["direct"], "both": [None, "lrm"],
    "all": [None, "lrm", "direct"],
}  # fmt: skip
LABELS = {None: "off", "lrm": "on (LRM)", "direct": "on (direct)"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --small: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 1 (default 3; --small: 1)")
    parser.add_argument(
        "--variant-steps", type=int, default=None, help="timed steps of B's variants (default: --steps)"
    )
    parser.add_argument("--variant-warmup", type=int, default=None, help="their warm-up steps (default: --warmup)")
    parser.add_argument(
        "--back-to-back",
        type=int,
        default=None,
        help="A and B: steps timed together with no synchronisation between them (default: --steps; 0: off)",
    )
    parser.add_argument(
        "--phase-steps",
        type=int,
        default=None,
        help="extra steps with per-phase marks (default 3; --small: 1; 0: no breakdown)",
    )
    parser.add_argument(
        "--phase-variants", default="rglcd_fast_cl", help="B variants that also get a per-phase breakdown (comma list)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default 8 (--small: 2)")
    parser.add_argument("--resolution", type=int, default=None, help="default 768 (--small: 32)")
    parser.add_argument(
        "--providers",
        default="reference,rglcd_fast,reference_noencode",
        help="comma list of: " + ", ".join(PROVIDER_NAMES) + " (compile variants run last)",
    )
    parser.add_argument("--reward", choices=sorted(BRANCHES), default="both")
    parser.add_argument(
        "--compile-reward",
        choices=sorted(BRANCHES),
        default="off",
        help="reward branches of the compile variant (default off)",
    )
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--no-check", action="store_true", help="skip the loss spot checks")
    parser.add_argument(
        "--out", default=None, help="results markdown (default benchmarks/results/train_step_<card>.md)"
    )
    parser.add_argument("--small", action="store_true", help="tiny configs, CPU or GPU: a quick smoke run")
    args = parser.parse_args()
    small = args.small
    args.steps = args.steps if args.steps is not None else (2 if small else 10)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if small else 3))
    args.variant_steps = args.variant_steps or args.steps
    args.variant_warmup = max(1, args.variant_warmup or args.warmup)
    args.back_to_back = args.back_to_back if args.back_to_back is not None else args.steps
    args.phase_steps = args.phase_steps if args.phase_steps is not None else (1 if small else 3)
    args.batch = args.batch or (2 if small else 8)
    args.resolution = args.resolution or (32 if small else 768)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    phase_variants = {p.strip() for p in args.phase_variants.split(",") if p.strip()}
    unknown = [p for p in providers + sorted(phase_variants) if p not in PROVIDER_NAMES]
    if unknown:
        parser.error(f"--providers / --phase-variants: unknown {unknown}")
    if not small and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --small for the CPU smoke run")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card_id = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0] if device.type == "cuda" else "cpu"
    out = args.out or (
        os.path.join(tempfile.gettempdir(), "train_step_small.md")
        if small
        else os.path.join(HERE, "results", f"train_step_{card_id}.md")
    )
    report = Report(out, args, device)
    print(f"{report.card}; torch {torch.__version__}; commit {report.commit}; writing {out}", flush=True)

    if not args.no_check:
        try:
            with no_tf32():  # a float32 comparison
                line = spot_check_small(device, args.prediction_type)
        except Exception as e:  # report and go on to the timings
            traceback.print_exc()
            line = f"small fp32 check failed: {type(e).__name__}: {e}"
        print("check:", line, flush=True)
        report.checks.append(line)
        report.write()

    t0 = time.perf_counter()
    parts = build_teacher_parts(small, device, torch.bfloat16, args.prediction_type)
    dataset = RandomImages(2 * args.batch, args.resolution)
    print(f"teacher parts built in {time.perf_counter() - t0:.1f} s", flush=True)
    expert = None
    # the order of the runs: every branch's providers, then the compile variants (their compilation is long)
    runs = [
        (name, reward)
        for compiled in (False, True)
        for reward in BRANCHES[args.compile_reward if compiled else args.reward]
        for name in providers
        if ("compile" in name) == compiled and ONLY_REWARD.get(name, reward) == reward
    ]
    output_dir = tempfile.mkdtemp(prefix="rglcd_bench_train_")
    base_ms = {}
    for name, reward in runs:
        label = LABELS[reward]
        if reward and expert is None:
            expert = build_expert(small, device, torch.bfloat16, parts["tokenizer"])
        main_row = name in ("reference", "rglcd_fast", "reference_noencode")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _reset_accelerate()
        t0 = time.perf_counter()
        provider = None
        try:
            if name.startswith("rglcd_fast"):
                provider = TrainerProvider(parts, dataset, args, device, reward, expert, output_dir, variant=name)
            else:
                provider = ReferenceProvider(
                    parts, dataset, args, device, reward, expert, encode_in_step=name == "reference"
                )
            built = time.perf_counter() - t0
            times, first_s, first_loss, pipelined = time_steps(
                provider.step,
                device,
                args.warmup if main_row else args.variant_warmup,
                args.steps if main_row else args.variant_steps,
                back_to_back=args.back_to_back if name in ("reference", "rglcd_fast") else 0,
            )
        except Exception as e:  # one provider failing leaves the others' rows
            traceback.print_exc()
            report.notes.append(
                f"{PROVIDER_NAMES[name]}, reward {label}: failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            )
            report.write()
            if provider is not None:
                provider.free()
            del provider
            restore_parts(parts, expert)
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        ms = report.row(name, label, times, peak, base_ms.get(reward), first_s, first_loss, pipelined)
        if name == "reference":
            base_ms[reward] = ms
        print(
            f"{PROVIDER_NAMES[name]:58s} reward {label:11s} {ms:8.1f} ms/step  "
            f"back-to-back {'–' if pipelined is None else f'{pipelined:.1f}':>7}  peak {peak or 0:5.1f} GiB  "
            f"first step {first_s:6.1f} s "
            f"loss {first_loss:.6g}  (built in {built:.0f} s)",
            flush=True,
        )
        if args.phase_steps > 0 and name != "reference_noencode" and (main_row or name in phase_variants):
            try:
                phases = breakdown(provider.phase_step, provider.timeline, device, args.phase_steps)
                report.breakdowns.append((f"{PROVIDER_NAMES[name]}, reward {label}", phases))
                report.write()
                print("  " + ", ".join(f"{k} {v:.1f}" for k, v in phases), flush=True)
            except Exception:
                traceback.print_exc()
        if name == "reference" and not reward and not args.no_check:
            try:
                line = spot_check_full(provider, small)
            except Exception as e:
                traceback.print_exc()
                line = f"full-size check failed: {type(e).__name__}: {e}"
            print("check:", line, flush=True)
            report.checks.append(line)
            report.write()
        provider.free()
        del provider
        restore_parts(parts, expert)
    print(f"wrote {out}")


def _reset_accelerate():
    """Each provider builds its own Accelerator; drop the process-wide state the last one left."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # pragma: no cover - older accelerate
        pass


if __name__ == "__main__":
    main()
