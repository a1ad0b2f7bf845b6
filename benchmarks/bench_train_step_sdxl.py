"""Benchmark: one LCM-LoRA distillation step at SDXL scale (the SDXL base UNet's architecture with random
weights, no downloads), 1024 px, bf16 frozen weights with float32 adapters (rank 64), side by side:

  script      the step of diffusers' train_lcm_distill_lora_sdxl.py as written (tests/lcd_script.lcd_step with
              SDXL's added conditions: the unfused helpers, the teacher's cond and uncond as two UNet calls with
              the adapters off, the student with them on as its own target), Huber loss, backward, clip 1.0,
              torch.optim.AdamW over the adapters
  rglcd_fast  rglcd_fast.train.DistillationStep (one batched teacher call, the fused solver, consistency and
              loss ops) on the same UNet, backward, clip 1.0, fused AdamW

Both on the same random latents, prompt embeddings [B, 77, 2048], pooled embeddings [B, 1280] and time ids
(text and VAE encoding are outside the step, as the anchor scope of bench_train_step.py). Reported: median
ms/step over --steps synchronised steps after --warmup, and the peak device memory of each provider's steps.

    python benchmarks/bench_train_step_sdxl.py [--batch 4] [--steps 10] [--warmup 3] [--out FILE]
    python benchmarks/bench_train_step_sdxl.py --small      # CPU smoke run: a tiny SDXL-like UNet, 2 steps
"""

import argparse
import datetime
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

import lcd_script  # noqa: E402  (tests/ is on the path only now)
from helpers import no_tf32  # noqa: E402
from report import commit_id  # noqa: E402
from train_step_harness import synchronize, time_steps  # noqa: E402
from train_step_models import HUBER_C, MAX_GRAD_NORM, make_scheduler, sdxl_unet_config  # noqa: E402

LORA_LR = 1e-4


def build_lora_unet(small, device, dtype, rank):
    """The UNet with random weights in dtype and LoRA adapters (the scripts' modules) in float32."""
    from diffusers import UNet2DConditionModel

    from rglcd_fast.train.models import add_lora

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config(small)).to(dtype).requires_grad_(False)
    unet.enable_gradient_checkpointing()
    return add_lora(unet, rank, rank)


def make_inputs(unet, batch, resolution, device):
    """Latents, prompt embeddings, the SDXL added conditions (pooled embeddings, time ids)."""
    g = torch.Generator(device).manual_seed(1)
    config = unet.config
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, generator=g, device=device)
    embeds = torch.randn(batch, 77, config.cross_attention_dim, generator=g, device=device)
    ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device)
    added = {"text_embeds": torch.randn(batch, pooled_dim, generator=g, device=device), "time_ids": ids.float()}
    return latents, embeds, added


class Provider:
    """One training step (forward, backward, clip, optimiser) of the LoRA student on fixed inputs."""

    def __init__(self, name, unet, inputs, device, dtype):
        from rglcd_fast.train import DistillationConfig
        from rglcd_fast.train.models import WithoutAdapters

        self.name, self.unet, self.inputs, self.device, self.dtype = name, unet, inputs, device, dtype
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.teacher = WithoutAdapters(unet)
        self.scheduler = make_scheduler("epsilon")
        self.config = DistillationConfig(huber_c=HUBER_C, w_min=3.0, w_max=15.0)
        self.generator = torch.Generator(device).manual_seed(2)
        fused = name == "rglcd_fast"
        self.optimizer = torch.optim.AdamW(self.params, lr=LORA_LR, weight_decay=1e-2, fused=fused or None)
        if fused:
            from rglcd_fast.train import DistillationStep

            self.step_fn = DistillationStep(self.scheduler, self.config, device=device)
        else:
            self.solver = lcd_script.DDIMSolver(self.scheduler.alphas_cumprod.numpy(), 1000, 50).to(device)

    def loss(self):
        latents, embeds, added = self.inputs
        autocast = torch.autocast(self.device.type, dtype=self.dtype)
        if self.name == "rglcd_fast":
            uncond_added = dict(added, text_embeds=torch.zeros_like(added["text_embeds"]))
            with autocast:
                out = self.step_fn(
                    self.unet,
                    self.teacher,
                    self.unet,
                    latents,
                    embeds,
                    torch.zeros_like(embeds),
                    generator=self.generator,
                    added_cond_kwargs=added,
                    uncond_added_cond_kwargs=uncond_added,
                )
            return out.loss
        with autocast:  # the student under accelerate's autocast, as the script prepares it
            loss, _, _ = lcd_script.lcd_step(
                self.unet,
                self.teacher,
                self.unet,
                latents,
                embeds,
                torch.zeros_like(embeds),
                self.scheduler,
                self.solver,
                self.config,
                self.generator,
                added=added,
                weight_dtype=self.dtype,
            )
        return loss

    def step(self):
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}


def spot_check(device):
    """fp32, a tiny SDXL-like LoRA UNet: the script's loss and adapter gradients vs DistillationStep's on the
    same inputs and draws."""
    from rglcd_fast.train import DistillationConfig, DistillationStep
    from rglcd_fast.train.models import WithoutAdapters

    unet = build_lora_unet(True, device, torch.float32, 4)
    for p in unet.parameters():  # let the adapters matter (lora_B starts at zero)
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    latents, embeds, added = make_inputs(unet, 2, 64, device)
    scheduler, config = make_scheduler("epsilon"), DistillationConfig(huber_c=HUBER_C, w_min=3.0, w_max=15.0)
    params = [p for p in unet.parameters() if p.requires_grad]
    solver = lcd_script.DDIMSolver(scheduler.alphas_cumprod.numpy(), 1000, 50).to(device)
    uncond = torch.zeros_like(embeds)
    ref, _, _ = lcd_script.lcd_step(
        unet, WithoutAdapters(unet), unet, latents, embeds, uncond, scheduler, solver, config,
        torch.Generator(device).manual_seed(7), added=added,
    )  # fmt: skip
    ref_grads = torch.autograd.grad(ref, params)
    uncond_added = dict(added, text_embeds=torch.zeros_like(added["text_embeds"]))
    out = DistillationStep(scheduler, config, device=device)(
        unet, WithoutAdapters(unet), unet, latents, embeds, uncond, generator=torch.Generator(device).manual_seed(7),
        added_cond_kwargs=added, uncond_added_cond_kwargs=uncond_added,
    )  # fmt: skip
    grads = torch.autograd.grad(out.loss, params)
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads) if b.norm() > 0]
    return (
        f"fp32, tiny SDXL-like LoRA UNet, same inputs and draws: script loss {ref.item():.7g}, rglcd_fast "
        f"{out.loss.item():.7g} (rel. diff {abs(out.loss.item() - ref.item()) / abs(ref.item()):.1e}); adapter "
        f"gradients ‖ours − script‖/‖script‖: median {statistics.median(rel):.1e}, max {max(rel):.1e}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default 4 (--small: 2)")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (--small: 64)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (= alpha, as the script's defaults)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --small: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; --small: 1)")
    parser.add_argument("--small", action="store_true", help="tiny UNet, CPU or GPU: a quick smoke run")
    parser.add_argument("--out", default=None, help="markdown table (default: print only)")
    args = parser.parse_args()
    small = args.small
    batch, resolution = args.batch or (2 if small else 4), args.resolution or (64 if small else 1024)
    steps, warmup = args.steps or (2 if small else 10), args.warmup or (1 if small else 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    with no_tf32():  # a float32 comparison: no TF32 (cuDNN's default), whose rounding differs by kernel
        check = spot_check(device)
    print("check:", check)
    rows = []
    for name in ("script", "rglcd_fast"):
        unet = build_lora_unet(small, device, dtype, args.rank)
        provider = Provider(name, unet, make_inputs(unet, batch, resolution, device), device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, first_s, first_loss, _ = time_steps(provider.step, device, warmup, steps)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        median = statistics.median(times)
        rows.append((name, median, batch * 1e3 / median, peak, first_loss))
        print(f"{name:11s} {median:8.1f} ms/step  {batch * 1e3 / median:6.2f} images/s  peak {peak:.1f} GiB  "
              f"first loss {first_loss:.6f}")  # fmt: skip
        del provider, unet
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        lines = [
            f"# LCM-LoRA distillation step, SDXL architecture ({card})",
            "",
            f"{datetime.date.today()}, torch {torch.__version__}, commit {commit_id()}; batch {batch}, "
            f"{resolution} px, LoRA rank {args.rank}, bf16 weights, fp32 adapters, gradient checkpointing; "
            f"median of {steps} steps after {warmup}.",
            "",
            "| provider | ms/step | images/s | peak GiB | first loss |",
            "|---|---|---|---|---|",
            *(f"| {n} | {m:.1f} | {i:.2f} | {p:.1f} | {f:.6f} |" for n, m, i, p, f in rows),
            "",
            f"Check: {check}",
        ]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
