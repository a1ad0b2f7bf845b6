"""The benchmark scripts stay runnable: each script's --help (its imports), and the multi-GPU benchmark's
sharded SDXL path as a CPU smoke run on two gloo ranks (the GPU runs are scripts/gpu_check.sh's)."""

import glob
import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
# the scripts (the op families' bench_<family>.py are pytest-benchmark modules that bench_ops.py reads)
SCRIPTS = [
    p
    for pattern in ("bench_*.py", "profile_*.py")
    for p in sorted(glob.glob(os.path.join(BENCHMARKS, pattern)))
    if "__main__" in open(p).read()
]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_benchmark_imports_and_parses(script):
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage" in done.stdout


def test_multi_gpu_benchmark_shards_an_sdxl_student(tmp_path):
    """Two gloo ranks, a tiny SDXL student sharded with FSDP2 (bench_multi_gpu.py --arch sdxl --variant
    rglcd_fast_fsdp): a row with the SDXL arch, both ranks' step times, no sync claim for the shards; the
    report writes it."""
    runs = tmp_path / "runs.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = os.path.join(BENCHMARKS, "bench_multi_gpu.py")
    args = ["--small", "--arch", "sdxl", "--variant", "rglcd_fast_fsdp", "--json", str(runs)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([*cmd, script, *args], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in runs.read_text().splitlines()]
    assert (row["arch"], row["variant"], row["world"], row["in_sync"]) == ("sdxl", "rglcd_fast_fsdp", 2, None)
    assert len(row["rank_ms"]) == 2 and row["images_per_s"] > 0
    table = tmp_path / "multi_gpu.md"
    done = subprocess.run([sys.executable, script, "--report", str(runs), "--out", str(table)], capture_output=True)
    assert done.returncode == 0 and "| SDXL, 32 px, batch 2 / GPU | B, fsdp" in table.read_text()
