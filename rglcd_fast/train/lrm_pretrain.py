"""`rglcd-fast pretrain-lrm`: the latent reward model (LRM) pre-trained offline as a latent CLIP, as the official
RG-LCD LRM is before its online fine-tuning (docs/design.md §1 step 9).

Each step: the teacher's VAE encodes a batch of captioned images (latents / scaling factor, what the LRM reads
online); a symmetric contrastive loss aligns the LRM's latent image tower with its text tower (images that
share a caption are all its positives); optionally (distill_weight > 0) the LRM also learns the expert's
pairwise preferences between each real latent and the teacher's one-step predictions from noisy versions of
it, the kind of candidate the LRM ranks online (the fused pairwise preference loss, KL). The text tower
starts from the expert's CLIP text tower when the expert has one, else from the teacher's text encoder.
Checkpoints and resume as the trainer's (exact); the result is an LRM folder (`LatentRewardModel.from_pretrained`)
that `rglcd-fast train --lrm-path` starts from."""

import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import ops
from ..prompts import fixed_time_ids
from .checkpoint import (
    capture_rng_state,
    check_fresh_start,
    load_checkpoint,
    save_checkpoint,
    start_from,
    write_folder,
)
from .config import LRMPretrainConfig
from .data import ResumableDataLoader, training_dataset
from .models import Teacher, make_lrm

LOG_COLUMNS = (
    "step",
    "loss",
    "contrastive_loss",
    "distill_loss",
    "retrieval_accuracy",
    "preference_accuracy",
    "logit_scale",
    "lr",
    "step_time_s",
)


def contrastive_loss(image_emb, text_emb, logit_scale, captions):
    """CLIP's symmetric cross-entropy over the batch's image-caption similarity matrix (× exp(logit_scale));
    images sharing a caption are all positives of it (the target spreads evenly over them). Returns (loss,
    retrieval accuracy: the fraction of images whose most similar caption is theirs)."""
    u, v = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.float().exp() * u @ v.T
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions], device=logits.device)
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)  # symmetric: the rows' and the columns' targets alike
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    accuracy = same.gather(1, logits.detach().argmax(1, keepdim=True)).mean()
    return loss, accuracy


def weight_decay_groups(model, weight_decay, every_parameter=False):
    """AdamW parameter groups as open_clip's training: weight_decay on the weight matrices, none on the
    parameters of fewer than 2 dimensions (norm gains, biases, the class token, the logit scale);
    every_parameter: one group, all decayed."""
    if every_parameter:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


@torch.no_grad()
def ranking_candidates(teacher, latents, captions, count, generator):
    """[real latents, `count` one-step x0 predictions of the teacher (conditional) from noisy versions at
    uniform random timesteps], all in the VAE's scaled space: what the expert ranks for the LRM."""
    scheduler = teacher.noise_scheduler
    b = latents.shape[0]
    draw_on = generator.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (count * b,), generator=generator, device=draw_on).to(
        latents.device
    )
    noise = torch.randn((count * b, *latents.shape[1:]), generator=generator, device=draw_on).to(latents.device)
    x0 = latents.repeat(count, 1, 1, 1)
    noisy = scheduler.add_noise(x0, noise, t)
    resolution = latents.shape[-1] * teacher.vae_scale_factor
    embeds, extra = teacher.unet_conditions(list(captions) * count, fixed_time_ids(count * b, resolution, resolution))
    unet = teacher.unet
    out = unet(noisy.to(unet.dtype), t, encoder_hidden_states=embeds, **extra).sample.float()
    alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)
    predictions = ops.predicted_x0(out, noisy, t, alphas_cumprod, scheduler.config.prediction_type)
    return [latents, *predictions.chunk(count)]


def expert_preference_loss(lrm, teacher, expert, latents, captions, count, generator):
    """The LRM's pairwise preference loss (KL) and accuracy against the expert's logits of the decoded
    ranking_candidates of `latents` (VAE-scaled): the LRM reads them / scaling_factor, as online."""
    candidates = ranking_candidates(teacher, latents, captions, count, generator)
    with torch.no_grad():
        expert_logits = expert.logits(teacher.decode(torch.cat(candidates)), captions * len(candidates)).float()
    scale = teacher.vae.config.scaling_factor
    return lrm.preference_loss([c / scale for c in candidates], captions, expert_logits.view(len(candidates), -1))


class LRMPretrainer:
    """config: LRMPretrainConfig. Optional: accelerator, teacher (a Teacher in memory), dataset (a map-style
    data set of {"pixel_values", "caption"}) and reward_model (the expert, on the device)."""

    def __init__(
        self,
        config: LRMPretrainConfig,
        accelerator=None,
        teacher: Teacher | None = None,
        dataset=None,
        reward_model=None,
    ):
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from ..reward import load_reward_model
        from .trainer import adamw, make_accelerator, weight_dtype

        check_fresh_start(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)

        self.config = config
        self.accelerator = acc = accelerator or make_accelerator(config)
        set_seed(config.seed)
        self.device = acc.device
        self.teacher = teacher or Teacher.from_pretrained(config.teacher, self.device, weight_dtype(acc))
        self.expert = (
            reward_model
            if reward_model is not None
            else load_reward_model(config.reward_model, config.reward_model_path, device=self.device)
        )
        vit_config = dict(
            latent_size=self.teacher.unet.config.sample_size,
            patch_size=config.vit_patch_size,
            width=config.vit_width,
            layers=config.vit_layers,
            heads=config.vit_heads,
        )
        lrm = make_lrm(
            self.teacher,
            config.lrm_widths,
            config.lrm_embed_dim,
            expert=self.expert,
            image_tower=config.image_tower,
            vit_config=vit_config,
        ).to(self.device)
        groups = weight_decay_groups(lrm, config.adam_weight_decay, config.decay_every_parameter)
        optimizer = adamw(groups, config.learning_rate, config, fused=False)
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * acc.num_processes,
            num_training_steps=config.max_train_steps * acc.num_processes,
        )
        self.lrm, self.optimizer, self.lr_scheduler = acc.prepare(lrm, optimizer, lr_scheduler)
        resolution = config.resolution or self.teacher.default_resolution
        self.loader = ResumableDataLoader(
            dataset if dataset is not None else training_dataset(config, resolution),
            config.train_batch_size,
            shuffle=True,
            seed=config.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            drop_last_batch=True,
            num_workers=config.dataloader_num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.generator = torch.Generator(self.device).manual_seed(config.seed + acc.process_index)
        self.step = 0

    @property
    def model(self):
        return self.accelerator.unwrap_model(self.lrm)

    def _state(self) -> dict:
        return {
            "lrm": self.model,
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "data": self.loader,
            "trainer": {"step": self.step},
            "rng": capture_rng_state({"train": self.generator}),
        }

    def losses(self, batch, generator):
        """(loss, metrics) of one batch: the contrastive loss, plus distill_weight × the expert-preference
        loss over ranking_candidates."""
        config, teacher, lrm = self.config, self.teacher, self.model
        scale = teacher.vae.config.scaling_factor
        captions = list(batch["caption"])
        latents = teacher.encode_images(batch["pixel_values"].to(self.device, non_blocking=True), generator)
        u = lrm.encode_latents(latents / scale)
        v = lrm.encode_text(captions)
        contrastive, retrieval = contrastive_loss(u, v, lrm.logit_scale, captions)
        metrics = {"contrastive_loss": contrastive.detach(), "retrieval_accuracy": retrieval}
        loss = contrastive
        if config.distill_weight > 0:
            distill, accuracy = expert_preference_loss(
                lrm, teacher, self.expert, latents, captions, config.distill_candidates, generator
            )
            loss = loss + config.distill_weight * distill
            metrics.update(distill_loss=distill.detach(), preference_accuracy=accuracy)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def train_step(self, batch) -> dict:
        acc = self.accelerator
        with acc.autocast():
            loss, metrics = self.losses(batch, self.generator)
        acc.backward(loss)
        acc.clip_grad_norm_(self.lrm.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():  # as open_clip's training loop, which trained the official latent CLIP
            self.model.logit_scale.clamp_(0, math.log(100))
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return metrics

    def finish(self) -> None:
        """Close the trackers and the process group: call once, after train()."""
        from .trainer import end_training

        end_training(self.accelerator)

    def train(self) -> dict:
        """Runs to max_train_steps (resuming when asked); returns {"lrm": folder, "logs": logs.csv}."""
        from .trainer import CsvLog

        acc, config = self.accelerator, self.config
        checkpoint = start_from(
            config.resume_from_checkpoint, config.output_dir, config.overwrite_output_dir, acc.is_main_process
        )
        if checkpoint is not None:
            state = self._state()
            state["rng"], state["trainer"] = {"train": self.generator}, None
            info = load_checkpoint(checkpoint, state, map_location=self.device, rank=acc.process_index)
            self.step = int(info["trainer"]["step"])
        log = None
        if acc.is_main_process:
            os.makedirs(config.output_dir, exist_ok=True)
            config.save(os.path.join(config.output_dir, "config.json"))
            log = CsvLog(os.path.join(config.output_dir, "logs.csv"), LOG_COLUMNS, resume_step=self.step)
        batches = self.loader.infinite()
        progress = tqdm(
            total=config.max_train_steps,
            initial=self.step,
            desc="LRM pre-training",
            disable=not (config.progress and acc.is_main_process),
        )
        window, start = [], time.perf_counter()
        while self.step < config.max_train_steps:
            window.append(self.train_step(next(batches)))
            progress.update()
            if self.step % config.logging_steps == 0 or self.step == config.max_train_steps:
                row = {name: torch.stack([m[name] for m in window]).float().mean().item() for name in window[0]}
                row.update(
                    step=self.step,
                    logit_scale=self.model.logit_scale.exp().item(),
                    lr=self.lr_scheduler.get_last_lr()[0],
                    step_time_s=(time.perf_counter() - start) / len(window),
                )
                if log is not None:
                    log.write(row)
                progress.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "preference_accuracy") if k in row})
                window, start = [], time.perf_counter()
            if self.step % config.checkpointing_steps == 0 or self.step == config.max_train_steps:
                save_checkpoint(
                    config.output_dir,
                    self.step,
                    self._state(),
                    keep=config.checkpoints_total_limit,
                    overwrite=True,
                    barrier=acc.wait_for_everyone,
                    rank=acc.process_index,
                    world_size=acc.num_processes,
                )
        progress.close()
        outputs = {"lrm": os.path.join(config.output_dir, "lrm"), "logs": os.path.join(config.output_dir, "logs.csv")}
        if acc.is_main_process:
            write_folder(outputs["lrm"], self.model.save_pretrained)
        acc.wait_for_everyone()
        return outputs


@torch.no_grad()
def preference_accuracy(lrm, teacher, expert, dataset, batch_size=64, batches=4, seed=1234, candidates=2):
    """The LRM's pairwise accuracy against the expert's preferences on ranking_candidates of `dataset` (drawn
    with their own seed): how well it ranks what it will rank online. Returns a float in [0, 1]."""
    device = lrm.logit_scale.device
    generator = torch.Generator(device).manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    hits = []
    for _, batch in zip(range(batches), loader):
        captions = list(batch["caption"])
        latents = teacher.encode_images(batch["pixel_values"].to(device), generator)
        hits.append(expert_preference_loss(lrm, teacher, expert, latents, captions, candidates, generator)[1])
    return torch.stack(hits).mean().item()
