"""bench_train_step.py's providers: the LCD script's step (tests/lcd_script.lcd_step, with the RG-LCD LRM
branch written out unfused) and rglcd_fast's Trainer.train_step with its variants; the loss spot checks."""

import copy
import statistics

import lcd_script  # tests/ is on the path (bench_train_step.py puts it there)
import torch
import torch.nn.functional as F
from train_step_harness import Timeline
from train_step_models import (
    EMA_DECAY,
    HUBER_C,
    LR,
    LRM_EMBED_DIM,
    LRM_LR,
    LRM_WIDTHS,
    MAX_GRAD_NORM,
    TIME_COND_PROJ_DIM,
    WEIGHT_DECAY,
    infinite,
    make_scheduler,
    unet_config,
)


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
    """Provider A: the LCD script's training step (and with a reward the RG-LCD branch unfused: reward "lrm",
    the latent reward model's score and its update; "direct", the expert's score of the decoded prediction)."""

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
        if reward == "lrm":
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
            if self.reward == "lrm":  # reward of the one-step prediction by the LRM (its weights not trained by it)
                self.lrm.requires_grad_(False)
                with acc.autocast():
                    ids = self.lrm.tokenize(text)
                    reward = lrm_scores_unfused(self.lrm, model_pred / scale, lrm_text_features(self.lrm, ids), 1.0)
                self.lrm.requires_grad_(True)
                loss = loss + 1.0 * -reward.float().mean()
            elif self.reward == "direct":  # the expert's cosine of the decoded prediction, through the decoder
                tl.mark("direct reward: decode + expert")
                with acc.autocast():
                    reward = self.expert_cosine(self.decode(model_pred / scale), text)
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
        if self.reward == "lrm":
            self.lrm_update(model_pred, target, latents, text, scale)
        if acc.sync_gradients:
            tl.mark("EMA")
            script_update_ema(self.target_unet.parameters(), self.unet.parameters(), EMA_DECAY)
        logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0]}  # the script logs each step
        return logs

    def decode(self, latents):
        vae = self.parts["vae"]
        return (vae.decode(latents.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)

    def expert_cosine(self, images, text):
        """The expert's cosine of images and text, [B] (the official code's scale-free CLIP reward)."""
        u = self.expert.image_features(images).float()
        v = self.expert.text_features(text).float()
        return (u / u.norm(dim=-1, keepdim=True) * (v / v.norm(dim=-1, keepdim=True))).sum(dim=-1)

    def lrm_update(self, model_pred, target, latents, text, scale):
        """The LRM update, plain torch: decode the candidates, expert logits, LRM logits, pairwise KL, AdamW."""
        tl, expert, lrm = self.timeline, self.expert, self.lrm
        candidates = [c.detach().float() for c in (model_pred, target, latents)]
        tl.mark("LRM update: decode candidates")
        with torch.no_grad():
            images = [self.decode(c / scale) for c in candidates]
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
# change made to the built trainer ("bf16_target": the EMA target stored in bf16, measured, not adopted;
# "compile_lrm": the LRM's image and text towers compiled, forward and backward, to measure before adopting).
TRAINER_VARIANTS = {
    "rglcd_fast": {},
    "rglcd_fast_cl": {"channels_last": True},
    "rglcd_fast_bf16_target": {"bf16_target": True},
    "rglcd_fast_nockpt": {"gradient_checkpointing": False},
    "rglcd_fast_decode_one_call": {"vae_decode_batch_size": "all"},
    "rglcd_fast_compile": {"compile_unets": "all"},
    "rglcd_fast_compile_cl": {"compile_unets": "all", "channels_last": True},
    "rglcd_fast_compile_frozen": {"compile_unets": "frozen"},
    "rglcd_fast_compile_blocks": {"compile_unets": "student_blocks"},
    "rglcd_fast_compile_blocks_decode_one_call": {"compile_unets": "student_blocks", "vae_decode_batch_size": "all"},
    "rglcd_fast_compile_blocks_cl": {"compile_unets": "student_blocks", "channels_last": True},
    "rglcd_fast_compile_blocks_lrm": {"compile_unets": "student_blocks", "compile_lrm": True},
    "rglcd_fast_compile_budget": {"compile_unets": "all", "compile_memory_budget": 0.5},
    "rglcd_fast_fsdp": {"fsdp": True},  # several processes: the full student and its target sharded (FSDP2)
    "rglcd_fast_fsdp_shard_teacher": {"fsdp": True, "fsdp_shard_teacher": True},
}


class TrainerProvider:
    def __init__(self, parts, dataset, args, device, reward, expert=None, output_dir=None, variant="rglcd_fast"):
        from rglcd_fast.train.config import make_config
        from rglcd_fast.train.models import Teacher
        from rglcd_fast.train.trainer import Trainer

        overrides = dict(TRAINER_VARIANTS[variant])
        bf16_target = overrides.pop("bf16_target", False)
        compile_lrm = overrides.pop("compile_lrm", False)
        if overrides.get("vae_decode_batch_size") == "all":  # the LRM update's three candidates in one call
            overrides["vae_decode_batch_size"] = 3 * args.batch
        settings = dict(
            teacher="sd21-random-in-memory",
            mixed_precision="bf16",
            train_batch_size=args.batch,
            reward_mode=reward or "none",
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
        if "text_encoder_2" in parts:  # SDXL: the random images carry no original sizes or crops
            settings["use_fix_crop_and_size"] = True
        config = make_config(**{**settings, **overrides})
        self.parts = parts
        teacher = Teacher(folder="", **parts)
        self.trainer = Trainer(config, teacher=teacher, dataset=dataset, reward_model=expert if reward else None)
        if bf16_target:
            self.trainer.target.to(torch.bfloat16)
        if compile_lrm:  # static shapes, as the trainer's compiled modules
            lrm = self.trainer.guidance.lrm
            for tower in (lrm.image_encoder, lrm.text_model):
                tower.compile(dynamic=False)
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

        def on_call(module, before=None, after=None):
            """Marks before / after a module's calls. A compiled module runs its hooks inside the compiled
            code, where no CUDA event is recorded: its compiled call is wrapped instead (restored by free)."""
            compiled = module._compiled_call_impl
            if compiled is None:
                if before:
                    add(module.register_forward_pre_hook(pre(before)))
                if after:
                    add(module.register_forward_hook(pre(after)))
                return

            def marked(*args, **kwargs):
                if before:
                    tl.mark(before)
                out = compiled(*args, **kwargs)
                if after:
                    tl.mark(after)
                return out

            module._compiled_call_impl = marked
            add(Restore(module, compiled))

        def student_out(module, args, out):
            if out.sample.requires_grad:
                out.sample.register_hook(lambda grad: tl.mark("backward"))

        add(tr.teacher.text_encoder.register_forward_pre_hook(pre("text encode")))
        add(student.register_forward_pre_hook(pre("student fwd")))
        add(student.register_forward_hook(student_out))
        on_call(tr.teacher.unet, before="teacher cond + uncond (+ CFG, DDIM step)")
        on_call(tr.target, before="target (+ consistency output)", after="loss (+ reward fwd, when on)")
        add(student.conv_in.weight.register_post_accumulate_grad_hook(pre("clip grad norm")))
        add(tr.optimizer.optimizer.register_step_pre_hook(pre("AdamW")))
        add(
            tr.optimizer.optimizer.register_step_post_hook(
                pre("lr sched + zero_grad" if self.reward == "lrm" else "EMA")
            )
        )
        if self.reward == "direct":
            on_call(tr.teacher.vae.decoder, before="direct reward: decode + expert")
        if self.reward == "lrm":
            g = tr.guidance
            on_call(tr.teacher.vae.decoder, before="LRM update: decode candidates")
            on_call(g.expert, before="LRM update: expert scoring")
            on_call(g.expert.model.vision_model, before="LRM update: expert scoring")

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


class Restore:
    """A hook-like handle that puts a module's compiled call back."""

    def __init__(self, module, compiled):
        self.module, self.compiled = module, compiled

    def remove(self):
        self.module._compiled_call_impl = self.compiled


def restore_parts(parts, expert=None):
    """The trainer converts (channels_last), folds (the VAE decoder's upsamplers, with a reward on CUDA) and
    compiles the shared teacher parts and the expert in place:
    undo, so that the next provider (A included) finds them as built. Dynamo's compiled code goes too: its
    guards do not check parameter strides (the VAE encoder compiled for NCHW weights, kept, failed inductor's
    stride assertion on the next provider's channels_last weights)."""
    for module in (parts["unet"], parts["vae"]):
        module.to(memory_format=torch.contiguous_format)
    for module in (parts["unet"], parts["vae"], expert):
        for m in module.modules() if module is not None else ():
            m._compiled_call_impl = None
            m.__dict__.pop("forward", None)  # fold_upsamplers' instance-level forward
    torch._dynamo.reset()
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
        modules = (provider.unet, provider.parts["unet"], provider.target_unet)

        def ours(memory_format):
            for module in modules:
                module.to(memory_format=memory_format)
            with provider.accelerator.autocast():
                return step(
                    *modules,
                    latents.float(),
                    embeds,
                    provider.uncond_prompt_embeds,
                    generator=torch.Generator(device).manual_seed(3),
                )

        out_cl = ours(torch.channels_last)
        out = ours(torch.contiguous_format)
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
