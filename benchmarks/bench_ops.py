"""GPU op benchmark: for each op family, eager reference vs torch.compile of the reference vs
rglcd_fast, forward / backward / forward+backward, at Stable Diffusion latent shapes, fp32 and bf16.
Reports median µs (CUDA events through triton's do_bench), the cost per call inside a replayed CUDA
graph (what a captured training step or sampler pays: no Python, dispatch or launch gaps), the kernel
time alone (profiler), the achieved GB/s of our kernels, % of the device-to-device copy bandwidth measured
in the same run, the bandwidth floor, and the speedups. Writes benchmarks/results/ops_<card>.md.

    python benchmarks/bench_ops.py [--families consistency,solver,reward] [--quick] [--out FILE]
"""

import argparse
import datetime
import os
import sys

import torch
import torch._functorch.config

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

from gpu_cases import LATENT_SHAPES  # noqa: E402
from report import commit_id  # noqa: E402

FAMILY_MODULES = ("consistency", "solver", "reward")  # benchmarks/bench_<family>.py, each with gpu_cases()

PROVIDERS = ("eager", "compile", "rglcd_fast")


# The backward-only cases call backward repeatedly on one compiled graph (retain_graph), which
# torch.compile's donated buffers forbid.
torch._functorch.config.donated_buffer = False


def do_bench(fn):
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs


def copy_bandwidth_gbs():
    """Device-to-device copy of 1 GiB, bytes read + written over the median time."""
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    us = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def autograd_floor_us():
    """A minimal forward+backward in PyTorch, (2·m).sum() and its backward on an SD2.1-768 B16 latent:
    the host-side floor (Python, dispatch, the autograd engine's device thread) under every fwd+bwd row."""
    m = torch.randn(LATENT_SHAPES["SD2.1-768 B16"], device="cuda", requires_grad=True)

    def step():
        m.mul(2).sum().backward()

    return do_bench(step)


def kernel_us(fn, iters=20):
    """Device time of the kernels fn launches (no Python or launch gaps), per call."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total / iters


def graph_us(fn, calls=20):
    """Per-call time of fn inside a replayed CUDA graph of `calls` calls (captured on the side stream it warmed
    up on, as torch.cuda.graphs' docs do; the generators fn draws from, its attribute `generators`, registered
    with the graph); NaN where fn cannot be captured (the reason is printed)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for generator in getattr(fn, "generators", ()):
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, stream=side):
            for _ in range(calls):
                fn()
    except RuntimeError as error:
        print(f"  not capturable: {str(error).splitlines()[0]}")
        torch.cuda.synchronize()
        return float("nan")
    return do_bench(graph.replay) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILY_MODULES))
    parser.add_argument("--quick", action="store_true", help="one latent shape and dtype (smoke test)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import rglcd_fast

    if not rglcd_fast.has_cuda_kernels():
        sys.exit(f"rglcd_fast has no CUDA kernels here ({rglcd_fast.extension_load_error()})")
    card = torch.cuda.get_device_name()
    commit = commit_id()
    copy_gbs = copy_bandwidth_gbs()
    floor_fwd_bwd_us = autograd_floor_us()
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]

    card_id = card.replace("NVIDIA ", "").replace(" ", "_")
    out = args.out or os.path.join(HERE, "results", f"ops_{card_id}.md")

    def write_table():  # after every case, so an interrupted run keeps what it measured
        lines = [
            f"# Op benchmark: {card}",
            "",
            f"torch {torch.__version__}, CUDA {torch.version.cuda}; commit {commit}; "
            f"{datetime.date.today().isoformat()}. Medians of CUDA-event timings (triton do_bench), µs. "
            f"'kernel' is the device time of our kernels alone (profiler). Copy bandwidth measured in this "
            f"run: {copy_gbs:,.0f} GB/s (bytes read + written); the floor moves each input once and each "
            f"output once at that rate. A minimal PyTorch forward+backward ((2·m).sum() at SD2.1-768 B16, "
            f"fp32) takes {floor_fwd_bwd_us:.1f} µs here: the host floor under every fwd+bwd row. Latent shapes: "
            + ", ".join(f"{k} = {'×'.join(map(str, v))}" for k, v in LATENT_SHAPES.items())
            + ".",
            "",
            "| op | shape | dtype | eager | compile | rglcd_fast | in graph | kernel | GB/s | % copy bw | floor "
            "| vs eager | vs compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, shape, dtype, t, kernel, achieved, pct, floor_us in rows:
            lines.append(
                f"| {name} | {shape} | {dtype} | {t['eager']:.1f} | {t['compile']:.1f} | "
                f"{t['rglcd_fast']:.1f} | {t['in graph']:.1f} | {kernel:.1f} | {achieved:,.0f} | {pct:.0f}% | "
                f"{floor_us:.1f} | "
                f"{t['eager'] / t['rglcd_fast']:.1f}× | {t['compile'] / t['rglcd_fast']:.1f}× |"
            )
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")

    rows = []
    for family in args.families.split(","):
        module = __import__(f"bench_{family}")
        for case in module.gpu_cases(quick=args.quick, dtypes=dtypes):
            torch._dynamo.reset()  # each case's compile row one fresh graph (not an 8-deep recompile cache)
            timings = {}
            for provider in PROVIDERS:
                fn = case.make(provider)
                timings[provider] = do_bench(fn)
                if provider == "rglcd_fast":
                    kernel = kernel_us(fn)
                    timings["in graph"] = graph_us(fn)
            floor_us = case.min_bytes / (copy_gbs * 1e9) * 1e6
            achieved = case.our_bytes / (kernel * 1e-6) / 1e9 if kernel > 0 else float("nan")
            rows.append(
                (
                    case.name,
                    case.shape_name,
                    case.dtype_name,
                    timings,
                    kernel,
                    achieved,
                    100 * achieved / copy_gbs,
                    floor_us,
                )
            )
            t = timings
            print(
                f"{case.name:42s} {case.shape_name:12s} {case.dtype_name:5s} eager {t['eager']:8.1f} "
                f"compile {t['compile']:8.1f} ours {t['rglcd_fast']:7.1f} (in graph {t['in graph']:6.1f}, kernel "
                f"{kernel:6.1f}) µs  "
                f"{achieved:6.0f} GB/s {100 * achieved / copy_gbs:4.0f}%  "
                f"x{t['eager'] / t['rglcd_fast']:.1f} eager x{t['compile'] / t['rglcd_fast']:.1f} compile",
                flush=True,
            )
            write_table()

    print(f"wrote {out}")


if __name__ == "__main__":
    main()
