"""GPU benchmark: one RG-LCD / LCD training step at Stable Diffusion 2.1 scale (random weights built from
the SD2.1 configs, no downloads), 768 px, batch 8, bf16 mixed precision, gradient checkpointing.

Providers (each: median wall time per step over --steps CUDA-synchronised steps after --warmup steps,
images/s, peak GPU memory since the provider was built):
  reference           the step as diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py
                      writes it: text encode + VAE encode of the batch in the step, teacher cond and uncond as
                      two UNet calls under the script's torch.autocast, the unfused helpers (tests/lcd_script.py),
                      Huber loss, student fp32 under accelerate bf16 autocast with gradient checkpointing,
                      torch.optim.AdamW (not fused), clip 1.0, fp32 target UNet, the script's update_ema loop.
  reference_noencode  the same step on latents and prompt embeddings encoded once before timing (no data
                      loading, no VAE or text encoder in the step): what the ANCHORS.md figure (465 ms =
                      student + teacher + target + backward + AdamW + EMA) covers.
  rglcd_fast          rglcd_fast.train.Trainer.train_step on an in-memory Teacher and data set, its defaults.
  rglcd_fast_<variant> the same with settings changed (TRAINER_VARIANTS): cl (channels_last=True),
                      bf16_target (the EMA target stored in bf16), nockpt (no gradient checkpointing),
                      decode_one_call (prediction and target in one VAE call; reward on only), compile and
                      compile_cl (compile_unets="all", without / with channels_last), compile_frozen (the
                      teacher and target UNets and the VAE encoder), compile_blocks ("student_blocks": frozen plus the
                      student's blocks one by one), compile_budget ("all" with compile_memory_budget 0.5): the
                      compile variants run after every other provider, reward off unless --compile-reward
                      says otherwise.
Reward branch: "off" (plain LCD) and "on": the latent-proxy reward (RG-LCD's LRM variant): reward of the
one-step prediction by the LRM, then the LRM update (A: decode the {prediction, target, real} latents; B:
decode {prediction, target}, the real candidate is the batch's images; score them with the expert, a
ViT-L/14-size CLIP with random weights, pairwise KL, the LRM's own AdamW). For the reference it is written
out with plain torch ops.
Also: a spot check that both providers' distillation losses (and student gradients) agree on the same
inputs and draws (fp32, small UNets; also with channels_last UNets), and the two losses at full scale on
one batch.

    python benchmarks/bench_train_step.py [--steps 10] [--warmup 3] [--reward both|on|off] [--out FILE]
           [--providers reference,rglcd_fast,rglcd_fast_cl,...] [--variant-steps N] [--back-to-back N]
    python benchmarks/bench_train_step.py --small      # CPU smoke run: tiny configs, 2 steps
"""

import argparse
import copy
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

import lcd_script  # noqa: E402  (tests/ is on the path only now) the LCD script's helpers, as the script has them
from report import commit_id  # noqa: E402

TIME_COND_PROJ_DIM = 256  # the script's --unet_time_cond_proj_dim default
HUBER_C = 0.001
EMA_DECAY = 0.95
MAX_GRAD_NORM = 1.0
LR, LRM_LR, WEIGHT_DECAY = 1e-6, 1e-5, 1e-2
LRM_WIDTHS, LRM_EMBED_DIM = (64, 128, 256), 512  # TrainConfig defaults
SUBJECTS = [
    "cat",
    "dog",
    "red car",
    "mountain lake",
    "city street at night",
    "bowl of fruit",
    "old lighthouse",
    "portrait of a woman",
]


# ---- models (configs only, random weights) ---------------------------------------------------------


def unet_config(small):
    if small:
        return dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=8,
        )
    # stabilityai/stable-diffusion-2-1 unet/config.json
    return dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
    )


def vae_config(small):
    if small:
        return dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.18215,
        )
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=768,
        scaling_factor=0.18215,
    )


def text_config(small):
    from transformers import CLIPTextConfig

    # token ids of the local tokenizer: <|startoftext|> 0, <|endoftext|> 1 (also the pad token)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if small:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            **ids,
        )
    # stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower, 23 layers)
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=512,
        **ids,
    )


def expert_config(small):
    from transformers import CLIPConfig

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if small:
        return CLIPConfig(
            text_config=dict(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                **ids,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        )
    # openai/clip-vit-large-patch14
    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            **ids,
        ),
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
        ),
        projection_dim=768,
    )


def make_tokenizer():
    """A local character-level CLIP tokenizer (tests/tiny_pipeline.py) with model_max_length 77."""
    from tiny_pipeline import tiny_tokenizer

    tokenizer, _ = tiny_tokenizer(os.path.join(tempfile.gettempdir(), "rglcd_bench_train_tokenizer"))
    tokenizer.model_max_length = 77
    return tokenizer


def make_scheduler(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def frozen(module, device, dtype):
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()


def build_teacher_parts(small, device, dtype, prediction_type):
    """The frozen teacher components shared by every provider: UNet, VAE, text encoder (dtype), tokenizer,
    DDPM schedule. Weights initialised on the device (no host round trip for ~1.2 B parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(small))
        vae = AutoencoderKL(**vae_config(small))
        text_encoder = CLIPTextModel(text_config(small))
    return dict(
        unet=frozen(unet, device, dtype),
        vae=frozen(vae, device, dtype),
        text_encoder=frozen(text_encoder, device, dtype),
        tokenizer=make_tokenizer(),
        noise_scheduler=make_scheduler(prediction_type),
    )


def build_expert(small, device, dtype, tokenizer):
    """The expert reward model: rglcd_fast.reward.ClipScore around a ViT-L/14-size CLIPModel."""
    from transformers import CLIPModel

    from rglcd_fast.reward import ClipScore

    torch.manual_seed(1)
    with torch.device(device):
        model = CLIPModel(expert_config(small))
    return ClipScore(frozen(model, device, dtype), tokenizer)


class RandomImages(torch.utils.data.Dataset):
    """A pool of random images in [-1, 1] ([3, R, R] float32) with captions."""

    def __init__(self, size, resolution, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, 3, resolution, resolution, generator=g) * 2 - 1
        self.captions = [f"a photo of a {SUBJECTS[i % len(SUBJECTS)]} number {i}" for i in range(size)]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "caption": self.captions[i]}


def infinite(loader):
    while True:
        yield from loader


# ---- timing -----------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timeline:
    """Named marks inside a step (CUDA events on the GPU, host clock on the CPU); the time from a mark to
    the next is charged to the mark's label (summed over repeats). Inactive unless started."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.active = False
        self.marks = []

    def start(self, label):
        self.active, self.marks = True, []
        self.mark(label)

    def mark(self, label):
        if not self.active or (self.marks and self.marks[-1][0] == label):
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def seen(self, label):
        return any(name == label for name, _ in self.marks)

    def stop(self):
        self.mark("end")
        self.active = False
        if self.cuda:
            torch.cuda.synchronize()
        phases = {}
        for (label, a), (_, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            phases[label] = phases.get(label, 0.0) + ms
        return phases


def step_loss(result):
    """The loss a provider's step returned: A's logs dict, B's list of per-micro-batch metrics."""
    if isinstance(result, dict):
        return float(result["loss"])
    return float(result[0]["loss"])


def time_steps(step, device, warmup, steps, back_to_back=0):
    """Per-step wall times (each from a synchronised device to a synchronised device) after `warmup`
    steps; also the first step's wall time (torch.compile compiles there) and loss (every provider
    starts from the same weights, data order and draws), and, when back_to_back, the mean time of that
    many steps issued without a synchronisation between them (what a training loop sees)."""
    synchronize(device)
    start = time.perf_counter()
    first = step()
    synchronize(device)
    first_s = time.perf_counter() - start
    first_loss = step_loss(first)
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    pipelined = None
    if back_to_back:
        start = time.perf_counter()
        for _ in range(back_to_back):
            step()
        synchronize(device)
        pipelined = (time.perf_counter() - start) * 1e3 / back_to_back
    return times, first_s, first_loss, pipelined


def breakdown(step, timeline, device, runs):
    """Median per-phase time over `runs` extra steps with the marks on."""
    per_phase = {}
    order = []
    for _ in range(runs):
        timeline.start("data + VAE encode")
        step()
        phases = timeline.stop()
        for label, ms in phases.items():
            if label not in per_phase:
                per_phase[label] = []
                order.append(label)
            per_phase[label].append(ms)
    return [(label, statistics.median(per_phase[label])) for label in order]


# ---- provider A: the LCD script's step ----------------------------------------------------------------


def script_update_ema(target_params, source_params, rate=0.99):
    """The script's update_ema."""
    with torch.no_grad():
        for targ, src in zip(target_params, source_params):
            targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def lrm_text_features(lrm, input_ids):
    return lrm.text_projection(lrm.text_model(input_ids=input_ids).pooler_output)


def lrm_scores_unfused(lrm, latents, text_features, scale):
    """scale·cos(image tower(latents), text features), with torch ops: scale 1 for the student's reward,
    exp(logit_scale) for the preference loss (the official latent_score_fn's return_logits)."""
    u = lrm.image_encoder(latents)
    u = u / u.norm(dim=-1, keepdim=True)
    v = text_features / text_features.norm(dim=-1, keepdim=True)
    return scale * (u * v).sum(dim=-1)


def pairwise_kl_unfused(scores, expert_logits):
    """Σ over pairs i < j of KL(softmax(E_i, E_j) ‖ softmax(S_i, S_j)), batchmean (docs/design.md §1 step 9)."""
    loss = scores.new_zeros(())
    for i in range(scores.shape[0] - 1):
        for j in range(i + 1, scores.shape[0]):
            pair = torch.stack([scores[i], scores[j]], dim=1)
            expert_pair = torch.stack([expert_logits[i], expert_logits[j]], dim=1)
            loss = loss + F.kl_div(F.log_softmax(pair, dim=1), F.softmax(expert_pair, dim=1), reduction="batchmean")
    return loss


class ReferenceProvider:
    """Provider A: the LCD script's training step (and, reward on, the RG-LCD LRM branch unfused)."""

    def __init__(self, parts, dataset, args, device, reward, expert=None, encode_in_step=True):
        from accelerate import Accelerator
        from diffusers import UNet2DConditionModel
        from diffusers.optimization import get_scheduler

        from rglcd_fast.train.models import Teacher, make_lrm

        self.parts, self.device, self.reward, self.expert = parts, device, reward, expert
        self.encode_in_step = encode_in_step
        self.accelerator = Accelerator(mixed_precision="bf16", cpu=device.type != "cuda")
        self.weight_dtype = torch.bfloat16
        self.timeline = Timeline(device)
        teacher_unet = parts["unet"]
        torch.manual_seed(2)
        with torch.device(device):  # script: from_config + load_state_dict(strict=False) + train()
            unet = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=TIME_COND_PROJ_DIM)
        unet.load_state_dict(teacher_unet.state_dict(), strict=False)
        unet = unet.float().train()
        with torch.device(device):
            target_unet = UNet2DConditionModel.from_config(unet.config)
        target_unet.load_state_dict(unet.state_dict())
        target_unet = target_unet.float().train().requires_grad_(False)  # the script keeps it in float32
        self.target_unet = target_unet
        unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10**6)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
        scheduler = parts["noise_scheduler"]
        solver = lcd_script.DDIMSolver(scheduler.alphas_cumprod.cpu().numpy(), timesteps=1000, ddim_timesteps=50).to(
            device
        )
        self.schedule = (scheduler, solver)
        tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
        with torch.no_grad():
            uncond_input_ids = tokenizer(
                [""] * args.batch, return_tensors="pt", padding="max_length", max_length=77
            ).input_ids.to(device)
            self.uncond_prompt_embeds = text_encoder(uncond_input_ids)[0]
        self.loader = infinite(
            torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=0)
        )
        self.fixed = None
        if not encode_in_step:  # encoded once: latents as the script makes them, prompt embeddings
            batch = next(self.loader)
            with torch.no_grad():
                self.fixed = (
                    self._encode_images(batch["pixel_values"].to(device)),
                    self._encode_text(batch["caption"]),
                    list(batch["caption"]),
                )
        if reward:
            self.lrm = make_lrm(Teacher(folder="", **parts), LRM_WIDTHS, LRM_EMBED_DIM)
            self.lrm_optimizer = torch.optim.AdamW(self.lrm.parameters(), lr=LRM_LR, weight_decay=WEIGHT_DECAY)

    def _encode_text(self, captions):  # the script's encode_prompt
        tokenizer, text_encoder = self.parts["tokenizer"], self.parts["text_encoder"]
        with torch.no_grad():
            ids = tokenizer(
                list(captions),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            return text_encoder(ids.to(text_encoder.device))[0]

    def _encode_images(self, image):
        vae = self.parts["vae"]
        pixel_values = image.to(dtype=self.weight_dtype)
        latents = []
        for i in range(0, pixel_values.shape[0], 32):  # --vae_encode_batch_size 32
            latents.append(vae.encode(pixel_values[i : i + 32]).latent_dist.sample())
        latents = torch.cat(latents, dim=0)
        latents = latents * vae.config.scaling_factor
        return latents.to(self.weight_dtype)

    def distill_loss(self, latents, prompt_embeds, generator=None, mark=None):
        from rglcd_fast.train import DistillationConfig

        device_type = self.device.type
        scheduler, solver = self.schedule
        return lcd_script.lcd_step(
            self.unet,
            self.parts["unet"],
            self.target_unet,
            latents,
            prompt_embeds,
            self.uncond_prompt_embeds,
            scheduler,
            solver,
            DistillationConfig(huber_c=HUBER_C),
            generator,
            weight_dtype=self.weight_dtype,
            teacher_autocast=lambda: torch.autocast(device_type),
            target_autocast=lambda: torch.autocast(device_type, dtype=self.weight_dtype),
            mark=mark,
        )

    def step(self):
        acc, tl, device = self.accelerator, self.timeline, self.device
        scale = self.parts["vae"].config.scaling_factor
        with acc.accumulate(self.unet):
            if self.fixed is None:
                batch = next(self.loader)
                image, text = batch["pixel_values"], batch["caption"]
                image = image.to(device, non_blocking=True)
                tl.mark("text encode")
                prompt_embeds = self._encode_text(text)
                tl.mark("data + VAE encode")
                with torch.no_grad():
                    latents = self._encode_images(image)
            else:
                latents, prompt_embeds, text = self.fixed
            loss, model_pred, target = self.distill_loss(latents, prompt_embeds, mark=tl.mark)
            if self.reward:  # reward of the one-step prediction by the LRM (its weights not trained by it)
                self.lrm.requires_grad_(False)
                with acc.autocast():
                    ids = self.lrm.tokenize(text)
                    reward = lrm_scores_unfused(self.lrm, model_pred / scale, lrm_text_features(self.lrm, ids), 1.0)
                self.lrm.requires_grad_(True)
                loss = loss + 1.0 * -reward.float().mean()
            tl.mark("backward")
            acc.backward(loss)
            if acc.sync_gradients:
                tl.mark("clip grad norm")
                acc.clip_grad_norm_(self.unet.parameters(), MAX_GRAD_NORM)
            tl.mark("AdamW")
            self.optimizer.step()
            tl.mark("lr sched + zero_grad")
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.reward:
            self.lrm_update(model_pred, target, latents, text, scale)
        if acc.sync_gradients:
            tl.mark("EMA")
            script_update_ema(self.target_unet.parameters(), self.unet.parameters(), EMA_DECAY)
        logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0]}  # the script logs each step
        return logs

    def lrm_update(self, model_pred, target, latents, text, scale):
        """The LRM update, plain torch: decode the candidates, expert logits, LRM logits, pairwise KL, AdamW."""
        tl, vae, expert, lrm = self.timeline, self.parts["vae"], self.expert, self.lrm
        candidates = [c.detach().float() for c in (model_pred, target, latents)]
        tl.mark("LRM update: decode candidates")
        with torch.no_grad():
            images = [(vae.decode((c / scale).to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1) for c in candidates]
            tl.mark("LRM update: expert scoring")
            v = expert.text_features(text).float()
            v = v / v.norm(dim=-1, keepdim=True)
            expert_logits = []
            for image in images:
                u = expert.image_features(image).float()
                u = u / u.norm(dim=-1, keepdim=True)
                expert_logits.append(expert.model.logit_scale.float().exp() * (u * v).sum(dim=-1))
            expert_logits = torch.stack(expert_logits)
        tl.mark("LRM update: LRM loss fwd + bwd")
        text_features = lrm_text_features(lrm, lrm.tokenize(text))
        scores = torch.stack(
            [lrm_scores_unfused(lrm, c / scale, text_features, lrm.logit_scale.exp()) for c in candidates]
        ).float()
        loss = pairwise_kl_unfused(scores, expert_logits)
        self.lrm_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tl.mark("LRM update: AdamW")
        self.lrm_optimizer.step()

    def phase_step(self):
        self.step()

    def free(self):
        for name in ("unet", "target_unet", "optimizer", "lr_scheduler", "lrm", "lrm_optimizer", "fixed", "loader"):
            if hasattr(self, name):
                delattr(self, name)
        self.accelerator.free_memory()


# ---- provider B: rglcd_fast's trainer -----------------------------------------------------------------

# B's variants: TrainConfig overrides (on top of the settings below) and, for what no setting covers, a
# change made to the built trainer ("bf16_target": the EMA target stored in bf16, measured, not adopted).
TRAINER_VARIANTS = {
    "rglcd_fast": {},
    "rglcd_fast_cl": {"channels_last": True},
    "rglcd_fast_bf16_target": {"bf16_target": True},
    "rglcd_fast_nockpt": {"gradient_checkpointing": False},
    "rglcd_fast_decode_one_call": {"vae_decode_batch_size": "2batch"},
    "rglcd_fast_compile": {"compile_unets": "all"},
    "rglcd_fast_compile_cl": {"compile_unets": "all", "channels_last": True},
    "rglcd_fast_compile_frozen": {"compile_unets": "frozen"},
    "rglcd_fast_compile_blocks": {"compile_unets": "student_blocks"},
    "rglcd_fast_compile_budget": {"compile_unets": "all", "compile_memory_budget": 0.5},
}


class TrainerProvider:
    def __init__(self, parts, dataset, args, device, reward, expert=None, output_dir=None, variant="rglcd_fast"):
        from rglcd_fast.train.config import make_config
        from rglcd_fast.train.models import Teacher
        from rglcd_fast.train.trainer import Trainer

        overrides = dict(TRAINER_VARIANTS[variant])
        bf16_target = overrides.pop("bf16_target", False)
        if overrides.get("vae_decode_batch_size") == "2batch":  # prediction and target in one call
            overrides["vae_decode_batch_size"] = 2 * args.batch
        settings = dict(
            teacher="sd21-random-in-memory",
            mixed_precision="bf16",
            train_batch_size=args.batch,
            reward_mode="lrm" if reward else "none",
            reward_model="clip",
            gradient_checkpointing=True,
            validation_steps=0,
            progress=False,
            resolution=args.resolution,
            output_dir=output_dir,
            max_train_steps=10**6,
            lrm_batch_size=args.batch,
            time_cond_proj_dim=TIME_COND_PROJ_DIM,
            loss_type="huber",
            huber_c=HUBER_C,
            learning_rate=LR,
            lrm_learning_rate=LRM_LR,
        )
        config = make_config(**{**settings, **overrides})
        self.parts = parts
        teacher = Teacher(folder="", **parts)
        self.trainer = Trainer(config, teacher=teacher, dataset=dataset, reward_model=expert if reward else None)
        if bf16_target:
            self.trainer.target.to(torch.bfloat16)
        self.batches = self.trainer.loader.infinite()
        self.device, self.reward = device, reward
        self.timeline = Timeline(device)
        self._hooks = []

    def step(self):
        return self.trainer.train_step(self.batches)

    def _attach(self):
        """Marks from module / optimiser hooks (the trainer's code is not edited for this)."""
        tr, tl = self.trainer, self.timeline
        student = tr.accelerator.unwrap_model(tr.student)
        add = self._hooks.append

        def pre(label):
            return lambda *_: tl.mark(label)

        def student_out(module, args, out):
            if out.sample.requires_grad:
                out.sample.register_hook(lambda grad: tl.mark("backward"))

        add(tr.teacher.text_encoder.register_forward_pre_hook(pre("text encode")))
        add(student.register_forward_pre_hook(pre("student fwd")))
        add(student.register_forward_hook(student_out))
        add(tr.teacher.unet.register_forward_pre_hook(pre("teacher cond + uncond (+ CFG, DDIM step)")))
        add(tr.target.register_forward_pre_hook(pre("target (+ consistency output)")))
        add(tr.target.register_forward_hook(pre("loss (+ reward fwd, when on)")))
        add(student.conv_in.weight.register_post_accumulate_grad_hook(pre("clip grad norm")))
        add(tr.optimizer.optimizer.register_step_pre_hook(pre("AdamW")))
        add(tr.optimizer.optimizer.register_step_post_hook(pre("lr sched + zero_grad" if self.reward else "EMA")))
        if self.reward:
            g = tr.guidance
            add(tr.teacher.vae.decoder.register_forward_pre_hook(pre("LRM update: decode candidates")))
            add(g.expert.register_forward_pre_hook(pre("LRM update: expert scoring")))
            add(g.expert.model.vision_model.register_forward_pre_hook(pre("LRM update: expert scoring")))

            def lrm_pre(*_):
                if tl.seen("LRM update: expert scoring"):
                    tl.mark("LRM update: LRM loss fwd + bwd")

            add(g.lrm.image_encoder.register_forward_pre_hook(lrm_pre))
            add(g.lrm.text_model.register_forward_pre_hook(lrm_pre))
            add(g.lrm_optimizer.register_step_pre_hook(pre("LRM update: AdamW")))
            add(g.lrm_optimizer.register_step_post_hook(pre("EMA")))

    def phase_step(self):
        if not self._hooks:
            self._attach()
        self.step()

    def free(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.trainer.accelerator.free_memory()
        del self.trainer, self.batches


def restore_parts(parts):
    """The trainer converts (channels_last) and compiles the shared teacher parts in place: undo, so that
    the next provider (A included) finds them as built."""
    for module in (parts["unet"], parts["vae"]):
        module.to(memory_format=torch.contiguous_format)
        module._compiled_call_impl = None
    parts["vae"].encoder._compiled_call_impl = None
    torch._functorch.config.activation_memory_budget = 1.0  # compile_memory_budget sets it process-wide


# ---- checks ---------------------------------------------------------------------------------------------


def spot_check_small(device, prediction_type):
    """fp32, small UNets, on the device: the reference step's loss and student gradients vs rglcd_fast's
    DistillationStep on the same inputs and draws. Returns a markdown line."""
    from diffusers import UNet2DConditionModel

    from rglcd_fast.train import DistillationConfig, DistillationStep

    torch.manual_seed(0)
    with torch.device(device):
        teacher = UNet2DConditionModel(**unet_config(True)).eval().requires_grad_(False)
        student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=TIME_COND_PROJ_DIM)
        student.load_state_dict(teacher.state_dict(), strict=False)
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.02)  # let w matter
        target = copy.deepcopy(student).requires_grad_(False)
        latents, embeds, uncond = torch.randn(4, 4, 16, 16), torch.randn(4, 12, 32), torch.randn(4, 12, 32)
    scheduler = make_scheduler(prediction_type)
    ac = scheduler.alphas_cumprod
    solver = lcd_script.DDIMSolver(ac.numpy(), 1000, 50).to(device)
    config = DistillationConfig(huber_c=HUBER_C)
    ref_loss, _, _ = lcd_script.lcd_step(
        student,
        teacher,
        target,
        latents,
        embeds,
        uncond,
        scheduler,
        solver,
        config,
        torch.Generator(device).manual_seed(7),
    )
    ref_grads = torch.autograd.grad(ref_loss, list(student.parameters()))
    out = DistillationStep(scheduler, config, device=device)(
        student, teacher, target, latents, embeds, uncond, generator=torch.Generator(device).manual_seed(7)
    )
    grads = torch.autograd.grad(out.distill_loss, list(student.parameters()))
    loss_rel = abs(out.distill_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads) if b.norm() > 0]
    # the same step with the three UNets in channels_last (the trainer's default on CUDA)
    for module in (student, teacher, target):
        module.to(memory_format=torch.channels_last)
    out_cl = DistillationStep(scheduler, config, device=device)(
        student, teacher, target, latents, embeds, uncond, generator=torch.Generator(device).manual_seed(7)
    )
    grads_cl = torch.autograd.grad(out_cl.distill_loss, list(student.parameters()))
    loss_rel_cl = abs(out_cl.distill_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    rel_cl = [((a - b).norm() / b.norm()).item() for a, b in zip(grads_cl, ref_grads) if b.norm() > 0]
    return (
        f"fp32, small UNets ({prediction_type}), same inputs and draws: reference loss {ref_loss.item():.7g}, "
        f"rglcd_fast loss {out.distill_loss.item():.7g} (rel. diff {loss_rel:.1e}); student gradients, "
        f"‖ours − ref‖/‖ref‖ per parameter tensor: median {statistics.median(rel):.1e}, max {max(rel):.1e} "
        f"(Huber's d/sqrt(d² + c²) with c = 0.001 magnifies float32 rounding of d near 0). With the UNets in "
        f"channels_last: loss {out_cl.distill_loss.item():.7g} (rel. diff {loss_rel_cl:.1e}), gradients median "
        f"{statistics.median(rel_cl):.1e}, max {max(rel_cl):.1e}"
    )


def spot_check_full(provider: ReferenceProvider, small=False):
    """Full-size models, each provider's own precision path, one batch, same draws: the reference step's
    distillation loss vs rglcd_fast's DistillationStep (as the trainer calls it) with the same modules."""
    from rglcd_fast.train import DistillationConfig, DistillationStep

    batch = next(provider.loader)
    device = provider.device
    with torch.no_grad():
        latents = provider._encode_images(batch["pixel_values"].to(device))
        embeds = provider._encode_text(batch["caption"])
        ref_loss, _, _ = provider.distill_loss(latents, embeds, generator=torch.Generator(device).manual_seed(3))
        step = DistillationStep(provider.parts["noise_scheduler"], DistillationConfig(huber_c=HUBER_C), device=device)
        with provider.accelerator.autocast():
            out = step(
                provider.unet,
                provider.parts["unet"],
                provider.target_unet,
                latents.float(),
                embeds,
                provider.uncond_prompt_embeds,
                generator=torch.Generator(device).manual_seed(3),
            )
        modules = (provider.unet, provider.parts["unet"], provider.target_unet)
        for module in modules:
            module.to(memory_format=torch.channels_last)
        with provider.accelerator.autocast():
            out_cl = step(
                provider.unet,
                provider.parts["unet"],
                provider.target_unet,
                latents.float(),
                embeds,
                provider.uncond_prompt_embeds,
                generator=torch.Generator(device).manual_seed(3),
            )
        for module in modules:
            module.to(memory_format=torch.contiguous_format)
    rel = abs(out.distill_loss.item() - ref_loss.item()) / abs(ref_loss.item())
    rel_cl = abs(out_cl.distill_loss.item() - out.distill_loss.item()) / abs(out.distill_loss.item())
    return (
        f"{'tiny' if small else 'SD2.1-size'} models, bf16 paths (reference: bf16 latents, teacher under the "
        "script's torch.autocast; "
        f"rglcd_fast: float32 latents, bf16 autocast), one batch, same draws: reference loss "
        f"{ref_loss.item():.6g}, rglcd_fast loss {out.distill_loss.item():.6g} (rel. diff {rel:.1e}); "
        f"rglcd_fast with the UNets in channels_last: {out_cl.distill_loss.item():.6g} (rel. diff to contiguous "
        f"{rel_cl:.1e})"
    )


# ---- report ---------------------------------------------------------------------------------------------

PROVIDER_NAMES = {
    "reference": "A. reference (LCD script step, incl. text + VAE encode)",
    "reference_noencode": "A'. reference, latents + embeddings pre-encoded (anchor scope)",
    "rglcd_fast": "B. rglcd_fast Trainer.train_step (defaults)",
    "rglcd_fast_cl": "B, channels_last=True",
    "rglcd_fast_bf16_target": "B, EMA target stored in bf16 (not adopted)",
    "rglcd_fast_nockpt": "B, gradient_checkpointing=False",
    "rglcd_fast_decode_one_call": "B, vae_decode_batch_size=2·batch (one decode call)",
    "rglcd_fast_compile": "B, compile_unets=all",
    "rglcd_fast_compile_cl": "B, compile_unets=all, channels_last=True",
    "rglcd_fast_compile_frozen": "B, compile_unets=frozen",
    "rglcd_fast_compile_blocks": "B, compile_unets=student_blocks",
    "rglcd_fast_compile_budget": "B, compile_unets=all, compile_memory_budget=0.5",
}
# variants measured in one reward branch only: the LRM's decode (on); the target's dtype and checkpointing
# (off: their effect does not depend on the branch)
ONLY_REWARD = {"rglcd_fast_decode_one_call": True, "rglcd_fast_bf16_target": False, "rglcd_fast_nockpt": False}


class Report:
    def __init__(self, path, args, device):
        self.path, self.args, self.device = path, args, device
        self.rows, self.breakdowns, self.checks, self.notes = [], [], [], []
        self.commit = commit_id()
        self.card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"

    def row(self, provider, reward, times, peak_gib, base_ms, first_s, first_loss, pipelined):
        ms = statistics.median(times)
        speedup = (
            "1.00×"
            if provider == "reference"
            else f"{base_ms / ms:.2f}×"
            if base_ms and provider != "reference_noencode"
            else "–"
        )
        self.rows.append(
            dict(
                name=PROVIDER_NAMES[provider],
                reward=reward,
                ms=ms,
                lo=min(times),
                hi=max(times),
                n=len(times),
                ips=self.args.batch / ms * 1e3,
                peak=peak_gib,
                speedup=speedup,
                first_s=first_s,
                loss=first_loss,
                pipelined=pipelined,
            )
        )
        self.write()
        return ms

    def write(self):
        a = self.args
        scale = "tiny configs (smoke run)" if a.small else "SD2.1 architecture (random weights)"
        lines = [
            f"# Training-step benchmark: {self.card}",
            "",
            f"torch {torch.__version__}; commit {self.commit}; {datetime.date.today().isoformat()}. {scale}, "
            f"{a.resolution} px, batch {a.batch}, bf16 mixed precision (student float32 master weights under "
            f"autocast; teacher UNet, VAE, text encoder and expert in bf16), gradient checkpointing unless "
            f"the row says otherwise, {a.prediction_type}, Huber c = {HUBER_C}. ms/step: median wall time of "
            f"n steps after the warm-up steps ({a.warmup} for A and B, {a.variant_warmup} for B's variants), "
            f"each timed from a synchronised device to a synchronised device (min–max in brackets). "
            f"Back-to-back: the mean of {a.back_to_back} steps issued with no synchronisation between them "
            f"(A and B only). First step: wall time of the first step (includes torch.compile's compilation) "
            f"and its loss (every provider starts from the same weights, data order and draws). Peak: "
            f"torch.cuda.max_memory_allocated from the provider's construction on (the frozen teacher parts, "
            f"and with the reward on the expert, are shared by the providers and included). Speedup: against "
            f"A with the same reward branch.",
            "",
            "| provider | reward branch | ms/step (n) | back-to-back ms/step | images/s | peak GiB | speedup vs A "
            "| first step s | first-step loss |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            pipelined = "–" if r["pipelined"] is None else f"{r['pipelined']:.1f}"
            peak = "–" if r["peak"] is None else f"{r['peak']:.1f}"
            lines.append(
                f"| {r['name']} | {r['reward']} | {r['ms']:.1f} ({r['lo']:.1f}–{r['hi']:.1f}, n={r['n']}) | "
                f"{pipelined} | {r['ips']:.2f} | {peak} | {r['speedup']} | {r['first_s']:.1f} | "
                f"{r['loss']:.6g} |"
            )
        for title, phases in self.breakdowns:
            total = sum(ms for _, ms in phases)
            lines += [
                "",
                f"Per-phase breakdown, {title} (median of {a.phase_steps} extra steps; GPU time between "
                f"marks, sum {total:.1f} ms):",
                "",
                "| phase | ms |",
                "|---|---|",
            ]
            lines += [f"| {label} | {ms:.1f} |" for label, ms in phases]
        if self.checks:
            lines += ["", "Loss check:", ""] + [f"- {c}" for c in self.checks]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --small: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 1 (default 3; --small: 1)")
    parser.add_argument(
        "--variant-steps", type=int, default=None, help="timed steps of B's variants (default: --steps)"
    )
    parser.add_argument("--variant-warmup", type=int, default=None, help="their warm-up steps (default: --warmup)")
    parser.add_argument(
        "--back-to-back",
        type=int,
        default=None,
        help="A and B: steps timed together with no synchronisation between them (default: --steps; 0: off)",
    )
    parser.add_argument(
        "--phase-steps",
        type=int,
        default=None,
        help="extra steps with per-phase marks (default 3; --small: 1; 0: no breakdown)",
    )
    parser.add_argument(
        "--phase-variants", default="rglcd_fast_cl", help="B variants that also get a per-phase breakdown (comma list)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default 8 (--small: 2)")
    parser.add_argument("--resolution", type=int, default=None, help="default 768 (--small: 32)")
    parser.add_argument(
        "--providers",
        default="reference,rglcd_fast,reference_noencode",
        help="comma list of: " + ", ".join(PROVIDER_NAMES) + " (compile variants run last)",
    )
    parser.add_argument("--reward", choices=("both", "on", "off"), default="both")
    parser.add_argument(
        "--compile-reward",
        choices=("both", "on", "off"),
        default="off",
        help="reward branches of the compile variant (default off)",
    )
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--no-check", action="store_true", help="skip the loss spot checks")
    parser.add_argument(
        "--out", default=None, help="results markdown (default benchmarks/results/train_step_<card>.md)"
    )
    parser.add_argument("--small", action="store_true", help="tiny configs, CPU or GPU: a quick smoke run")
    args = parser.parse_args()
    small = args.small
    args.steps = args.steps if args.steps is not None else (2 if small else 10)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if small else 3))
    args.variant_steps = args.variant_steps or args.steps
    args.variant_warmup = max(1, args.variant_warmup or args.warmup)
    args.back_to_back = args.back_to_back if args.back_to_back is not None else args.steps
    args.phase_steps = args.phase_steps if args.phase_steps is not None else (1 if small else 3)
    args.batch = args.batch or (2 if small else 8)
    args.resolution = args.resolution or (32 if small else 768)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    phase_variants = {p.strip() for p in args.phase_variants.split(",") if p.strip()}
    unknown = [p for p in providers + sorted(phase_variants) if p not in PROVIDER_NAMES]
    if unknown:
        parser.error(f"--providers / --phase-variants: unknown {unknown}")
    if not small and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --small for the CPU smoke run")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card_id = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0] if device.type == "cuda" else "cpu"
    out = args.out or (
        os.path.join(tempfile.gettempdir(), "train_step_small.md")
        if small
        else os.path.join(HERE, "results", f"train_step_{card_id}.md")
    )
    report = Report(out, args, device)
    print(f"{report.card}; torch {torch.__version__}; commit {report.commit}; writing {out}", flush=True)

    if not args.no_check:
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # a float32 comparison: no TF32 convolutions
        try:
            line = spot_check_small(device, args.prediction_type)
        except Exception as e:  # report and go on to the timings
            traceback.print_exc()
            line = f"small fp32 check failed: {type(e).__name__}: {e}"
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        print("check:", line, flush=True)
        report.checks.append(line)
        report.write()

    t0 = time.perf_counter()
    parts = build_teacher_parts(small, device, torch.bfloat16, args.prediction_type)
    dataset = RandomImages(2 * args.batch, args.resolution)
    print(f"teacher parts built in {time.perf_counter() - t0:.1f} s", flush=True)
    expert = None
    branches = {"both": [False, True], "off": [False], "on": [True]}
    # the order of the runs: every branch's providers, then the compile variant (its compilation is long)
    runs = [
        (name, reward)
        for reward in branches[args.reward]
        for name in providers
        if "compile" not in name and ONLY_REWARD.get(name, reward) == reward
    ]
    runs += [(name, reward) for reward in branches[args.compile_reward] for name in providers if "compile" in name]
    output_dir = tempfile.mkdtemp(prefix="rglcd_bench_train_")
    base_ms = {}
    for name, reward in runs:
        label = "on (LRM)" if reward else "off"
        if reward and expert is None:
            expert = build_expert(small, device, torch.bfloat16, parts["tokenizer"])
        main_row = name in ("reference", "rglcd_fast", "reference_noencode")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _reset_accelerate()
        t0 = time.perf_counter()
        provider = None
        try:
            if name.startswith("rglcd_fast"):
                provider = TrainerProvider(parts, dataset, args, device, reward, expert, output_dir, variant=name)
            else:
                provider = ReferenceProvider(
                    parts, dataset, args, device, reward, expert, encode_in_step=name == "reference"
                )
            built = time.perf_counter() - t0
            times, first_s, first_loss, pipelined = time_steps(
                provider.step,
                device,
                args.warmup if main_row else args.variant_warmup,
                args.steps if main_row else args.variant_steps,
                back_to_back=args.back_to_back if name in ("reference", "rglcd_fast") else 0,
            )
        except Exception as e:  # one provider failing leaves the others' rows
            traceback.print_exc()
            report.notes.append(
                f"{PROVIDER_NAMES[name]}, reward {label}: failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            )
            report.write()
            if provider is not None:
                provider.free()
            del provider
            restore_parts(parts)
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        ms = report.row(name, label, times, peak, base_ms.get(reward), first_s, first_loss, pipelined)
        if name == "reference":
            base_ms[reward] = ms
        print(
            f"{PROVIDER_NAMES[name]:58s} reward {label:8s} {ms:8.1f} ms/step  "
            f"back-to-back {'–' if pipelined is None else f'{pipelined:.1f}':>7}  peak {peak or 0:5.1f} GiB  "
            f"first step {first_s:6.1f} s "
            f"loss {first_loss:.6g}  (built in {built:.0f} s)",
            flush=True,
        )
        if args.phase_steps > 0 and name != "reference_noencode" and (main_row or name in phase_variants):
            try:
                phases = breakdown(provider.phase_step, provider.timeline, device, args.phase_steps)
                report.breakdowns.append((f"{PROVIDER_NAMES[name]}, reward {label}", phases))
                report.write()
                print("  " + ", ".join(f"{k} {v:.1f}" for k, v in phases), flush=True)
            except Exception:
                traceback.print_exc()
        if name == "reference" and not reward and not args.no_check:
            try:
                line = spot_check_full(provider, small)
            except Exception as e:
                traceback.print_exc()
                line = f"full-size check failed: {type(e).__name__}: {e}"
            print("check:", line, flush=True)
            report.checks.append(line)
            report.write()
        provider.free()
        del provider
        restore_parts(parts)
    print(f"wrote {out}")


def _reset_accelerate():
    """Each provider builds its own Accelerator; drop the process-wide state the last one left."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # pragma: no cover - older accelerate
        pass


if __name__ == "__main__":
    main()
