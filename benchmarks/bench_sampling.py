"""Sampling benchmark, end to end as users time it: prompts in, PIL images out (tokenising and encoding the
prompts, the LCM loop, the VAE decode, the conversion to 8-bit images). Random weights built from configs (no
downloads): an SD1.5-architecture LCM UNet (time_cond_proj_dim=256) at 512 px, or (--arch sdxl) an
SDXL-architecture one at 1024 px (its VAE decodes in float32, as diffusers' SDXL pipeline does); fp16, 4
steps. Rows, side by side in one run on the same modules, prompts and seed:

  diffusers eager                    LatentConsistencyModelPipeline (SDXL: StableDiffusionXLPipeline with
                                     LCMScheduler), output_type="pil"
  diffusers + torch.compile (MODE)   the same with pipe.unet = torch.compile(unet) and vae.decode compiled
                                     (diffusers' documented recipe), per --modes
  rglcd_fast eager                   LCMSampler(prompts)
  rglcd_fast CUDA graph              LCMSampler(prompts, cuda_graph=True): one graph from token ids to bytes
  rglcd_fast compiled + CUDA graph   sampler.compile(MODE) first (max-autotune: without inductor's own
                                     graphs, which cannot nest in ours)

Reported: median wall ms per call (host clock, the call returns host images), images/s, the speedup against
diffusers + compile, the first call's seconds (compilation, capture), and the largest difference of the final
latents from diffusers eager's for the same seed. Rows are written as they come (a cut-off run keeps them).

    python benchmarks/bench_sampling.py [--arch sd15|sdxl] [--batches 1,4] [--modes default,max-autotune]
                                        [--compiled diffusers,rglcd_fast]
    python benchmarks/bench_sampling.py --small --device cpu    # smoke run: tiny models, no graphs
"""

import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]

from report import commit_id  # noqa: E402
from train_step_harness import timed  # noqa: E402

ARCHS = {"sd15": dict(name="SD1.5", batches="1,4"), "sdxl": dict(name="SDXL", batches="1")}  # 512 px, 1024 px
PROMPT = "a photo of a cat sitting on a wooden bench"


def sd15_unet_config(small):
    """runwayml/stable-diffusion-v1-5's UNet config (small: a tiny one), plus an LCM's guidance embedding."""
    if small:
        size = dict(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
        )
    else:
        size = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
    return dict(size, attention_head_dim=8, time_cond_proj_dim=256)


def make_sampler(arch, small, device, dtype):
    """SD1.5- or SDXL-architecture components with random weights (configs only, no downloads): the LCM UNet
    (SDXL: with LCM-SDXL's guidance embedding), the VAE (SDXL's in float32, as LCMSampler.from_pretrained
    loads it), the text encoder(s)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from train_step_models import (
        big_g_text_config,
        clip_l_text_config,
        make_tokenizer,
        sdxl_unet_config,
        sdxl_vae_config,
        vae_config,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from rglcd_fast.sample import LCMSampler
    from rglcd_fast.schedulers import FusedLCMScheduler

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    if arch == "sdxl":
        unet = UNet2DConditionModel(**sdxl_unet_config(small), time_cond_proj_dim=256)
        vae = AutoencoderKL(**sdxl_vae_config(small)).to(device, torch.float32)
        text_encoder_2 = CLIPTextModelWithProjection(big_g_text_config(small)).to(device, dtype).eval()
        extra = dict(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)
    else:
        unet = UNet2DConditionModel(**sd15_unet_config(small))
        vae = AutoencoderKL(**vae_config(small)).to(device, dtype)
        extra = {}
    return LCMSampler(
        unet=unet.to(device, dtype).eval(),
        vae=vae.eval(),
        text_encoder=CLIPTextModel(clip_l_text_config(small)).to(device, dtype).eval(),
        tokenizer=tokenizer,
        scheduler=FusedLCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        device=device,
        dtype=dtype,
        **extra,
    )


def diffusers_pipeline(sampler):
    """diffusers' pipeline over the sampler's modules with LCMScheduler. SDXL: its own float16 copy of the VAE
    with force_upcast (the pipeline upcasts it to float32 for each decode, as it does for SDXL's VAE)."""
    import copy

    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionXLPipeline

    scheduler = LCMScheduler.from_config(sampler.scheduler.config)
    if sampler.text_encoder_2 is None:
        return LatentConsistencyModelPipeline(
            vae=sampler.vae, text_encoder=sampler.text_encoder, tokenizer=sampler.tokenizer, unet=sampler.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    vae = copy.deepcopy(sampler.vae).to(torch.float16) if sampler.device.type == "cuda" else sampler.vae
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=sampler.text_encoder, text_encoder_2=sampler.text_encoder_2,
        tokenizer=sampler.tokenizer, tokenizer_2=sampler.tokenizer_2, unet=sampler.unet, scheduler=scheduler,
    )  # fmt: skip


def write_table(path, header, rows):
    """The rows so far, with a speedup column against each diffusers + torch.compile row of the same batch."""
    compiled = list(dict.fromkeys(r["name"] for r in rows if r["name"].startswith("diffusers + ")))
    lines = header + [
        "| batch | provider | ms | images/s | " + " | ".join(f"× {name}" for name in compiled)
        + (" | " if compiled else "") + "first call, s | max Δ latents |",
        "|---|---|---|---|" + "---|" * len(compiled) + "---|---|",
    ]  # fmt: skip
    for row in sorted(rows, key=lambda r: r["batch"]):
        base = {r["name"]: r["ms"] for r in rows if r["batch"] == row["batch"]}
        speedups = "".join(f"{base[name] / row['ms']:.2f}× | " if name in base else "– | " for name in compiled)
        lines.append(
            f"| {row['batch']} | {row['name']} | {row['ms']:.1f} | {row['batch'] * 1e3 / row['ms']:.2f} | "
            f"{speedups}{row['first']:.1f} | {row['diff']:.3g} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument("--batches", default=None, help="comma list (default: sd15 1,4; sdxl 1)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", default="default,max-autotune", help="torch.compile modes ('' for none)")
    parser.add_argument(
        "--compiled",
        default="diffusers,rglcd_fast",
        help="whose compiled rows to run (one a call where compiling both does not fit, as with max-autotune)",
    )
    parser.add_argument("--runs", type=int, default=10, help="timed calls per row")
    parser.add_argument("--small", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    compiled = args.compiled.split(",")
    if not set(compiled) <= {"diffusers", "rglcd_fast"}:
        parser.error(f"--compiled: expected diffusers and/or rglcd_fast, got {args.compiled!r}")
    torch._dynamo.config.cache_size_limit = 64  # a compile per (mode, batch)
    device = torch.device(args.device)
    graphs = device.type == "cuda"
    dtype = torch.float16 if graphs else torch.float32
    arch = ARCHS[args.arch]
    sampler = make_sampler(args.arch, args.small, device, dtype)
    pipe = diffusers_pipeline(sampler)
    pipe.set_progress_bar_config(disable=True)
    size = sampler.size()[0]
    card = torch.cuda.get_device_name() if graphs else "CPU"
    card_id = card.replace("NVIDIA ", "").replace(" ", "_")
    prefix = "sampling_" if args.arch == "sd15" else f"sampling_{args.arch}_"
    out = args.out or os.path.join(HERE, "results", f"{prefix}{card_id}.md")
    header = [
        f"# Sampling end to end: {card}",
        "",
        f"torch {torch.__version__}; commit {commit_id()}; {datetime.date.today().isoformat()}. {arch['name']}-"
        f"architecture modules with random weights{' (tiny)' if args.small else ''}, {size} px, {dtype}, "
        f"{args.steps} LCM steps, guidance 8; prompt → PIL images; median wall ms of {args.runs} calls. "
        "max Δ latents: the final latents' largest difference from diffusers eager's for the same seed.",
        "",
    ]
    modes = [m for m in args.modes.split(",") if m]
    batches = [int(b) for b in (args.batches or arch["batches"]).split(",")]
    call = dict(num_inference_steps=args.steps, guidance_scale=8.0, height=size, width=size)
    ours = dict(steps=args.steps, guidance_scale=8.0, seed=0)

    def diffusers_run(prompts, **kwargs):
        return pipe(prompts, generator=torch.Generator(device).manual_seed(0), **call, **kwargs).images

    references = {b: diffusers_run([PROMPT] * b, output_type="latent") for b in batches}
    rows = []

    def add(name, batch, run, latents):
        first, ms = timed(run, device, args.runs)
        diff = (latents().float() - references[batch].float()).abs().max().item()
        rows.append(dict(batch=batch, name=name, ms=ms, first=first, diff=diff))
        print(f"batch {batch}  {name:42s} {ms:8.1f} ms  first call {first:6.1f} s  max Δ latents {diff:.3g}")
        write_table(out, header, rows)

    def add_diffusers(name):
        for b in batches:
            prompts = [PROMPT] * b
            add(name, b, lambda: diffusers_run(prompts), lambda: diffusers_run(prompts, output_type="latent"))

    def add_ours(name, cuda_graph):
        for b in batches:
            prompts = [PROMPT] * b
            run = dict(ours, cuda_graph=cuda_graph)
            add(name, b, lambda: sampler(prompts, **run), lambda: sampler.latents(prompts, **run))

    unet, vae, decoder = sampler.unet, pipe.vae, sampler.vae.decoder

    def eager_modules():
        pipe.unet = sampler.unet = unet
        sampler.vae.decoder = decoder
        vae.__dict__.pop("decode", None)  # the class's method again
        sampler._graphs.clear()

    add_diffusers("diffusers eager")
    add_ours("rglcd_fast eager", False)
    if graphs:
        add_ours("rglcd_fast CUDA graph", True)
    for mode in modes:
        if "diffusers" in compiled:
            pipe.unet = torch.compile(unet, mode=mode)
            vae.decode = torch.compile(type(vae).decode.__get__(vae), mode=mode)
            add_diffusers(f"diffusers + torch.compile ({mode})")
            eager_modules()
        if "rglcd_fast" in compiled:
            sampler.compile("max-autotune-no-cudagraphs" if mode == "max-autotune" else mode)
            add_ours(f"rglcd_fast compiled ({mode})" + (" + CUDA graph" if graphs else ""), graphs)
            eager_modules()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
