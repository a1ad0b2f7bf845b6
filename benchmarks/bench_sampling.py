"""GPU sampling benchmark: a 4-step LCM denoising loop with random weights built from configs (no
downloads): an SD1.5-architecture UNet (time_cond_proj_dim=256) at 512 px, fp16, batch 1 and 4, or
(--arch sdxl) an SDXL-architecture UNet (time_cond_proj_dim=256, as LCM-SDXL) at 1024 px, batch 1.
Providers, timed in one run: diffusers' LCMScheduler loop eager; the same loop with
torch.compile(unet); our FusedLCMScheduler loop eager; our CUDA-graph sampler; plus the full sampler
(text encoder(s) + loop + VAE decode). Writes benchmarks/results/sampling_<card>.md (sdxl:
sampling_sdxl_<card>.md).

    python benchmarks/bench_sampling.py [--arch sd15|sdxl] [--batches 1,4] [--steps 4] [--no-compile]
"""

import argparse
import datetime
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

from report import commit_id  # noqa: E402

ARCHS = {"sd15": dict(name="SD1.5", size=512, batches="1,4"), "sdxl": dict(name="SDXL", size=1024, batches="1")}


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


def make_sampler(arch, dtype):
    """SD1.5- or SDXL-architecture components with random weights (configs only, no downloads)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_pipeline import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rglcd_fast.sample import LCMSampler
    from rglcd_fast.schedulers import FusedLCMScheduler

    torch.manual_seed(0)
    tokenizer, vocab_size = tiny_tokenizer(os.path.join("/tmp", "rglcd_bench_tokenizer"))
    tokenizer.model_max_length = 77
    clip_l = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
    )
    if arch == "sd15":
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            time_cond_proj_dim=256,
        )
        extra = {}
    else:  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, plus LCM-SDXL's guidance embedding
        unet = UNet2DConditionModel(
            sample_size=128,
            cross_attention_dim=2048,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            time_cond_proj_dim=256,
        )
        # the OpenCLIP bigG/14 text tower with its projection
        bigg = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            projection_dim=1280,
            hidden_act="gelu",
        )
        extra = dict(text_encoder_2=CLIPTextModelWithProjection(bigg).to("cuda", dtype).eval(), tokenizer_2=tokenizer)
    size = ARCHS[arch]["size"]
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        latent_channels=4,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=size,
        force_upcast=arch == "sdxl",  # LCMSampler: SDXL decodes in float32
        scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
    )
    vae_dtype = torch.float32 if vae.config.force_upcast else dtype  # as LCMSampler.from_pretrained loads it
    scheduler = FusedLCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    device = torch.device("cuda")
    return LCMSampler(
        unet=unet.to(device, dtype).eval(),
        vae=vae.to(device, vae_dtype).eval(),
        text_encoder=CLIPTextModel(clip_l).to(device, dtype).eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        device=device,
        dtype=dtype,
        **extra,
    )


def diffusers_loop(unet, scheduler, conditioning, latents, w_embedding, steps, seed):
    """The LatentConsistencyModelPipeline (SDXL: StableDiffusionXLPipeline) loop as diffusers runs it."""
    generator = torch.Generator("cuda").manual_seed(seed)
    scheduler.set_timesteps(steps, device="cuda")
    unet_kwargs = conditioning.unet_kwargs()
    for t in scheduler.timesteps:
        model_pred = unet(latents, t, timestep_cond=w_embedding, return_dict=False, **unet_kwargs)[0]
        latents, denoised = scheduler.step(model_pred, t, latents, generator=generator, return_dict=False)
    return denoised


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument("--batches", default=None, help="comma list (default: sd15 1,4; sdxl 1)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from diffusers import LCMScheduler

    dtype = torch.float16
    arch, size = ARCHS[args.arch], ARCHS[args.arch]["size"]
    sampler = make_sampler(args.arch, dtype)
    diffusers_scheduler = LCMScheduler.from_config(sampler.scheduler.config)
    card = torch.cuda.get_device_name()
    commit = commit_id()
    rows = []
    compiled_unet, compile_seconds = None, None
    for batch in map(int, (args.batches or arch["batches"]).split(",")):
        prompts = ["a photo of a cat"] * batch
        conditioning = sampler.encode_prompts(prompts, size, size)
        latents = sampler.initial_latents(batch, size, size, torch.Generator("cuda").manual_seed(0))
        w_embedding = sampler._guidance(8.0, batch)
        steps = args.steps
        times = {}
        times["diffusers LCMScheduler loop, eager"] = median_ms(
            lambda: diffusers_loop(sampler.unet, diffusers_scheduler, conditioning, latents, w_embedding, steps, 0)
        )
        if not args.no_compile:
            if compiled_unet is None:
                compiled_unet = torch.compile(sampler.unet)
                start = time.perf_counter()
                diffusers_loop(compiled_unet, diffusers_scheduler, conditioning, latents, w_embedding, steps, 0)
                torch.cuda.synchronize()
                compile_seconds = time.perf_counter() - start
            times["diffusers loop, torch.compile(unet)"] = median_ms(
                lambda: diffusers_loop(compiled_unet, diffusers_scheduler, conditioning, latents, w_embedding, steps, 0)
            )

        def fused_eager():
            sampler.scheduler.set_timesteps(steps, device="cuda")
            return sampler.denoise(conditioning, latents, w_embedding, torch.Generator("cuda").manual_seed(0))

        times["rglcd_fast FusedLCMScheduler loop, eager"] = median_ms(fused_eager)
        sampler.scheduler.set_timesteps(steps, device="cuda")
        graph = sampler._graph_for(conditioning, size, size, steps, 8.0)
        times["rglcd_fast CUDA-graph loop (replay; initial latents included)"] = median_ms(graph.graph.replay)
        times["full sampler (text encoder + loop + VAE decode), eager"] = median_ms(
            lambda: sampler(prompts, steps=steps, seed=0, height=size, width=size), runs=5
        )
        times["full sampler, CUDA-graph loop"] = median_ms(
            lambda: sampler(prompts, steps=steps, seed=0, height=size, width=size, cuda_graph=True), runs=5
        )
        # the graph replay and the eager fused loop compute the same latents
        graphed = sampler.latents(prompts, steps=steps, seed=0, height=size, width=size, cuda_graph=True)
        eager = sampler.latents(prompts, steps=steps, seed=0, height=size, width=size)
        max_diff = (graphed.float() - eager.float()).abs().max().item()
        base = times["diffusers LCMScheduler loop, eager"]
        for name, ms in times.items():
            speedup = base / ms if "loop" in name and "full" not in name else None  # loops against loops only
            rows.append((batch, name, ms, speedup))
            print(f"batch {batch}  {name:58s} {ms:8.2f} ms" + (f"  x{speedup:.2f}" if speedup else ""), flush=True)
        print(f"batch {batch}: max |graph - eager| = {max_diff:.3g}")

    lines = [
        f"# Sampling benchmark: {card}",
        "",
        f"torch {torch.__version__}; commit {commit}; {datetime.date.today().isoformat()}. "
        f"{arch['name']}-architecture "
        f"UNet (random weights, time_cond_proj_dim=256), {size} px, fp16, {args.steps} LCM steps; medians of "
        "CUDA-event timings, ms (loop rows: from prompt embeddings and initial latents to the last denoised "
        "latents)." + (f" torch.compile(unet) took {compile_seconds:.0f} s to compile." if compile_seconds else ""),
        "",
        "| batch | provider | ms | speedup vs diffusers eager loop |",
        "|---|---|---|---|",
    ]
    lines += [f"| {b} | {name} | {ms:.2f} | {f'{s:.2f}×' if s else '–'} |" for b, name, ms, s in rows]
    card_id = card.replace("NVIDIA ", "").replace(" ", "_")
    prefix = "sampling_" if args.arch == "sd15" else f"sampling_{args.arch}_"
    out = args.out or os.path.join(HERE, "results", f"{prefix}{card_id}.md")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
