"""Turns pytest-benchmark JSON into the markdown table committed under benchmarks/results/.

pytest benchmarks --benchmark-only --benchmark-json=bench.json
python benchmarks/report.py bench.json > benchmarks/results/cpu_<machine>.md
"""

import json
import platform
import sys
from collections import defaultdict

import torch

from rglcd_fast.cli import commit_id  # the header line of every benchmark table


def main(path):
    data = json.load(open(path))
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["params"]["provider"]] = bench["stats"]["median"] * 1e6
    commit = commit_id()
    cpu = data["machine_info"].get("cpu", {}).get("brand_raw", platform.processor())
    print(
        f"# CPU benchmark\n\nMachine: {cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"commit {commit}; date {data['datetime'][:10]}. Medians in µs (pytest-benchmark); latents 4×4×64×64 "
        "(SD1.5 at 512 px, batch 4), reward features 3×16×1024. Timings on a shared 2-core VM vary by up "
        "to ~2× between runs, the eager ones most.\n"
    )
    providers = sorted({p for g in groups.values() for p in g}, key=lambda p: p != "eager")
    print("| op | " + " | ".join(f"{p} µs" for p in providers) + " | speedup vs eager |")
    print("|---|" + "---|" * (len(providers) + 1))
    for group, medians in groups.items():
        cells = [f"{medians[p]:,.0f}" if p in medians else "–" for p in providers]
        speedup = medians.get("eager", float("nan")) / medians.get("rglcd_fast", float("nan"))
        print(f"| {group} | " + " | ".join(cells) + f" | {speedup:.1f}× |")


if __name__ == "__main__":
    main(sys.argv[1])
