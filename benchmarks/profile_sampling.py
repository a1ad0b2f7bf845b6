"""Where the eager sampling calls spend host time: torch.profiler over a few prompt → PIL calls of diffusers'
pipeline and of LCMSampler on the same modules (bench_sampling's), printing each one's wall ms per call, its
host-device synchronisations and copies, and the ops with the most host time.

    python benchmarks/profile_sampling.py [--arch sd15|sdxl] [--batch 1] [--calls 3]
    python benchmarks/profile_sampling.py --small --device cpu    # smoke run
"""

import argparse
import time

import torch
from bench_sampling import PROMPT, diffusers_pipeline, make_sampler
from torch.profiler import ProfilerActivity, profile
from train_step_harness import synchronize

# runtime calls that make the host wait for the device (a blocking copy is a memcpy then a stream sync)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def profiled(name, fn, device, calls):
    for _ in range(2):  # warm-up
        fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        ms = (time.perf_counter() - start) * 1e3 / calls
    events = prof.key_averages()
    counts = {e.key: e.count // calls for e in events if e.key in SYNCS}
    print(f"\n== {name}: {ms:.1f} ms a call (profiled); per call: {counts or 'no host-device syncs'}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    sampler = make_sampler(args.arch, args.small, device, torch.float16 if device.type == "cuda" else torch.float32)
    pipe = diffusers_pipeline(sampler)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPT] * args.batch
    size = sampler.size()[0]
    generator = torch.Generator(device)
    call = dict(num_inference_steps=args.steps, guidance_scale=8.0, height=size, width=size)
    profiled("diffusers eager", lambda: pipe(prompts, generator=generator.manual_seed(0), **call), device, args.calls)
    profiled("rglcd_fast eager", lambda: sampler(prompts, steps=args.steps, seed=0), device, args.calls)


if __name__ == "__main__":
    main()
