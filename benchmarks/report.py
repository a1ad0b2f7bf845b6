"""Turns pytest-benchmark JSON into the markdown table committed under benchmarks/results/.

    pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json > benchmarks/results/cpu_<machine>.md
"""
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict

import torch


def commit_id() -> str:
    """The commit measured: $RGLCD_COMMIT where set (the device's copy of the tree may hold a stale .git),
    else this checkout's short HEAD, else "unknown"."""
    return os.environ.get("RGLCD_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"


def main(path):
    data = json.load(open(path))
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["params"]["provider"]] = bench["stats"]["median"] * 1e6
    commit = commit_id()
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", platform.processor())
    print(f"# CPU benchmark\n\nMachine: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"commit {commit}; date {data['datetime'][:10]}. Medians in µs (pytest-benchmark); latents 4×4×64×64 "
          "(SD1.5 at 512 px, batch 4), reward features 3×16×1024. Timings on a shared 2-core VM vary by up "
          "to ~2× between runs, the eager ones most.\n")
    providers = sorted({p for g in groups.values() for p in g}, key=lambda p: p != "eager")
    print("| op | " + " | ".join(f"{p} µs" for p in providers) + " | speedup vs eager |")
    print("|---|" + "---|" * (len(providers) + 1))
    for group, medians in groups.items():
        cells = [f"{medians[p]:,.0f}" if p in medians else "–" for p in providers]
        speedup = medians.get("eager", float("nan")) / medians.get("rglcd_fast", float("nan"))
        print(f"| {group} | " + " | ".join(cells) + f" | {speedup:.1f}× |")


if __name__ == "__main__":
    main(sys.argv[1])
