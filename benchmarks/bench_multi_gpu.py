"""GPU benchmark: data-parallel RG-LCD training on one and several GPUs of one host (accelerate, NCCL).

Each process builds the SD2.1-architecture teacher (--arch sdxl: SDXL's, 1024 px) with random weights (the
configs and seeds of bench_train_step.py, so every rank starts from the same weights), then times
Trainer.train_step (the train-step benchmark's provider B: 768 px, batch 8 per GPU, bf16 mixed precision,
gradient checkpointing; --variant: one of its B variants instead, e.g. rglcd_fast_compile_blocks, or
rglcd_fast_fsdp: the full student and its target sharded with FSDP2), reward branch off (LCD) or on (LRM).
After the timed steps every rank's student and target weights are compared (per-tensor float64 sums and
sums of squares, gathered; FSDP: the LRM's only, the shards differ by rank): ranks in sync or the run
fails. Rank 0 appends one JSON line to --json; --report turns the lines into the results table, with the
scaling efficiency against the fewest GPUs measured (N-GPU images/s ÷ (N / M × M-GPU images/s)) and, with
--digits, the images/s of digits-world runs of `rglcd-fast train` read from their logs.csv.

    accelerate launch --num_processes 2 --multi_gpu benchmarks/bench_multi_gpu.py --reward off --json runs.jsonl
    accelerate launch --num_processes 2 --multi_gpu benchmarks/bench_multi_gpu.py --arch sdxl \\
        --variant rglcd_fast_fsdp --batch 4 --json runs.jsonl
    python benchmarks/bench_multi_gpu.py --report runs.jsonl --digits 1:DIR 2:DIR --out results/multi_gpu_<card>.md
    torchrun --nproc_per_node 2 benchmarks/bench_multi_gpu.py --small --json /tmp/runs.jsonl   # CPU (gloo) smoke run
`bash scripts/gpu_check.sh multi_gpu` runs the whole set on a machine of several GPUs.
"""

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

from report import commit_id  # noqa: E402
from train_step_harness import synchronize, time_steps  # noqa: E402
from train_step_models import RandomImages, build_expert, build_sdxl_teacher_parts, build_teacher_parts  # noqa: E402
from train_step_providers import TRAINER_VARIANTS, TrainerProvider  # noqa: E402
from train_step_report import PROVIDER_NAMES  # noqa: E402

ARCH_NAMES = {"sd21": "SD2.1", "sdxl": "SDXL"}


def fingerprint(modules):
    """Per-tensor float64 sum and sum of squares of every parameter and buffer: equal on every rank when
    the ranks hold the same weights (same values, same reduction order on the same kind of device)."""
    stats = [
        torch.stack([t.double().sum(), t.double().square().sum()])
        for m in modules
        for t in list(m.parameters()) + list(m.buffers())
    ]
    return torch.cat(stats)


def run(args):
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif args.small:
        device = torch.device("cpu")
    else:
        raise SystemExit("no CUDA device: run with --small for the CPU smoke run")
    t0 = time.perf_counter()
    build = build_sdxl_teacher_parts if args.arch == "sdxl" else build_teacher_parts
    parts = build(args.small, device, torch.bfloat16, "epsilon")
    expert = build_expert(args.small, device, torch.bfloat16, parts["tokenizer"]) if args.reward == "on" else None
    world = int(os.environ.get("WORLD_SIZE", 1))
    dataset = RandomImages(2 * args.batch * world, args.resolution)
    settings = types.SimpleNamespace(batch=args.batch, resolution=args.resolution)
    provider = TrainerProvider(
        parts,
        dataset,
        settings,
        device,
        "lrm" if args.reward == "on" else None,
        expert,
        tempfile.mkdtemp(prefix="rglcd_bench_multi_gpu_"),
        args.variant,
    )
    trainer = provider.trainer
    acc = trainer.accelerator
    assert acc.num_processes == world, (acc.num_processes, world)
    built_s = time.perf_counter() - t0

    def peak_gib():
        """The largest peak over the ranks since the last reset, GiB; then a reset."""
        if device.type != "cuda":
            return 0.0
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        torch.cuda.reset_peak_memory_stats(device)
        return acc.gather(peak).max().item()

    peak_gib()
    # the warm-up steps apart: DDP rebuilds its gradient buckets after the first, so the peak of the
    # first steps and the steady peak of the timed steps are reported separately
    start = time.perf_counter()
    for _ in range(args.warmup):
        provider.step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    warmup_peak = peak_gib()
    times, _, _, _ = time_steps(provider.step, device, 1, args.steps)
    steady_peak = peak_gib()

    student = acc.unwrap_model(trainer.student)
    # FSDP: every rank holds its own shard of the student and target, so only the replicated LRM compares
    modules = [] if trainer.config.fsdp else [student] + ([trainer.target] if trainer.target is not None else [])
    if trainer.guidance is not None and trainer.guidance.lrm is not None:
        modules.append(trainer.guidance.lrm)
    in_sync = None
    if modules:
        prints = acc.gather(fingerprint(modules)[None].to(device))
        in_sync = all(torch.equal(prints[0], p) for p in prints[1:])
    # every rank's step times: the slowest rank's median sets the pace (the all-reduce waits for it)
    medians = acc.gather(torch.tensor([statistics.median(times)], device=device))
    ms = medians.max().item()
    if acc.is_main_process:
        row = dict(
            world=world,
            arch=args.arch,
            reward=args.reward,
            variant=args.variant,
            small=args.small,
            batch_per_gpu=args.batch,
            resolution=args.resolution,
            ms=ms,
            rank_ms=[round(m, 2) for m in medians.tolist()],
            lo=min(times),
            hi=max(times),
            n=len(times),
            images_per_s=world * args.batch / ms * 1e3,
            peak_gib=steady_peak,
            warmup_peak_gib=warmup_peak,
            warmup_s=warmup_s,
            built_s=built_s,
            in_sync=in_sync,
            card=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)",
            torch=torch.__version__,
            backend=str(acc.state.backend),
        )
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    trainer.finish()
    if in_sync is False:
        raise SystemExit("ranks out of sync: their student / target / LRM weights differ after the timed steps")


def digits_images_per_s(folder):
    """Median images/s (all ranks together) of a `rglcd-fast train` run's logs.csv, first window left out
    (it holds the start-up)."""
    with open(os.path.join(folder, "logs.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("images_per_s")]
    values = [float(r["images_per_s"]) for r in rows[1:]] or [float(r["images_per_s"]) for r in rows]
    return statistics.median(values), int(rows[-1]["step"])


def report(args):
    with open(args.report) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{args.report}: no runs")
    commit = commit_id()
    r0 = rows[0]
    lines = [
        f"# Multi-GPU training: {r0['card']}",
        "",
        f"torch {r0['torch']}; commit {commit}; {datetime.date.today().isoformat()}; "
        f"backend {rows[-1]['backend']}, one process per GPU (accelerate launch), DDP (fsdp rows: FSDP2). Data "
        f"parallel: each GPU its own batch (the arch column's), so N GPUs train N× the images a step. "
        f"{'Tiny configs (smoke run)' if r0['small'] else 'SD2.1 or SDXL architecture with random weights'}, "
        "bf16 mixed precision, gradient checkpointing, "
        "Trainer.train_step (bench_train_step.py's provider B). ms/step: the slowest rank's median over n "
        "steps after warm-up, each from a synchronised device to a synchronised device. Peak memory: "
        "torch.cuda.max_memory_allocated, the largest rank's, over the warm-up steps (DDP rebuilds its "
        "buckets after the first) and over the timed steps. Scaling "
        "efficiency: N-GPU images/s ÷ (N / M × M-GPU images/s), M the fewest GPUs of that row group (1, or "
        "for a student that fits only sharded, 2). In sync: every rank's student, EMA target and LRM "
        "weights compared after the timed steps (FSDP: the LRM only; the student's shards differ by rank).",
        "",
        "| arch | trainer | reward branch | GPUs | ms/step (min–max, n) | images/s | scaling efficiency | "
        "peak GiB / GPU: warm-up, timed steps | in sync |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r.setdefault("variant", "rglcd_fast")  # rows written before --variant existed
        r.setdefault("arch", "sd21")  # and before --arch
    for arch, variant in dict.fromkeys((r["arch"], r["variant"]) for r in rows):
        for reward in ("off", "on"):
            runs = sorted(
                (r for r in rows if (r["arch"], r["variant"], r["reward"]) == (arch, variant, reward)),
                key=lambda r: r["world"],
            )
            base = runs[0] if runs else None  # the fewest GPUs
            for r in runs:
                expected = r["world"] / base["world"] * base["images_per_s"]
                eff = f"{r['images_per_s'] / expected:.1%}" if r["world"] > base["world"] else "–"
                label = "on (LRM)" if reward == "on" else "off"
                sync = {True: "yes", False: "NO", None: "– (sharded)"}[r["in_sync"]]
                lines.append(
                    f"| {ARCH_NAMES[arch]}, {r['resolution']} px, batch {r['batch_per_gpu']} / GPU | "
                    f"{PROVIDER_NAMES[variant]} | {label} | {r['world']} | "
                    f"{r['ms']:.1f} ({r['lo']:.1f}–{r['hi']:.1f}, n={r['n']}) | {r['images_per_s']:.2f} | "
                    f"{eff} | {r['warmup_peak_gib']:.1f}, {r['peak_gib']:.1f} | "
                    f"{sync} |"
                )
    if args.digits:
        runs = []
        for spec in args.digits:
            gpus, folder = spec.split(":", 1)
            runs.append((int(gpus), folder) + digits_images_per_s(folder))
        one = next((ips for gpus, _, ips, _ in runs if gpus == 1), None)
        lines += [
            "",
            "Digits world, `accelerate launch -m rglcd_fast.cli train` (the default run: LRM reward, "
            "batch 32 per GPU), images/s from logs.csv (median over the logging windows after the first):",
            "",
            "| GPUs | steps | images/s | scaling efficiency |",
            "|---|---|---|---|",
        ]
        for gpus, _, ips, steps in sorted(runs):
            eff = f"{ips / (gpus * one):.1%}" if one and gpus > 1 else "–"
            lines.append(f"| {gpus} | {steps} | {ips:.1f} | {eff} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCH_NAMES), default="sd21", help="the teacher's architecture")
    parser.add_argument("--reward", choices=("off", "on"), default="off")
    parser.add_argument(
        "--variant",
        choices=sorted(TRAINER_VARIANTS),
        default="rglcd_fast",
        help="the trainer's settings (bench_train_step.py's B variants; default: its defaults)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --small: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 1 (default 3; --small: 1)")
    parser.add_argument("--batch", type=int, default=None, help="per GPU (default 8; --small: 2)")
    parser.add_argument("--resolution", type=int, default=None, help="default 768, SDXL 1024 (--small: 32)")
    parser.add_argument("--small", action="store_true", help="tiny configs, CPU or GPU: a quick smoke run")
    parser.add_argument("--json", default=None, help="append this run's row here (rank 0)")
    parser.add_argument("--report", default=None, help="JSON lines of runs: write the table instead of running")
    parser.add_argument(
        "--digits",
        nargs="*",
        default=[],
        metavar="GPUS:DIR",
        help="with --report: `rglcd-fast train` output folders and their GPU counts",
    )
    parser.add_argument("--out", default=None, help="with --report: the markdown file")
    args = parser.parse_args()
    if args.report:
        return report(args)
    args.steps = args.steps or (2 if args.small else 10)
    args.warmup = max(1, args.warmup or (1 if args.small else 3))
    args.batch = args.batch or (2 if args.small else 8)
    args.resolution = args.resolution or (32 if args.small else 1024 if args.arch == "sdxl" else 768)
    run(args)


if __name__ == "__main__":
    main()
