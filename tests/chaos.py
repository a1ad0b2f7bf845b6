"""Kill-anywhere resume: the trainer (tiny random SD teacher, LRM reward, CPU) runs in a subprocess that is
killed with SIGKILL at random moments, resumed with ``--resume-from-checkpoint latest`` until it finishes,
and compared with one uninterrupted run of the same settings.

    python tests/chaos.py --kills 30 [--seed 0] [--steps 6]

Two kinds of kill, drawn at random:

* timed: the parent sends SIGKILL after a random delay within an uninterrupted run's duration (counted from
  the end of the child's imports);
* at a point: the child sends itself SIGKILL at the n-th pass of a point where a crash hurts most, after
  leaving the damage a crash there leaves: a torn checkpoint file in the temporary folder, a torn COMPLETE
  marker, just before or just after the publishing rename, halfway through deleting an old checkpoint
  (pruning), a torn logs.csv line, inside the final outputs' write, at the start of a training step.

After every kill the checkpoint ``latest`` picks must equal the uninterrupted run's checkpoint of that step
(every tensor, every file); at the end the final checkpoint (student, EMA target, LRM, both optimisers,
LR scheduler, data loader, RNG states), the saved pipeline, target and LRM folders and logs.csv (every
column but the wall-clock ones) must equal the uninterrupted run's, with each step logged once. The child
appends what it reaches to a trace file, so each kill's landing point is known. Exit status 1 on any
difference; the last line is the summary."""

import argparse
import collections
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings

TESTS = os.path.dirname(os.path.abspath(__file__))
# where a point kill strikes, and how many passes of it a run makes at most (the n of a kill is drawn in
# 1..that); see arm()
POINTS = {
    "step": 3,
    "torn_entry": 16,
    "torn_marker": 3,
    "before_publish": 3,
    "after_publish": 3,
    "half_pruned": 3,
    "torn_log": 3,
    "outputs": 4,
}
WALL_CLOCK_COLUMNS = ("step_time_s", "images_per_s")


# ---------------------------------------------------------------------------------------------- child
def child(teacher, data, out, steps, keep, kill, trace_path):
    """One trainer run resuming from latest; ``kill`` = "point:n" arms a point kill (or "none")."""
    import torch

    sys.path.insert(0, TESTS)
    from tiny_pipeline import tiny_config

    from rglcd_fast.train import checkpoint
    from rglcd_fast.train import trainer as trainer_module

    trace_file = open(trace_path, "a")

    def trace(event):
        trace_file.write(event + "\n")
        trace_file.flush()

    point, _, nth = kill.partition(":")
    passes = collections.Counter()

    def strikes(name):
        """Counts a pass of point ``name``; True when the armed kill is due (the caller does the damage)."""
        passes[name] += 1
        return name == point and passes[name] == int(nth)

    def die(where):
        trace(f"killed:{where}")
        os.kill(os.getpid(), signal.SIGKILL)

    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    arm(checkpoint, trainer_module, trace, strikes, die, truncate)
    torch.use_deterministic_algorithms(True)
    trace("start")
    run = trainer_module.Trainer(
        tiny_config(
            (teacher, data),
            out,
            max_train_steps=steps,
            checkpointing_steps=1,
            checkpoints_total_limit=keep,
            report_to="none",
            resume_from_checkpoint="latest",
        )
    )
    trace(f"resumed:{run.step}")
    run.train()
    trace("done")


def arm(checkpoint, trainer_module, trace, strikes, die, truncate):
    """Wraps the checkpoint module's and the trainer's writers: each pass is traced, and the armed one
    leaves a crash's damage and dies."""
    write_entry, write_text, rename_dir = checkpoint._write_entry, checkpoint.write_text, checkpoint._rename_dir
    rmtree, train_step, csv_write = (
        checkpoint.shutil.rmtree,
        trainer_module.Trainer.train_step,
        trainer_module.CsvLog.write,
    )
    write_folder = trainer_module.write_folder

    def _write_entry(folder, name, obj, kind):
        trace(f"write:{name}")
        write_entry(folder, name, obj, kind)
        if strikes("torn_entry"):
            truncate(os.path.join(folder, checkpoint._filename(name, kind)))
            die(f"torn_entry:{name}")

    def _write_text(path, text):
        is_marker = os.path.basename(path) == checkpoint.COMPLETE
        if is_marker and strikes("torn_marker"):
            with open(path, "w") as f:
                f.write(text[: len(text) // 2])
            die("torn_marker")
        write_text(path, text)

    def _rename_dir(src, dst):
        trace(f"publish:{os.path.basename(dst)}")
        if strikes("before_publish"):
            die("before_publish")
        rename_dir(src, dst)
        if strikes("after_publish"):
            die("after_publish")

    def _rmtree(path, ignore_errors=False):
        trace(f"rmtree:{os.path.basename(path)}")
        if os.path.basename(path).startswith("checkpoint-") and strikes("half_pruned"):
            files = sorted(os.listdir(path))
            for name in files[: len(files) // 2]:
                os.remove(os.path.join(path, name))
            die(f"half_pruned:{os.path.basename(path)}")
        rmtree(path, ignore_errors=ignore_errors)

    def _train_step(self, batches):
        trace(f"step:{self.step + 1}")
        if strikes("step"):
            die("step")
        return train_step(self, batches)

    def _csv_write(self, row):
        trace(f"log:{row['step']}")
        csv_write(self, row)
        if strikes("torn_log"):
            with open(self.path, "r+b") as f:
                f.truncate(os.path.getsize(self.path) - 5)
            die("torn_log")

    def _write_folder(path, write):
        trace(f"outputs:{os.path.basename(path)}")

        def write_then_maybe_die(tmp):
            write(tmp)
            if strikes("outputs"):
                die(f"outputs:{os.path.basename(path)}")

        write_folder(path, write_then_maybe_die)

    checkpoint._write_entry, checkpoint.write_text, checkpoint._rename_dir = _write_entry, _write_text, _rename_dir
    checkpoint.shutil = type(sys)("shutil_traced")
    checkpoint.shutil.rmtree = _rmtree
    trainer_module.Trainer.train_step, trainer_module.CsvLog.write = _train_step, _csv_write
    trainer_module.write_folder = _write_folder


# --------------------------------------------------------------------------------------------- parent
def run_child(world, out, steps, keep, kill, trace, delay=None):
    """(exit code, seconds from the child's start past its imports to its end); ``delay``: SIGKILL from here
    that many seconds after that start."""
    cmd = [sys.executable, os.path.abspath(__file__), "child", *world, out, str(steps), str(keep), kill, trace]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with open(trace, "a") as f:
        f.write("launch\n")
    with open(trace) as f:
        traced = len(f.read())
    with open(trace + ".stderr", "a") as stderr:
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        while process.poll() is None:  # imports take most of a tiny run: the clock starts after them
            with open(trace) as f:
                if "start\n" in f.read()[traced:]:
                    break
            time.sleep(0.01)
        start = time.perf_counter()
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            with open(trace, "a") as f:
                f.write("killed:timed\n")
            process.send_signal(signal.SIGKILL)
            process.wait()
    return process.returncode, time.perf_counter() - start


def load_any(path):
    """A checkpoint or output file's content in a comparable form."""
    import torch
    from safetensors.torch import load_file

    if path.endswith(".safetensors"):
        return load_file(path)
    if path.endswith(".pt"):
        return torch.load(path, weights_only=True)
    with open(path, "rb") as f:
        return f.read()


def differences(a, b, where=""):
    """Paths at which two loaded values differ (tensors bit for bit; NaN equals NaN)."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):

        def bits(t):
            return t.detach().contiguous().reshape(-1).view(torch.uint8)

        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def folder_differences(ref, got):
    names = sorted(os.listdir(ref))
    if names != sorted(os.listdir(got)):
        return [f"{got}: files {sorted(os.listdir(got))} != {names}"]
    out = []
    for name in names:
        if os.path.isdir(os.path.join(ref, name)):
            out += folder_differences(os.path.join(ref, name), os.path.join(got, name))
        else:
            out += [
                f"{got}/{name}{d}"
                for d in differences(load_any(os.path.join(ref, name)), load_any(os.path.join(got, name)))
            ]
    return out


def log_rows(out):
    with open(os.path.join(out, "logs.csv"), newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK_COLUMNS} for row in csv.DictReader(f)]


def final_differences(ref, got, steps):
    out = folder_differences(os.path.join(ref, f"checkpoint-{steps}"), os.path.join(got, f"checkpoint-{steps}"))
    for folder in ("pipeline/unet", "unet_target", "lrm"):
        out += [
            d
            for d in folder_differences(os.path.join(ref, folder), os.path.join(got, folder))
            if not d.endswith("README.md")
        ]  # the model card names its own folder's run
    rows = log_rows(got)
    if [int(r["step"]) for r in rows] != list(range(1, steps + 1)):
        out.append(f"logs.csv steps {[r['step'] for r in rows]}")
    elif rows != log_rows(ref):
        out.append("logs.csv values")
    return out


def landing(trace_lines):
    """Where a kill landed: the point kill's name, or (timed) the phase of the last traced event."""
    last = trace_lines[-1]
    if last.startswith("killed:") and last != "killed:timed":
        return "point " + last.split(":")[1]
    phase = trace_lines[-2].split(":")[0]
    return "timed, " + {
        "done": "after the run",
        "start": "setup (models, data)",
        "resumed": "setup (models, data)",
        "step": "training step",
        "write": "checkpoint write",
        "publish": "checkpoint publish",
        "rmtree": "pruning / clean-up",
        "log": "after a log write",
        "outputs": "final outputs",
    }.get(phase, phase)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--kills", type=int, default=30, help="stop after this many kills (at least)")
    parser.add_argument("--steps", type=int, default=6, help="training steps of one run")
    parser.add_argument("--keep", type=int, default=2, help="checkpoints_total_limit of the killed runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--first",
        default="",
        help="comma-separated kills to make first, each 'point:n' or "
        "'timed' (then random ones); e.g. torn_entry:3,half_pruned:1",
    )
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    sys.path.insert(0, TESTS)
    from tiny_pipeline import save_tiny_world

    from rglcd_fast.train.checkpoint import latest_checkpoint, list_checkpoints

    rng = random.Random(args.seed)
    root = args.workdir or tempfile.mkdtemp(prefix="rglcd-chaos-")
    world = save_tiny_world(os.path.join(root, "world"))
    reference = os.path.join(root, "reference")
    code, seconds = run_child(world, reference, args.steps, 0, "none", os.path.join(root, "reference.trace"))
    if code != 0:
        sys.exit(f"the uninterrupted run failed (exit {code}); see {root}/reference.trace.stderr")
    print(f"uninterrupted run: {args.steps} steps in {seconds:.1f} s ({root})", flush=True)

    first = [kill for kill in args.first.split(",") if kill]
    for kill in first:
        if kill != "timed" and kill.partition(":")[0] not in POINTS:
            parser.error(f"--first: unknown kill {kill!r} (points: {', '.join(sorted(POINTS))}, or timed)")
    kills, landings, problems, rounds, resumes, damaged_skipped = 0, collections.Counter(), [], 0, 0, 0
    while kills < args.kills:
        rounds += 1
        out, trace = os.path.join(root, f"round-{rounds}"), os.path.join(root, f"round-{rounds}.trace")
        while True:
            if first:
                kill = first.pop(0)
            else:
                point = rng.choice(sorted(POINTS))
                kill = "timed" if rng.random() < 0.5 else f"{point}:{rng.randint(1, POINTS[point])}"
            timed = kill == "timed"
            # a resumed run is shorter: the delay is drawn within what is left of it (setup counted as a step)
            done = ([0] + [step for step, _ in list_checkpoints(out)])[-1]
            code, _ = run_child(
                world,
                out,
                args.steps,
                args.keep,
                "none" if timed else kill,
                trace,
                delay=rng.uniform(0, seconds * (args.steps - done + 1) / (args.steps + 1)) if timed else None,
            )
            resumes += 1
            if code == 0:
                break
            if code != -signal.SIGKILL:
                sys.exit(f"round {rounds}: the run failed by itself (exit {code}); see {trace}.stderr")
            kills += 1
            with open(trace) as f:
                landings[landing(f.read().splitlines())] += 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                latest = latest_checkpoint(out)
            damaged_skipped += len(caught)
            if latest is not None:  # the checkpoint a resume would take: the uninterrupted run's of that step
                found = folder_differences(os.path.join(reference, os.path.basename(latest)), latest)
                problems += [f"round {rounds}, after kill {kills}: {d}" for d in found]
        found = final_differences(reference, out, args.steps)
        problems += [f"round {rounds}, final: {d}" for d in found]
        print(f"round {rounds}: finished after {kills} kills in all; {len(found)} differences", flush=True)

    print("where the kills landed:")
    for where, count in sorted(landings.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {count:3d}  {where}")
    for problem in problems:
        print("DIFFERENCE", problem)
    summary = dict(
        kills=kills,
        runs=resumes,
        rounds=rounds,
        damaged_checkpoints_skipped=damaged_skipped,
        differences=len(problems),
        landings=dict(landings),
    )
    print(json.dumps(summary))
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        teacher, data, out, steps, keep, kill, trace = sys.argv[2:]
        child(teacher, data, out, int(steps), int(keep) or None, kill, trace)
    else:
        sys.exit(main())
