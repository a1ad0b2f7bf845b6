"""The RG-LCD trainer (docs/design.md §1): accelerate runs the same code on the CPU, one GPU or many
(`accelerate launch`). Each optimiser step: encode images and prompts, `DistillationStep` (student,
teacher CFG + fused solver step, EMA target, fused consistency loss, reward of the one-step prediction),
backward, clip, AdamW, LR schedule, EMA update, LRM update. Checkpoints are atomic and resume exactly;
non-finite losses skip the update; outputs are a diffusers LCM pipeline folder (or LoRA weights), the
LRM, logs.csv, TensorBoard events and sample grids."""

import csv
import dataclasses
import io
import math
import os
import time

import torch
from tqdm import tqdm

from ..upsample import fold_upsamplers
from .checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    start_from,
    write_file_atomic,
    write_folder,
)
from .config import TrainConfig
from .data import ResumableDataLoader, sdxl_time_ids, training_dataset
from .models import RewardGuidance, Teacher, WithoutAdapters, add_lora, check_settings, load_lrm, make_lrm, make_student
from .outputs import link_script_layout, save_lora, save_pipeline
from .step import DistillationConfig, DistillationStep, update_ema

# reward: the student's (scale-free) reward, the LRM's in lrm mode; expert_reward: the expert's reward of the
# student's one-step predictions (lrm mode: of the LRM update's sub-batch)
LOG_COLUMNS = (
    "step",
    "loss",
    "distill_loss",
    "reward",
    "expert_reward",
    "lrm_loss",
    "lrm_accuracy",
    "lr",
    "step_time_s",
    "images_per_s",
    "nonfinite_skipped",
    "data_skipped",
)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(accelerator) -> torch.dtype:
    """The frozen models' dtype, from the accelerator's mixed precision (the config's, else accelerate's)."""
    if accelerator.mixed_precision not in WEIGHT_DTYPES:
        raise ValueError(
            f"mixed_precision: accelerate's {accelerator.mixed_precision!r} is not supported "
            f"(use one of {', '.join(WEIGHT_DTYPES)})"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(  # the student would run float32 against float16 frozen models
            "mixed_precision: fp16 needs a CUDA device (accelerate runs no float16 autocast on the CPU): use bf16 or no"
        )
    return WEIGHT_DTYPES[accelerator.mixed_precision]


def make_accelerator(config, **kwargs):
    """An Accelerator for a run of config: its mixed precision (None: accelerate's own setting), its trackers,
    logs under OUTPUT/logs, CPU processes when no GPU is there (torchrun, accelerate launch: gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = getattr(config, "report_to", "tensorboard")
    return Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        **kwargs,
    )


def adamw(params, learning_rate, config, fused=True) -> torch.optim.AdamW:
    """The run's AdamW (its betas, epsilon and weight decay; parameter groups may set their own decay), for the
    student and the LRM alike (as the official code) and for pretrain-lrm; fused: its found_inf flag skips a
    non-finite step on the device (pretrain-lrm's is not fused, as the digits LRM was trained)."""
    return torch.optim.AdamW(
        params,
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        fused=fused,
    )


def end_training(accelerator) -> None:
    """Close the trackers and the process group at the end of a run, after a barrier. gloo's worker threads
    drop each finished collective's tensors themselves, taking the GIL where Python owns one; a worker still
    waiting for the GIL when the interpreter shuts down is ended with pthread_exit, which unwinds through
    gloo's thread and aborts the process ("terminate called without an active exception": the 2-rank test's
    rare abort). Waiting in the barrier releases the GIL, so those drops finish before the process exits."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    accelerator.end_training()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteCounter:
    """Skipped (non-finite) steps counted on the device; the host reads them at logging steps."""

    def __init__(self, device):
        self._total = torch.zeros((), dtype=torch.long, device=device)
        self._in_row = torch.zeros((), dtype=torch.long, device=device)
        self._max_in_row = torch.zeros((), dtype=torch.long, device=device)
        self._reported = 0

    def add(self, bad: torch.Tensor) -> None:
        self._total += bad
        self._in_row = (self._in_row + 1) * bad
        torch.maximum(self._max_in_row, self._in_row, out=self._max_in_row)

    @property
    def total(self) -> int:
        return int(self._total)

    def state(self) -> dict:
        """The counts a checkpoint keeps: a run resumed within a streak of skipped steps stops where the
        uninterrupted run stops."""
        return {
            "nonfinite_skipped": self.total,
            "nonfinite_in_row": int(self._in_row),
            "nonfinite_max_in_row": int(self._max_in_row),
            "nonfinite_reported": self._reported,
        }

    def load(self, state: dict) -> None:
        """state(), or a checkpoint of an earlier version, which kept the total alone."""
        self._total.fill_(state["nonfinite_skipped"])
        self._in_row.fill_(state.get("nonfinite_in_row", 0))
        self._max_in_row.fill_(state.get("nonfinite_max_in_row", 0))
        self._reported = state.get("nonfinite_reported", state["nonfinite_skipped"])

    def check(self, step: int, limit: int, output_dir: str) -> None:
        """Report new skips; raise once `limit` happened in a row (seen at this logging step)."""
        total, in_row = self.total, int(self._max_in_row)
        if total > self._reported:
            tqdm.write(
                f"step {step}: {total - self._reported} step(s) with a non-finite loss or gradient skipped "
                f"since the last log ({total} in all)"
            )
            self._reported = total
        if in_row >= limit:
            raise NonFiniteLossError(
                f"{in_row} non-finite losses in a row (by step {step}); stopping. The updates were skipped, so the "
                f"last checkpoint in {output_dir} and the current weights hold the last good state: lower the "
                "learning rate or reward_scale, or check the data"
            )
        self._max_in_row.copy_(self._in_row)


class Trainer:
    """config: the settings. Optional: accelerator (default: one built from the config), teacher (a
    Teacher already in memory instead of loading config.teacher), dataset (a map-style data set of
    {"pixel_values": [3, R, R] in [-1, 1], "caption": str} instead of config.data) and reward_model (an
    expert RewardModel already in memory, on the device, instead of loading config.reward_model)."""

    def __init__(
        self, config: TrainConfig, accelerator=None, teacher: Teacher | None = None, dataset=None, reward_model=None
    ):
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        check_settings(config, teacher, expert_given=reward_model is not None)
        self.config = config
        self.accelerator = accelerator or make_accelerator(
            config,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            # DDP: the gradients live in the all-reduce buckets (no second copy of them)
            kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        )
        acc = self.accelerator
        if config.fsdp and acc.num_processes < 2:
            raise ValueError("fsdp: shards over several processes; launch with accelerate launch / torchrun")
        set_seed(config.seed)
        self.device = acc.device
        if config.compile_unets == "all" and self.device.type == "cpu":
            raise ValueError(
                "compile_unets: 'all' (the student's backward compiled) is for CUDA; torch's CPU inductor "
                "gets diffusers' UNet gradients wrong (torch 2.13: scripts/inductor_cpu_unet_grad.py). "
                "Use 'student_blocks', 'frozen' or 'none' on the CPU"
            )
        self.weight_dtype = weight_dtype(acc)
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        # models (docs/design.md §1): frozen teacher parts, trainable student, EMA target
        self.teacher = teacher or Teacher.from_pretrained(config.teacher, self.device, self.weight_dtype, config.vae)
        if config.use_lora:  # the adapters on the teacher's UNet, whose passes turn them off
            student = add_lora(self.teacher.unet, config.lora_rank, config.lora_alpha)
            self.teacher_unet = WithoutAdapters(student)
        else:
            student = make_student(
                self.teacher.unet, config.time_cond_proj_dim, state_dict=self.teacher.unet_state_float32()
            )
            self.teacher_unet = self.teacher.unet
        if config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if config.channels_last and self.device.type == "cuda":
            # NHWC, cuDNN's native layout for convolutions; our ops take it as it comes. Off by default: in
            # eager, torch's CUDA GroupNorm reads and writes NCHW, so each GroupNorm -> conv pair transposes
            # (measured 21% slower a step at SD2.1 768 px). The teacher's UNet and VAE are converted in
            # place; the target copies the student's layout.
            for module in (student, self.teacher.unet, self.teacher.vae):
                module.to(memory_format=torch.channels_last)
        # LoRA (as train_lcm_distill_lora_sd.py): the target is the student itself, without gradient
        self.target = None if config.use_lora else make_target(student)
        if config.fsdp:  # after the target's copy, before the optimiser (sharding replaces the parameters)
            from .fsdp import shard_unet

            sharded = (student, self.target, self.teacher.unet) if config.fsdp_shard_teacher else (student, self.target)
            for unet in sharded:
                shard_unet(unet, self.device.type, acc.num_processes)
        params = [p for p in student.parameters() if p.requires_grad]
        learning_rate = config.learning_rate
        if config.scale_lr:  # as the scripts: by the images a step sees
            learning_rate *= config.train_batch_size * config.gradient_accumulation_steps * acc.num_processes
        optimizer = adamw(params, learning_rate, config)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * acc.num_processes,
            num_training_steps=config.max_train_steps * acc.num_processes,
        )
        if config.fsdp:  # sharded already: accelerate takes the optimiser and the schedule only (no DDP)
            self.student = student
            self.optimizer, self.lr_scheduler = acc.prepare(optimizer, lr_scheduler)
        else:
            self.student, self.optimizer, self.lr_scheduler = acc.prepare(student, optimizer, lr_scheduler)
        self._expert = reward_model
        step_settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(DistillationConfig)}
        self.distill = DistillationStep(
            self.teacher.noise_scheduler, DistillationConfig(**step_settings), device=self.device
        )
        self.guidance = self._make_reward_guidance()
        if self.guidance is not None and self.device.type == "cuda":
            # the reward decodes every step: each decoder upsampler as one transposed convolution (same sums;
            # rglcd_fast.upsample). SD2.1 VAE, 768 px, batch 8, bf16, H200: −7% a decode eager, −8% compiled
            fold_upsamplers(self.teacher.vae.decoder)
        if config.compile_unets != "none":
            # in place (Module.compile: same module, same state dict); each UNet compiles on its first call
            # (the student with gradient checkpointing: dynamo traces non-reentrant checkpoints). Under DDP the
            # wrapped module is compiled, so dynamo sees no DDP: gradients all-reduce after the whole backward.
            # "frozen" and "student_blocks" leave out every UNet with a trainable parameter (with LoRA the
            # student is the target); "student_blocks" then compiles the student's blocks one by one.
            unets = {id(m): m for m in (student, self.teacher.unet, self.target) if m is not None}.values()
            if config.compile_unets in ("frozen", "student_blocks"):
                unets = [m for m in unets if not any(p.requires_grad for p in m.parameters())]
            if config.compile_memory_budget is not None:  # process-wide: read when the student's graph compiles
                torch._functorch.config.activation_memory_budget = config.compile_memory_budget
            # and the VAE encoder, which encodes the batch in every step (frozen, forward only); with a reward,
            # the VAE decoder and the expert's image encoders too (frozen: the LRM update decodes and scores its
            # candidates, the direct reward differentiates through both to the student's prediction)
            vae = self.teacher.vae
            rewarded = (vae.decoder, *self.guidance.expert.image_encoders()) if self.guidance is not None else ()
            # static shapes, as compile_blocks: a graph per shape, never a symbolic one (after other compiles in
            # the process, inductor's CPU graph with symbolic shapes of the tiny test world failed to compile)
            for module in (*unets, vae.encoder, *rewarded):
                module.compile(dynamic=False)
            if config.compile_unets == "student_blocks":
                compile_blocks(student)

        self.resolution = config.resolution or self.teacher.default_resolution
        dataset = dataset if dataset is not None else training_dataset(config, self.resolution)
        self.loader = ResumableDataLoader(
            dataset,
            config.train_batch_size,
            shuffle=True,
            seed=config.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            drop_last_batch=True,
            num_workers=config.dataloader_num_workers,
            pin_memory=self.device.type == "cuda",
        )  # for a non-blocking copy
        # one generator per rank for every draw of the step (posterior sample, n, w, noise)
        self.generator = torch.Generator(self.device).manual_seed(config.seed + acc.process_index)
        self.uncond_embeds = None if self.teacher.is_sdxl else self.teacher.encode_prompts([""])
        self.step = 0
        self.nonfinite = NonFiniteCounter(self.device)
        self.log_window = []  # the metrics of the micro-batches since the last log row (device tensors)

    # ---- construction ----------------------------------------------------------------------------

    def _make_reward_guidance(self):
        config = self.config
        if config.reward_mode == "none":
            return None
        from ..reward import load_reward_model

        expert = (
            self._expert
            if self._expert is not None
            else load_reward_model(config.reward_model, config.reward_model_path, device=self.device)
        )
        lrm = optimizer = None
        if config.reward_mode == "lrm":
            if config.lrm_path:
                lrm = load_lrm(config.lrm_path, self.teacher, self.device)
                if config.lrm_frozen:
                    lrm.requires_grad_(False)
                else:
                    lrm.lock(config.lrm_unlocked_image_groups, config.lrm_unlocked_text_layers)
            else:
                lrm = make_lrm(self.teacher, config.lrm_widths, config.lrm_embed_dim, config.lrm_init_clip)
            lrm = lrm.to(self.device)
            trainable = [p for p in lrm.parameters() if p.requires_grad]
            if trainable:  # a frozen LRM has no optimiser and no online update
                optimizer = adamw(trainable, config.lrm_learning_rate, config)
        reduce = self._mean_over_ranks if self.accelerator.num_processes > 1 else None
        return RewardGuidance(
            config.reward_mode,
            self.teacher,
            expert,
            lrm,
            optimizer,
            config.lrm_loss,
            config.rm_loss_scale,
            config.lrm_batch_size,
            reduce,
            decode_batch_size=config.vae_decode_batch_size,
            ce_real_wins=config.lrm_ce_real_wins,
            smooth_gt_label=config.smooth_gt_label,
            score_real_pixels=config.lrm_score_real_pixels,
        )

    def _mean_over_ranks(self, tensors):
        """All-reduce (mean) a list of tensors in place through one flat buffer."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    # ---- state -----------------------------------------------------------------------------------

    def _state(self) -> dict:
        """What a checkpoint holds: everything the next step depends on."""
        acc = self.accelerator
        state = {
            "student": acc.unwrap_model(self.student),
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "data": self.loader,
            "trainer": {
                "step": self.step,
                **self.nonfinite.state(),
                # a log row that spans the checkpoint averages the steps before it too
                "log_window": [{k: float(v) for k, v in m.items()} for m in self.log_window],
            },
            "rng": capture_rng_state({"train": self.generator}),
        }
        if self.target is not None:
            state["target"] = self.target
        if self.config.fsdp:  # gathered whole onto rank 0 at a save, each rank's shard kept at a load
            from .fsdp import ShardedModule, ShardedOptimizer

            state.update(
                student=ShardedModule(self.student),
                target=ShardedModule(self.target),
                optimizer=ShardedOptimizer(self.student, self.optimizer.optimizer),
            )
        if self.guidance is not None and self.guidance.lrm is not None:
            state["lrm"] = self.guidance.lrm
            if self.guidance.lrm_optimizer is not None:
                state["lrm_optimizer"] = self.guidance.lrm_optimizer
        if acc.scaler is not None:
            state["grad_scaler"] = acc.scaler
        return state

    def save_checkpoint(self) -> str:
        """checkpoint-<step>, atomically. A failed write (disk full, a folder that turned unwritable) leaves
        the previous checkpoint as it was and stops the run with CheckpointWriteError, saying which."""
        acc, output_dir = self.accelerator, self.config.output_dir
        try:
            return save_checkpoint(
                output_dir,
                self.step,
                self._state(),
                keep=self.config.checkpoints_total_limit,
                overwrite=True,
                barrier=acc.wait_for_everyone,
                rank=acc.process_index,
                world_size=acc.num_processes,
            )
        except OSError as error:
            previous = latest_checkpoint(output_dir)
            raise CheckpointWriteError(
                f"checkpoint-{self.step} could not be written in {output_dir} ({error}); "
                + (f"{previous} is intact" if previous else "no earlier checkpoint exists")
                + ": free space or fix the folder's permissions, then resume with --resume-from-checkpoint latest"
            ) from error

    def resume(self, checkpoint: str) -> None:
        state = self._state()
        state["rng"] = {"train": self.generator}
        state["trainer"] = None
        info = load_checkpoint(checkpoint, state, map_location=self.device, rank=self.accelerator.process_index)
        saved = info["trainer"]
        self.step = int(saved["step"])
        self.nonfinite.load(saved)
        window = saved.get("log_window", [])  # none in an earlier version's checkpoint
        self.log_window = [{k: torch.tensor(v, device=self.device) for k, v in m.items()} for m in window]

    # ---- one optimiser step ----------------------------------------------------------------------

    def train_step(self, batches) -> list:
        """One optimiser step over gradient_accumulation_steps micro-batches, with no host
        synchronisation: a non-finite loss or gradient norm (on any rank) turns the fused AdamW update
        into a no-op on the device (its found_inf flag; the GradScaler's own under fp16), and is counted
        on the device. The EMA target then relaxes towards the unchanged student. Returns the
        micro-batches' metrics (device tensors)."""
        acc, config = self.accelerator, self.config
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        window = []
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batches)
            prompts = batch["caption"]
            # pinned on CUDA (the loader's pin_memory): an asynchronous copy, no host sync
            pixel_values = batch["pixel_values"].to(self.device, non_blocking=True)
            latents = self.teacher.encode_images(pixel_values, self.generator)
            prompt_embeds, uncond, added_conditions = self._conditions(batch)
            target_unet = self.target if self.target is not None else acc.unwrap_model(self.student)
            reward_fn = None if self.guidance is None else (lambda pred: self.guidance.reward(pred, prompts))
            with acc.accumulate(self.student):
                with acc.autocast():
                    out = self.distill(
                        self.student,
                        self.teacher_unet,
                        target_unet,
                        latents,
                        prompt_embeds,
                        uncond,
                        reward_fn=reward_fn,
                        generator=self.generator,
                        **added_conditions,
                    )
                bad = bad | ~torch.isfinite(out.loss.detach())
                acc.backward(out.loss)
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_(self.student.parameters(), config.max_grad_norm)
                    if hasattr(norm, "full_tensor"):  # FSDP2's norm of sharded gradients is a DTensor, and in
                        norm = norm.full_tensor()  # torch 2.11 the all-reduce below has no sharding rule for one
                    bad = bad | ~torch.isfinite(norm)
                    if acc.num_processes > 1:  # every rank skips together
                        bad = acc.reduce(bad.float(), reduction="sum") > 0
                    if acc.scaler is None:
                        self.optimizer.optimizer.found_inf = bad.float()
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            metrics = {"loss": out.loss.detach(), "distill_loss": out.distill_loss.detach()}
            if out.reward_loss is not None:
                metrics["reward"] = metrics["expert_reward"] = -out.reward_loss.detach()
            if self.guidance is not None and self.guidance.lrm_optimizer is not None:
                metrics["lrm_loss"], metrics["lrm_accuracy"], metrics["expert_reward"] = self.guidance.update_lrm(
                    out.model_pred, out.target, latents, prompts, images=pixel_values
                )
            elif self.guidance is not None and self.guidance.lrm is not None:  # a frozen LRM
                metrics["expert_reward"] = self.guidance.expert_reward(out.model_pred, prompts)
            window.append(metrics)
        if config.fsdp:  # a root's parameters stay gathered after a forward without backward
            self.target.reshard()
            if config.fsdp_shard_teacher:
                self.teacher.unet.reshard()
        if self.target is not None:
            update_ema(self.target, acc.unwrap_model(self.student), config.ema_decay)
        self.nonfinite.add(bad)
        self.step += 1
        return window

    def _conditions(self, batch):
        """The UNets' conditioning of a batch: (prompt embeddings, unconditional embeddings, SDXL's added
        conditions). SD: the prompts' and the empty prompt's embeddings. SDXL, as its scripts: both encoders'
        states and the pooled projection of the prompts, the batch's size / crop time ids, and zero embeddings
        (same ids) for the unconditional branch."""
        prompts = batch["caption"]
        if not self.teacher.is_sdxl:
            return self.teacher.encode_prompts(prompts), self.uncond_embeds.expand(len(prompts), -1, -1), {}
        time_ids = sdxl_time_ids(batch, self.resolution, self.config.use_fix_crop_and_size)
        embeds, extra = self.teacher.unet_conditions(prompts, time_ids)
        added = extra["added_cond_kwargs"]
        uncond_added = dict(added, text_embeds=torch.zeros_like(added["text_embeds"]))
        return embeds, torch.zeros_like(embeds), dict(**extra, uncond_added_cond_kwargs=uncond_added)

    # ---- the loop --------------------------------------------------------------------------------

    def train(self) -> dict:
        """Runs to max_train_steps (resuming when asked) and writes the outputs; returns their paths.
        The host reads the device (losses, non-finite counts) only at logging and checkpoint steps."""
        acc, config = self.accelerator, self.config
        checkpoint = start_from(
            config.resume_from_checkpoint, config.output_dir, config.overwrite_output_dir, acc.is_main_process
        )
        if checkpoint is not None:
            self.resume(checkpoint)
        log = None
        if acc.is_main_process:
            os.makedirs(config.output_dir, exist_ok=True)
            config.save(os.path.join(config.output_dir, "config.json"))
            log = CsvLog(os.path.join(config.output_dir, "logs.csv"), LOG_COLUMNS, resume_step=self.step)
        acc.init_trackers(
            config.tracker_project_name,
            config={k: v for k, v in self.settings().items() if isinstance(v, (int, float, str, bool))},
            # resumed: TensorBoard hides what the interrupted run logged after the checkpoint (logged again)
            init_kwargs={"tensorboard": {"purge_step": self.step + 1}} if self.step else {},
        )
        batches = self.loader.infinite()
        progress = tqdm(
            total=config.max_train_steps,
            initial=self.step,
            desc="RG-LCD",
            disable=not (config.progress and acc.is_main_process),
        )
        steps_timed, last_log = 0, time.perf_counter()
        images_per_step = config.train_batch_size * config.gradient_accumulation_steps * acc.num_processes
        while self.step < config.max_train_steps:
            self.log_window += self.train_step(batches)
            steps_timed += 1
            progress.update()
            if self.step % config.logging_steps == 0 or self.step == config.max_train_steps:
                row = self._log_row(self.log_window, (time.perf_counter() - last_log) / steps_timed, images_per_step)
                acc.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=self.step)
                if log is not None:
                    log.write(row)
                progress.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "reward") if row[k] is not None})
                self.nonfinite.check(self.step, config.max_nonfinite_steps, config.output_dir)
                self.log_window, steps_timed, last_log = [], 0, time.perf_counter()
            # the grid before the checkpoint: a run that dies while sampling it resumes before this step, and
            # draws it again
            if (
                config.validation_steps
                and self.step % config.validation_steps == 0
                and self.step < config.max_train_steps
            ):
                self.sample_grid()
            if self.step % config.checkpointing_steps == 0 or self.step == config.max_train_steps:
                self.save_checkpoint()
        progress.close()
        return self.save_outputs()

    def finish(self) -> None:
        """Close the trackers (TensorBoard) and the process group: call once, after train()."""
        end_training(self.accelerator)

    def _log_row(self, window, seconds, images_per_step) -> dict:
        def mean(name):
            values = [m[name] for m in window if name in m]
            return torch.stack(values).float().mean().item() if values else None

        return {
            "step": self.step,
            "loss": mean("loss"),
            "distill_loss": mean("distill_loss"),
            "reward": mean("reward"),
            "expert_reward": mean("expert_reward"),
            "lrm_loss": mean("lrm_loss"),
            "lrm_accuracy": mean("lrm_accuracy"),
            "lr": self.lr_scheduler.get_last_lr()[0],
            "step_time_s": seconds,
            "images_per_s": images_per_step / seconds if seconds > 0 else None,
            "nonfinite_skipped": self.nonfinite.total,
            "data_skipped": self.loader.skipped,
        }

    # ---- outputs ---------------------------------------------------------------------------------

    def validation_prompts(self) -> list:
        if self.config.validation_prompts:
            return list(self.config.validation_prompts)
        if self.config.teacher == "digits":
            from ..world.digits import prompt_for

            return [prompt_for(d) for d in range(10)]
        dataset = self.loader.dataset
        return [dataset[i]["caption"] for i in range(min(4, len(dataset)))]

    def sampler(self, unet=None):
        """An LCMSampler over ``unet`` (default: the current student) and the teacher's VAE and text encoder."""
        from ..sample import LCMSampler
        from ..schedulers import FusedLCMScheduler

        unet = unet if unet is not None else self.accelerator.unwrap_model(self.student)
        return LCMSampler(
            unet=unet,
            vae=self.teacher.vae,
            text_encoder=self.teacher.text_encoder,
            tokenizer=self.teacher.tokenizer,
            scheduler=self.teacher.lcm_scheduler(FusedLCMScheduler),
            device=self.device,
            dtype=next(unet.parameters()).dtype,
            text_encoder_2=self.teacher.text_encoder_2,
            tokenizer_2=self.teacher.tokenizer_2,
        )

    def sample_grid(self, path=None):
        """Main process: a grid, one row per LCM step count of validation_lcm_steps, one column per
        validation prompt, same seed every time, for the online student (samples/step-<step>.png) and the
        EMA target (samples/step-<step>-target.png; full students only); each grid also goes to the trackers
        (TensorBoard) as an image. Returns the student's grid's path. FSDP: every rank samples (a sharded
        UNet's forward is a collective), the main process writes."""
        main = self.accelerator.is_main_process
        if not (main or self.config.fsdp):
            return None
        from ..sample import image_grid

        path = path or os.path.join(self.config.output_dir, "samples", f"step-{self.step:06d}.png")
        if main:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        grids = {"student": (self.accelerator.unwrap_model(self.student), path)}
        if self.target is not None:
            grids["target"] = (self.target, path.removesuffix(".png") + "-target.png")
        prompts = self.validation_prompts()
        for name, (unet, grid_path) in grids.items():
            sampler = self.sampler(unet)
            was_training = unet.training
            unet.eval()
            try:
                images = [
                    image
                    for steps in self.config.validation_lcm_steps
                    for image in sampler(
                        prompts, steps=steps, seed=self.config.seed, height=self.resolution, width=self.resolution
                    )
                ]
            finally:
                unet.train(was_training)
            if main:
                grid = image_grid(images, columns=len(prompts))
                grid.save(grid_path)
                self._log_image(f"validation/{name}", grid)
        return path if main else None

    def _log_image(self, tag, image):
        """A PIL image to the trackers (TensorBoard: HWC uint8; wandb and the others: their log_images)."""
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(tag, np.asarray(image), self.step, dataformats="HWC")
            else:
                tracker.log_images({tag: [image]}, step=self.step)

    def settings(self) -> dict:
        """The run's config as a dict, with the mixed precision in effect (the config's, else accelerate's)."""
        return {**self.config.to_dict(), "mixed_precision": self.accelerator.mixed_precision}

    def save_outputs(self) -> dict:
        """Main process writes, every rank waits: the final sample grid, pipeline/ (a diffusers LCM pipeline
        folder: the student's UNet, or the teacher's plus lora/ for LoRA; each with a model card),
        unet_target/, lrm/, and the scripts' names for the student (outputs.link_script_layout)."""
        acc, config = self.accelerator, self.config
        outputs = {
            "pipeline": os.path.join(config.output_dir, "pipeline"),
            "logs": os.path.join(config.output_dir, "logs.csv"),
        }
        if config.use_lora:
            outputs["lora"] = os.path.join(config.output_dir, "lora")
        if self.target is not None:
            outputs["unet_target"] = os.path.join(config.output_dir, "unet_target")
        if self.guidance is not None and self.guidance.lrm is not None:
            outputs["lrm"] = os.path.join(config.output_dir, "lrm")
        student, target = acc.unwrap_model(self.student), self.target
        samples = self.sample_grid()
        if config.fsdp:  # whole copies on the main process (gathering is a collective: every rank)
            from .fsdp import unsharded_copy

            student, target = unsharded_copy(student), unsharded_copy(target)
        if acc.is_main_process:
            outputs["samples"] = samples
            card = dict(settings=self.settings(), grid=outputs["samples"], prompts=self.validation_prompts())
            write_folder(outputs["pipeline"], lambda tmp: save_pipeline(tmp, self.teacher, student, **card))
            if config.use_lora:
                write_folder(outputs["lora"], lambda tmp: save_lora(tmp, student, self.teacher.is_sdxl, **card))
            if target is not None:
                write_folder(outputs["unet_target"], target.save_pretrained)
            if "lrm" in outputs:
                write_folder(outputs["lrm"], self.guidance.lrm.save_pretrained)
            link_script_layout(config.output_dir, config.use_lora)
        acc.wait_for_everyone()
        return outputs


def make_target(student):
    """The EMA target: a frozen copy of the student (docs/design.md §1 step 6)."""
    import copy

    target = copy.deepcopy(student).requires_grad_(False)
    return target.train()


class CsvLog:
    """logs.csv: one row per logging step, the given columns; a resumed run appends (rows after the
    checkpoint's step, from the interrupted run, are dropped first, and so is a line torn by a crash)."""

    def __init__(self, path, columns, resume_step: int = 0):
        self.path, self.columns = path, columns
        if os.path.isfile(path):
            with open(path, newline="") as f:
                text = f.read()
            whole_lines = io.StringIO(text[: text.rfind("\n") + 1])
            rows = [row for row in csv.DictReader(whole_lines) if int(row["step"]) <= resume_step]
            kept = io.StringIO()
            writer = csv.DictWriter(kept, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
            write_file_atomic(path, kept.getvalue())

    def write(self, row: dict) -> None:
        exists = os.path.isfile(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if not exists:
                writer.writeheader()
            writer.writerow(
                {
                    k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v))
                    for k, v in row.items()
                }
            )


def compile_blocks(unet):
    """Regional compilation of a trainable UNet: each ResnetBlock2D and BasicTransformerBlock compiled on its
    own (diffusers' compile_repeated_blocks names only the transformer blocks of a UNet2DConditionModel, and
    the resnets hold most of its convolutions). diffusers' gradient checkpointing wraps exactly these blocks
    in non-reentrant checkpoints, so each compiled block's saved tensors are still dropped after the forward
    and recomputed in the backward: the peak stays eager's, where the whole compiled student ("all") holds
    ~4.5 GiB more at SD2.1 scale. Each block shape (and grad mode: with LoRA the student is also the no-grad
    target) is its own static graph, so dynamo's recompile limit (a block class is one code object; 8 graphs
    by default; process-wide) is raised to twice the number of blocks."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
    for block in blocks:
        block.compile(dynamic=False)
