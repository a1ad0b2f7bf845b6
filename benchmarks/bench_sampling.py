"""GPU sampling benchmark: a 4-step LCM denoising loop with an SD1.5-architecture UNet (random
weights, time_cond_proj_dim=256), 512 px, fp16, batch 1 and 4. Providers, timed in one run:
diffusers' LCMScheduler loop eager; the same loop with torch.compile(unet); our FusedLCMScheduler
loop eager; our CUDA-graph sampler; plus the full sampler (text encoder + loop + VAE decode).
Writes benchmarks/results/sampling_<card>.md.

    python benchmarks/bench_sampling.py [--batches 1,4] [--steps 4] [--no-compile]
"""
import argparse
import datetime
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]


def median_ms(fn, warmup=3, runs=15):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def sd15_sampler(dtype):
    """SD1.5-architecture components with random weights (configs only, no downloads)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rglcd_fast.sample import LCMSampler
    from rglcd_fast.schedulers import FusedLCMScheduler
    from tiny_pipeline import tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), time_cond_proj_dim=256)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    tokenizer, vocab_size = tiny_tokenizer(os.path.join("/tmp", "rglcd_bench_tokenizer"))
    tokenizer.model_max_length = 77
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77))
    scheduler = FusedLCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    device = torch.device("cuda")
    return LCMSampler(unet=unet.to(device, dtype).eval(), vae=vae.to(device, dtype).eval(),
                      text_encoder=text_encoder.to(device, dtype).eval(), tokenizer=tokenizer, scheduler=scheduler,
                      device=device, dtype=dtype)


def diffusers_loop(unet, scheduler, prompt_embeds, latents, w_embedding, steps, seed):
    """The LatentConsistencyModelPipeline loop as diffusers runs it."""
    generator = torch.Generator("cuda").manual_seed(seed)
    scheduler.set_timesteps(steps, device="cuda")
    for t in scheduler.timesteps:
        model_pred = unet(latents, t, timestep_cond=w_embedding, encoder_hidden_states=prompt_embeds,
                          return_dict=False)[0]
        latents, denoised = scheduler.step(model_pred, t, latents, generator=generator, return_dict=False)
    return denoised


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from diffusers import LCMScheduler

    dtype = torch.float16
    sampler = sd15_sampler(dtype)
    diffusers_scheduler = LCMScheduler.from_config(sampler.scheduler.config)
    card = torch.cuda.get_device_name()
    commit = os.environ.get("RGLCD_COMMIT") or subprocess.run(  # the device's copy may hold a stale .git
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip() or "unknown"
    rows = []
    compiled_unet, compile_seconds = None, None
    for batch in map(int, args.batches.split(",")):
        prompts = ["a photo of a cat"] * batch
        prompt_embeds = sampler.encode_prompts(prompts)
        latents = sampler.initial_latents(batch, 512, 512, torch.Generator("cuda").manual_seed(0))
        w_embedding = sampler._guidance(8.0, batch)
        steps = args.steps
        times = {}
        times["diffusers LCMScheduler loop, eager"] = median_ms(
            lambda: diffusers_loop(sampler.unet, diffusers_scheduler, prompt_embeds, latents, w_embedding, steps, 0))
        if not args.no_compile:
            if compiled_unet is None:
                compiled_unet = torch.compile(sampler.unet)
                start = time.perf_counter()
                diffusers_loop(compiled_unet, diffusers_scheduler, prompt_embeds, latents, w_embedding, steps, 0)
                torch.cuda.synchronize()
                compile_seconds = time.perf_counter() - start
            times["diffusers loop, torch.compile(unet)"] = median_ms(
                lambda: diffusers_loop(compiled_unet, diffusers_scheduler, prompt_embeds, latents, w_embedding,
                                       steps, 0))

        def fused_eager():
            sampler.scheduler.set_timesteps(steps, device="cuda")
            return sampler.denoise(prompt_embeds, latents, w_embedding, torch.Generator("cuda").manual_seed(0))
        times["rglcd_fast FusedLCMScheduler loop, eager"] = median_ms(fused_eager)
        sampler.scheduler.set_timesteps(steps, device="cuda")
        graph = sampler._graph_for(prompt_embeds, 512, 512, steps, 8.0)
        times["rglcd_fast CUDA-graph loop (replay; initial latents included)"] = median_ms(graph.graph.replay)
        times["full sampler (text encoder + loop + VAE decode), eager"] = median_ms(
            lambda: sampler(prompts, steps=steps, seed=0, height=512, width=512), runs=5)
        times["full sampler, CUDA-graph loop"] = median_ms(
            lambda: sampler(prompts, steps=steps, seed=0, height=512, width=512, cuda_graph=True), runs=5)
        # the graph replay and the eager fused loop compute the same latents
        graphed = sampler.latents(prompts, steps=steps, seed=0, height=512, width=512, cuda_graph=True)
        eager = sampler.latents(prompts, steps=steps, seed=0, height=512, width=512)
        max_diff = (graphed.float() - eager.float()).abs().max().item()
        base = times["diffusers LCMScheduler loop, eager"]
        for name, ms in times.items():
            speedup = base / ms if "loop" in name and "full" not in name else None  # loops against loops only
            rows.append((batch, name, ms, speedup))
            print(f"batch {batch}  {name:58s} {ms:8.2f} ms" + (f"  x{speedup:.2f}" if speedup else ""), flush=True)
        print(f"batch {batch}: max |graph - eager| = {max_diff:.3g}")

    lines = [f"# Sampling benchmark: {card}", "",
             f"torch {torch.__version__}; commit {commit}; {datetime.date.today().isoformat()}. SD1.5-architecture "
             f"UNet (random weights, time_cond_proj_dim=256), 512 px, fp16, {args.steps} LCM steps; medians of "
             "CUDA-event timings, ms (loop rows: from prompt embeddings and initial latents to the last denoised "
             "latents)."
             + (f" torch.compile(unet) took {compile_seconds:.0f} s to compile." if compile_seconds else ""), "",
             "| batch | provider | ms | speedup vs diffusers eager loop |", "|---|---|---|---|"]
    lines += [f"| {b} | {name} | {ms:.2f} | {f'{s:.2f}×' if s else '–'} |" for b, name, ms, s in rows]
    card_id = card.replace("NVIDIA ", "").replace(" ", "_")
    out = args.out or os.path.join(HERE, "results", f"sampling_{card_id}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
