"""The RG-LCD trainer end to end on a tiny randomly initialised SD teacher (no downloads): every reward
mode and LoRA, exact resume, non-finite loss handling, the outputs diffusers and our sampler load, the
config file and command line, and two processes (gloo)."""

import csv
import glob
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import no_tf32
from PIL import Image
from tiny_pipeline import assert_sdxl_sampler_matches_pipeline, save_tiny_pipeline, save_tiny_world, tiny_config

from rglcd_fast import cli
from rglcd_fast.reward import RewardModel
from rglcd_fast.train.config import TrainConfig, make_config
from rglcd_fast.train.models import Teacher
from rglcd_fast.train.trainer import CsvLog, NonFiniteLossError, Trainer


def weights(module):
    """A module's state on the CPU (the trainer's modules live on the accelerator's device)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k  # the trainer's tensors may be on the GPU, a loaded copy not


def assert_lora_loaded(loaded_unet, student):
    """Every adapter of the trained student, with its weights, in a UNet that load_lora_weights filled."""
    from peft.utils import get_peft_model_state_dict

    trained = get_peft_model_state_dict(student)
    loaded = {
        k.replace(".default_0", ""): v
        for k, v in get_peft_model_state_dict(loaded_unet, adapter_name="default_0").items()
    }
    assert loaded.keys() == trained.keys()
    assert_same(loaded, trained)


@pytest.mark.parametrize("mode", ["lrm", "direct", "none"])
def test_every_reward_mode_trains_and_writes_its_outputs(world, tmp_path, mode):
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
    from huggingface_hub import ModelCard

    from rglcd_fast.reward import LatentRewardModel
    from rglcd_fast.sample import LCMSampler

    trainer = Trainer(tiny_config(world, tmp_path, reward_mode=mode))
    before = weights(trainer.accelerator.unwrap_model(trainer.student))
    lrm_before = weights(trainer.guidance.lrm) if mode == "lrm" else None
    outputs = trainer.train()
    after = weights(trainer.accelerator.unwrap_model(trainer.student))
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not change"
    if mode == "lrm":
        lrm_after = weights(trainer.guidance.lrm)
        assert any(not torch.equal(lrm_before[k], lrm_after[k]) for k in lrm_before), "the LRM did not change"

    with open(outputs["logs"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert len({r["loss"] for r in rows}) == len(rows)  # the loss moves from step to step
    assert (rows[0]["reward"] != "") == (mode != "none")
    assert (rows[0]["expert_reward"] != "") == (mode != "none")
    assert (rows[0]["lrm_accuracy"] != "") == (mode == "lrm")
    if mode != "none":  # scale-free: the LRM's cosine in [-1, 1]; the digits expert's probability in [0, 1]
        low = -1.0 if mode == "lrm" else 0.0
        assert all(low <= float(r["reward"]) <= 1.0 and 0.0 <= float(r["expert_reward"]) <= 1.0 for r in rows)
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(tmp_path / "logs") for name in files)
    assert Image.open(outputs["samples"]).size == (4 * 16, 16)  # one row (1 step), the data's first 4 captions
    assert Image.open(outputs["samples"].replace(".png", "-target.png")).size == (4 * 16, 16)  # the EMA target's

    pipe = LatentConsistencyModelPipeline.from_pretrained(outputs["pipeline"])
    assert pipe.unet.config.time_cond_proj_dim == 8
    assert_same(weights(pipe.unet), after)
    assert_same(weights(UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")), after)  # the scripts' name
    card = ModelCard.load(os.path.join(outputs["pipeline"], "README.md"))
    assert "latent-consistency-model" in card.data.tags and "![samples](sample.png)" in card.text
    assert f"| reward_mode | {mode} |" in card.text and f"| teacher | {world[0]} |" in card.text
    assert Image.open(os.path.join(outputs["pipeline"], "sample.png")).size == (4 * 16, 16)
    sampler = LCMSampler.from_pretrained(outputs["pipeline"], device="cpu")
    assert len(sampler(["a digit one"], steps=2)) == 1
    assert ("lrm" in outputs) == (mode == "lrm")
    if mode == "lrm":
        lrm = LatentRewardModel.from_pretrained(outputs["lrm"])
        assert_same(weights(lrm), weights(trainer.guidance.lrm))
        assert lrm.logits(torch.randn(2, 4, 4, 4), ["a digit one", "a digit two"]).shape == (2,)
    assert os.listdir(tmp_path / "checkpoint-4")


class RecordingExpert(RewardModel):
    """An expert whose reward is 10·mean(pixels) and logits 100·mean(pixels); it records its inputs."""

    def __init__(self, logits_use_lrm_scale=False):
        super().__init__()
        self.calls = []
        self.logits_use_lrm_scale = logits_use_lrm_scale

    def reward_and_logits(self, images, prompts):
        self.calls.append((images.clone(), list(prompts)))
        mean = images.mean(dim=(1, 2, 3))
        return mean * 10, mean * 100


def run_lrm_update(world, tmp_path, expert=None, **overrides):
    """One update_lrm of a tiny trainer on 4 samples (n = 2); returns (trainer, inputs, outputs, VAE decode
    batch sizes, the arguments preference_loss received)."""
    trainer = Trainer(tiny_config(world, tmp_path, **{"lrm_batch_size": 2, **overrides}))
    guidance, vae = trainer.guidance, trainer.teacher.vae
    guidance.expert = expert if expert is not None else RecordingExpert()
    decoded, decode = [], vae.decode
    vae.decode = lambda z, *a, **k: (decoded.append(z.shape[0]), decode(z, *a, **k))[1]
    seen, preference_loss = [], guidance.lrm.preference_loss
    guidance.lrm.preference_loss = lambda *a: (seen.append(a), preference_loss(*a))[1]
    g, device = torch.Generator().manual_seed(0), trainer.accelerator.device
    images = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1).to(device)
    latents = trainer.teacher.encode_images(images, g)
    pred, target = (torch.randn(latents.shape, generator=g).to(device) for _ in range(2))
    prompts = ["a digit one", "a digit two", "a digit three", "a digit zero"]
    before = weights(guidance.lrm)
    out = guidance.update_lrm(pred, target, latents, prompts, images=images)
    assert any(not torch.equal(before[k], v) for k, v in weights(guidance.lrm).items()), "the LRM did not step"
    return trainer, (images, latents, pred, target, prompts), out, decoded, seen[0]


def test_lrm_update_decodes_every_candidate_the_real_one_too(world, tmp_path):
    """The expert labels what the LRM reads: the prediction, the target and the real latents are all decoded
    (n samples a VAE call by default, vae_decode_batch_size when set) and scored in one expert call with the
    prompts repeated; the logged expert reward is the prediction's."""
    trainer, (images, latents, pred, target, prompts), (loss, accuracy, expert_reward), decoded, _ = run_lrm_update(
        world, tmp_path
    )
    assert torch.isfinite(loss) and 0 <= float(accuracy) <= 1
    assert decoded == [2, 2, 2]  # prediction, target, real: n = 2 samples each
    ((scored, scored_prompts),) = trainer.guidance.expert.calls  # one expert call
    assert scored_prompts == prompts[:2] * 3 and scored.shape == (6, 3, 16, 16)
    # a VAE call per candidate, as the update makes them (on CUDA a batch of another size may take other kernels)
    with torch.no_grad():
        expected = torch.cat([trainer.teacher.decode(c[:2]) for c in (pred, target, latents)])
    torch.testing.assert_close(scored, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(expert_reward, expected[:2].mean() * 10, atol=1e-5, rtol=1e-4)
    assert run_lrm_update(world, tmp_path / "b", vae_decode_batch_size=6)[3] == [6]  # all in one call


def test_lrm_update_takes_at_most_the_batch_and_the_runs_adam_settings(world, tmp_path):
    """As the official randperm(train_batch_size)[:rm_batch_size]: an lrm_batch_size above the batch takes the
    whole batch (the default 16 against a batch of 4 here); the LRM's AdamW has the run's betas and epsilon."""
    trainer, *_, decoded, _ = run_lrm_update(
        world, tmp_path, lrm_batch_size=16, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6
    )
    assert decoded == [4, 4, 4]
    ((scored, _),) = trainer.guidance.expert.calls
    assert scored.shape[0] == 12
    (group,) = trainer.guidance.lrm_optimizer.param_groups
    assert (group["betas"], group["eps"]) == ((0.8, 0.95), 1e-6)


def test_lrm_update_scores_real_pixels_when_asked(world, tmp_path):
    trainer, (images, *_), _, decoded, _ = run_lrm_update(world, tmp_path, lrm_score_real_pixels=True)
    assert decoded == [2, 2]  # the real candidate is not decoded
    ((scored, _),) = trainer.guidance.expert.calls
    torch.testing.assert_close(scored[4:], (images[:2] + 1) / 2)  # the real images themselves


@pytest.mark.parametrize(
    "settings, real_index, smooth",
    [
        (dict(lrm_loss="kl"), None, False),
        (dict(lrm_loss="ce"), 2, False),
        (dict(lrm_loss="ce", lrm_ce_real_wins=False), None, False),
        (dict(lrm_loss="kl", smooth_gt_label=True), 2, True),
    ],
)
def test_lrm_update_passes_the_loss_variant(world, tmp_path, settings, real_index, smooth):
    """The real candidate is the third (index 2); ce labels its pairs "real wins" unless told otherwise."""
    *_, args = run_lrm_update(world, tmp_path, **settings)
    assert args[3:] == (settings["lrm_loss"], real_index, smooth)


def test_lrm_update_scales_imagereward_logits_by_the_lrm_scale(world, tmp_path):
    """As the official script: an ImageReward-like expert's logits × the LRM's exp(logit_scale)."""
    expert = RecordingExpert(logits_use_lrm_scale=True)
    trainer, _, _, _, args = run_lrm_update(world, tmp_path, expert=expert)
    ((scored, _),) = expert.calls
    scale = math.exp(math.log(1 / 0.07))  # the LRM's initial logit scale (the update happens after the call)
    torch.testing.assert_close(args[2], (scored.mean(dim=(1, 2, 3)) * 100 * scale).view(3, 2), rtol=1e-5, atol=1e-4)


def test_student_master_weights_are_the_full_precision_ones(world, tmp_path):
    """With mixed precision the teacher runs in bf16, but the student's float32 weights come from the file."""
    from accelerate.state import AcceleratorState
    from diffusers import UNet2DConditionModel

    AcceleratorState._reset_state()  # accelerate keeps one mixed-precision setting a process
    try:
        trainer = Trainer(tiny_config(world, tmp_path, reward_mode="none", mixed_precision="bf16"))
        assert trainer.teacher.unet.dtype == torch.bfloat16
        student = weights(trainer.accelerator.unwrap_model(trainer.student))
    finally:
        AcceleratorState._reset_state()
    full = weights(UNet2DConditionModel.from_pretrained(world[0], subfolder="unet"))
    assert all(v.dtype == torch.float32 for v in student.values())
    for k, v in full.items():
        assert torch.equal(student[k], v), k


def test_validation_grid_has_a_row_per_step_count_and_a_column_per_prompt(world, tmp_path):
    trainer = Trainer(
        tiny_config(
            world,
            tmp_path,
            max_train_steps=1,
            validation_lcm_steps=(1, 2, 4),
            validation_prompts=["a digit one", "a digit two"],
        )
    )
    path = trainer.sample_grid(str(tmp_path / "grid.png"))
    assert Image.open(path).size == (2 * 16, 3 * 16)


def test_lora_student_writes_weights_diffusers_loads(world, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from rglcd_fast.sample import LCMSampler

    trainer = Trainer(tiny_config(world, tmp_path, use_lora=True))
    assert trainer.target is None  # LCM-LoRA: the student is its own target
    outputs = trainer.train()
    pipe = StableDiffusionPipeline.from_pretrained(outputs["pipeline"], safety_checker=None)
    assert_same(weights(pipe.unet), weights(UNet2DConditionModel.from_pretrained(world[0], subfolder="unet")))
    pipe.load_lora_weights(outputs["lora"])
    assert_lora_loaded(pipe.unet, trainer.student)
    pipe.load_lora_weights(str(tmp_path / "unet_lora"), adapter_name="as_the_script_names_it")
    sampler = LCMSampler.from_pretrained(outputs["pipeline"], lora=outputs["lora"], device="cpu")
    (image,) = sampler(["a digit one"], steps=1)
    for folder in (outputs["pipeline"], outputs["lora"]):
        card = open(os.path.join(folder, "README.md")).read()
        assert card.startswith("---") and "LCM-LoRA (rank 2)" in card and "| use_lora | True |" in card
    # the pipeline card's own command and snippet run as written: they load the adapters
    card = open(os.path.join(outputs["pipeline"], "README.md")).read()
    command = card.split("or `rglcd-fast ")[1].split(" --prompt")[0].split()
    grid = str(tmp_path / "card.png")
    assert cli.main([*command, "--prompt", "a digit one", "--steps", "1", "--out", grid, "--quiet"]) == 0
    assert Image.open(grid).size == image.size  # one prompt, one image
    snippet = card.split("```python\n")[1].split("```")[0].replace("num_inference_steps=4", "num_inference_steps=1")
    scope = {"PROMPT": "a digit one"}
    exec(snippet, scope)
    assert_lora_loaded(scope["pipe"].unet, trainer.student)


@pytest.mark.parametrize(
    "mode, mixed_precision",
    [
        ("lrm", "no"),
        ("none", "no"),
        # fp16 brings accelerate's GradScaler, whose scale and growth count the checkpoint must carry
        pytest.param("lrm", "fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA")),
    ],
)
def test_resume_matches_an_uninterrupted_run_exactly(world, tmp_path, mode, mixed_precision):
    settings = dict(reward_mode=mode, gradient_accumulation_steps=2, mixed_precision=mixed_precision)
    straight = Trainer(tiny_config(world, tmp_path / "straight", **settings))
    straight.train()

    Trainer(tiny_config(world, tmp_path / "resumed", max_train_steps=2, **settings)).train()
    resumed = Trainer(tiny_config(world, tmp_path / "resumed", resume_from_checkpoint="latest", **settings))
    resumed.train()
    assert resumed.step == 4
    if mixed_precision == "fp16":
        assert straight.accelerator.scaler.state_dict() == resumed.accelerator.scaler.state_dict()
    for part in ("student", "target"):
        assert_same(
            weights(
                getattr(straight, part) if part == "target" else straight.accelerator.unwrap_model(straight.student)
            ),
            weights(getattr(resumed, part) if part == "target" else resumed.accelerator.unwrap_model(resumed.student)),
        )
    if mode == "lrm":
        assert_same(weights(straight.guidance.lrm), weights(resumed.guidance.lrm))
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())
    rng_files = [torch.load(tmp_path / run / "checkpoint-4" / "rng_rank0.pt") for run in ("straight", "resumed")]
    assert torch.equal(rng_files[0]["torch"], rng_files[1]["torch"])  # the global RNG too
    with open(tmp_path / "straight" / "logs.csv") as a, open(tmp_path / "resumed" / "logs.csv") as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_a_fresh_run_beside_an_earlier_runs_checkpoints_is_refused_or_clears_them(world, tmp_path):
    """A fresh run would overwrite checkpoint-2 and keep the earlier run's checkpoint-4, which a later
    `latest` would resume: refused before any model is built, or (overwrite_output_dir) cleared first."""
    Trainer(tiny_config(world, tmp_path, reward_mode="none")).train()
    with pytest.raises(ValueError, match=r"output_dir: .* earlier run \(checkpoint-2, checkpoint-4\): continue"):
        Trainer(tiny_config(world, tmp_path, reward_mode="none", max_train_steps=2))
    fresh = tiny_config(world, tmp_path, reward_mode="none", max_train_steps=2, overwrite_output_dir=True)
    Trainer(fresh).train()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-2"]


@pytest.mark.parametrize(
    "changed, line",
    [
        (dict(use_lora=True), "its 'student' does not fit this run's"),
        (dict(time_cond_proj_dim=16), "its 'student' does not fit this run's"),
        (dict(reward_mode="lrm"), "has no 'lrm'"),
    ],
)
def test_resuming_with_other_model_settings_names_what_does_not_fit(world, tmp_path, changed, line):
    Trainer(tiny_config(world, tmp_path, reward_mode="none", max_train_steps=2)).train()
    resumed = Trainer(
        tiny_config(world, tmp_path, **{"reward_mode": "none", **changed, "resume_from_checkpoint": "latest"})
    )
    with pytest.raises(
        ValueError, match=f"checkpoint .*checkpoint-2.*{line}.*saved by a run with other settings"
    ) as error:
        resumed.train()
    assert len(str(error.value)) < 600  # a line, not torch's list of every key


def test_logs_of_a_resumed_run_drop_later_rows_and_a_torn_line(tmp_path):
    """A run killed mid-write leaves a torn last line ("1" of "12,..." looks like step 1): only whole lines
    up to the checkpoint's step are kept."""
    path = tmp_path / "logs.csv"
    path.write_text("step,loss\n1,0.5\n2,0.25\n3,0.125\n1")
    log = CsvLog(str(path), ("step", "loss"), resume_step=2)
    log.write({"step": 3, "loss": 0.75})
    assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.25", "3,0.75"]


class Interrupted(Exception):
    """A kill, as the tests stand it in."""


def interrupt_at(trainer, step):
    """trainer.train() stops (as a killed process) when step `step` begins."""
    train_step = trainer.train_step

    def stopping(batches):
        if trainer.step + 1 == step:
            raise Interrupted
        return train_step(batches)

    trainer.train_step = stopping


def poison(trainer, steps):
    """A NaN loss at the given steps."""
    distill = trainer.distill

    def poisoned(*args, **kwargs):
        out = distill(*args, **kwargs)
        if trainer.step + 1 in steps:
            out.loss = out.loss * float("nan")
        return out

    trainer.distill = poisoned


TIMINGS = ("step_time_s", "images_per_s")  # wall-clock columns


def logged(output_dir):
    """logs.csv's rows without the wall-clock columns."""
    with open(output_dir / "logs.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def board_scalars(output_dir) -> dict:
    """TensorBoard's scalars as TensorBoard reads them (purged events hidden), the wall-clock ones left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {os.path.dirname(p) for p in glob.glob(str(output_dir / "logs" / "*" / "events.*"))}  # not hparams
    board = EventAccumulator(events)
    board.Reload()
    tags = [tag for tag in board.Tags()["scalars"] if tag not in TIMINGS]
    return {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in tags}


@pytest.mark.parametrize("logging_steps,killed_at", [(3, 3), (1, 4)])
def test_a_resumed_runs_logs_equal_an_uninterrupted_runs(world, tmp_path, logging_steps, killed_at):
    """Checkpoints every 2 steps. Logging every 3, a row spans the checkpoint: it averages the steps before it
    too. Logging every step, killed after step 3 was logged: TensorBoard shows step 3 once."""
    settings = dict(reward_mode="lrm", logging_steps=logging_steps, max_train_steps=6)
    Trainer(tiny_config(world, tmp_path / "straight", **settings)).train()
    killed = Trainer(tiny_config(world, tmp_path / "resumed", **settings))
    interrupt_at(killed, killed_at)
    with pytest.raises(Interrupted):
        killed.train()
    Trainer(tiny_config(world, tmp_path / "resumed", resume_from_checkpoint="latest", **settings)).train()
    rows = logged(tmp_path / "straight")
    assert [int(row["step"]) for row in rows] == list(range(logging_steps, 7, logging_steps))
    assert logged(tmp_path / "resumed") == rows
    assert board_scalars(tmp_path / "resumed") == board_scalars(tmp_path / "straight")


def test_a_resumed_run_stops_within_a_streak_of_nonfinite_losses_as_an_uninterrupted_one(world, tmp_path):
    settings = dict(reward_mode="none", max_nonfinite_steps=2, max_train_steps=6)
    stop = r"2 non-finite losses in a row \(by step 3\)"
    straight = Trainer(tiny_config(world, tmp_path / "straight", **settings))
    poison(straight, {2, 3})
    with pytest.raises(NonFiniteLossError, match=stop):
        straight.train()
    killed = Trainer(tiny_config(world, tmp_path / "resumed", **settings))
    poison(killed, {2})
    interrupt_at(killed, 3)
    with pytest.raises(Interrupted):
        killed.train()
    resumed = Trainer(tiny_config(world, tmp_path / "resumed", resume_from_checkpoint="latest", **settings))
    poison(resumed, {3})
    with pytest.raises(NonFiniteLossError, match=stop):
        resumed.train()


def test_a_run_killed_while_drawing_a_validation_grid_draws_it_again(world, tmp_path):
    settings = dict(validation_steps=2, max_train_steps=4)
    killed = Trainer(tiny_config(world, tmp_path, **settings))

    def killed_while_sampling(path=None):
        raise Interrupted

    killed.sample_grid = killed_while_sampling
    with pytest.raises(Interrupted):
        killed.train()
    Trainer(tiny_config(world, tmp_path, resume_from_checkpoint="latest", **settings)).train()
    expected = [f"step-00000{step}{kind}.png" for step in (2, 4) for kind in ("", "-target")]
    assert sorted(os.listdir(tmp_path / "samples")) == sorted(expected)


def test_compiled_training_matches_eager(world, tmp_path):
    """compile_unets: the compiled UNets, student blocks and VAE encoder (with the direct reward also the VAE
    decoder and the expert's image encoder, which the reward's gradient goes through) give eager's losses and
    weights up to float32 rounding; "student_blocks" everywhere, and on CUDA "all" (the whole student's
    backward compiled): torch 2.13's CPU inductor backward of the whole UNet2DConditionModel gives wrong
    gradients (scripts/inductor_cpu_unet_grad.py reproduces it), so "all" is refused on the CPU. AdamW's epsilon
    is large here so that its update is smooth in the gradient (with a small one the first update is lr·sign(g),
    and rounding flips the sign of tiny g)."""
    compiled = ("student_blocks", "all") if torch.cuda.is_available() else ("student_blocks",)
    if "all" not in compiled:
        with pytest.raises(ValueError, match="compile_unets"):
            Trainer(tiny_config(world, tmp_path / "all", compile_unets="all"))
    runs = {}
    with no_tf32():
        for mode in ("none", *compiled):
            for reward in ("none", "direct"):  # direct: the compiled VAE decoder's gradient reaches the student
                out = tmp_path / f"{mode}_{reward}"
                trainer = Trainer(
                    tiny_config(world, out, reward_mode=reward, max_train_steps=2, compile_unets=mode, adam_epsilon=1.0)
                )
                if reward != "none":  # the expert's image encoders are compiled with the decoder
                    encoders = trainer.guidance.expert.image_encoders()
                    assert all((m._compiled_call_impl is not None) == (mode != "none") for m in encoders)
                trainer.train()
                with open(out / "logs.csv") as f:
                    losses = torch.tensor([float(r["loss"]) for r in csv.DictReader(f)])
                runs[mode, reward] = losses, weights(trainer.accelerator.unwrap_model(trainer.student))
    for (mode, reward), (losses, student) in runs.items():
        eager_losses, eager_student = runs["none", reward]
        torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-6, msg=f"{mode}, reward {reward}")
        for k, v in eager_student.items():
            torch.testing.assert_close(student[k], v, rtol=1e-4, atol=1e-5, msg=f"{mode}, reward {reward}: {k}")


def test_a_nonfinite_loss_skips_the_update_and_is_counted(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, reward_mode="none", max_train_steps=3))
    step, calls = trainer.distill, []

    def poisoned(*args, **kwargs):
        out = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    trainer.distill = poisoned
    trainer.train()
    assert trainer.nonfinite.total == 1
    with open(tmp_path / "logs.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["loss"] == "nan" and [int(r["nonfinite_skipped"]) for r in rows] == [0, 1, 1]


def test_nonfinite_losses_in_a_row_stop_the_run_without_touching_the_weights(world, tmp_path):
    trainer = Trainer(tiny_config(world, tmp_path, max_nonfinite_steps=2))
    poison(trainer, steps=range(1, 5))
    before = weights(trainer.accelerator.unwrap_model(trainer.student))
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        trainer.train()
    assert_same(before, weights(trainer.accelerator.unwrap_model(trainer.student)))


def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_previous_one(world, tmp_path, monkeypatch):
    import errno

    import rglcd_fast.train.checkpoint as ckpt
    from rglcd_fast.train.trainer import CheckpointWriteError

    trainer = Trainer(tiny_config(world, tmp_path, max_train_steps=4, checkpointing_steps=2))
    write = ckpt._write_entry

    def full_at_step_4(folder, name, obj, kind):
        if "-4-" in os.path.basename(folder):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(folder, name, obj, kind)

    monkeypatch.setattr(ckpt, "_write_entry", full_at_step_4)
    with pytest.raises(
        CheckpointWriteError,
        match=r"checkpoint-4 could not be written .*No space left on device.*"
        r"checkpoint-2 is intact.*--resume-from-checkpoint latest",
    ):
        trainer.train()
    assert ckpt.latest_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), "checkpoint-2")
    monkeypatch.undo()
    resumed = Trainer(
        tiny_config(world, tmp_path, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest")
    )
    resumed.train()
    assert resumed.step == 4


def test_config_file_flags_and_errors(tmp_path):
    from rglcd_fast.cli import build_parser
    from rglcd_fast.train.config import DIGITS_PRESET, config_from_args

    path = tmp_path / "run.yaml"
    path.write_text("max_train_steps: 7\nreward_mode: direct\nlrm_widths: [16, 32]\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(path),
            "--reward-mode",
            "none",
            "--resume-from-checkpoint",
            "latest",
            "--use-lora",
            "true",
            "--compile-unets",
            "frozen",
            "--compile-memory-budget",
            "0.5",
        ]
    )
    config = config_from_args(args)
    assert (config.max_train_steps, config.reward_mode, config.lrm_widths) == (7, "none", (16, 32))
    assert config.use_lora and config.learning_rate == 1e-4 and config.resume_from_checkpoint == "latest"
    assert (config.compile_unets, config.compile_memory_budget) == ("frozen", 0.5)
    assert make_config().train_batch_size == DIGITS_PRESET["train_batch_size"]  # the digits world preset
    assert make_config(teacher="/some/sd").train_batch_size == TrainConfig.train_batch_size
    assert make_config(teacher="/some/sd").learning_rate == 1e-6  # the LCD script's full-student default
    with pytest.raises(ValueError, match="unknown setting.*nope"):
        make_config(nope=1)
    with pytest.raises(ValueError, match="reward_mode"):
        make_config(reward_mode="pixels")
    with pytest.raises(ValueError, match="compile_unets"):
        make_config(compile_unets="true")
    with pytest.raises(ValueError, match="compile_memory_budget"):
        make_config(compile_unets="all", compile_memory_budget=0.0)
    with pytest.raises(FileNotFoundError, match="config"):
        make_config(str(tmp_path / "missing.yaml"))


def test_bad_teacher_and_data_are_named(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher"):
        Trainer(tiny_config(world, tmp_path, teacher=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="data"):
        Trainer(tiny_config(world, tmp_path, data=None))


def test_an_sdxl_teacher_encodes_prompts_as_the_sdxl_pipeline(tmp_path):
    """Both encoders' penultimate states side by side and the second's pooled projection, as
    StableDiffusionXLPipeline.encode_prompt; an SDXL folder without its second encoder is named."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    folder = save_tiny_pipeline(str(tmp_path / "xl"), lcm=False, xl=True)
    teacher = Teacher.from_pretrained(folder, "cpu", torch.float32)
    assert (
        teacher.is_sdxl
        and not Teacher.from_pretrained(save_tiny_pipeline(str(tmp_path / "sd")), "cpu", torch.float32).is_sdxl
    )
    prompts = ["a digit one", "a digit two"]
    embeds, pooled = teacher.encode_prompts_sdxl(prompts)
    theirs, _, theirs_pooled, _ = StableDiffusionXLPipeline.from_pretrained(folder).encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert torch.equal(embeds, theirs) and torch.equal(pooled, theirs_pooled)
    # the SDXL scripts' VAE rule: its own VAE in float32 (it overflows in float16), another in the weights' dtype
    assert Teacher.from_pretrained(folder, "cpu", torch.bfloat16).vae.dtype == torch.float32
    other_vae = Teacher.from_pretrained(folder, "cpu", torch.bfloat16, vae=os.path.join(folder, "vae"))
    assert other_vae.vae.dtype == torch.bfloat16 and other_vae.vae_folder == os.path.join(folder, "vae")
    shutil.rmtree(tmp_path / "xl" / "text_encoder_2")
    with pytest.raises(ValueError, match="teacher: .* Stable Diffusion XL folder .* without text_encoder_2"):
        Teacher.from_pretrained(folder, "cpu", torch.float32)


@pytest.mark.parametrize("teacher_scheduler", ["PNDMScheduler", "DDPMScheduler"])  # SD 1.5's; the digits world's
def test_the_lcm_scheduler_has_the_teachers_schedule_and_no_leftover_settings(tmp_path, teacher_scheduler):
    """The saved pipeline's scheduler is what LCMScheduler.from_config makes of the teacher's (defaults included),
    less the teacher class's own settings (skip_prk_steps, variance_type), which made diffusers warn on every load."""
    import diffusers
    from diffusers import LCMScheduler

    from rglcd_fast.schedulers import FusedLCMScheduler

    folder = save_tiny_pipeline(str(tmp_path / "sd"))
    own = {"PNDMScheduler": dict(skip_prk_steps=True), "DDPMScheduler": dict(variance_type="fixed_small")}
    schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    getattr(diffusers, teacher_scheduler)(**schedule, **own[teacher_scheduler]).save_pretrained(f"{folder}/scheduler")
    teacher = Teacher.from_pretrained(folder, "cpu", torch.float32)
    scheduler = teacher.lcm_scheduler()
    scheduler.save_pretrained(tmp_path / "lcm")
    with open(tmp_path / "lcm" / "scheduler_config.json") as f:
        saved = json.load(f)
    theirs = LCMScheduler.from_config(teacher.noise_scheduler.config)
    assert set(own[teacher_scheduler]).isdisjoint(saved) and set(own[teacher_scheduler]) <= set(theirs.config)
    assert {k: v for k, v in theirs.config.items() if k not in own[teacher_scheduler]} == dict(scheduler.config)
    assert torch.equal(scheduler.alphas_cumprod, theirs.alphas_cumprod)
    assert isinstance(teacher.lcm_scheduler(FusedLCMScheduler), FusedLCMScheduler)


@pytest.fixture(scope="module")
def xl_world(tmp_path_factory):
    return save_tiny_world(tmp_path_factory.mktemp("xl_world"), xl=True)


def script_sdxl_conditions(teacher, prompts, original_sizes, crop_top_lefts, resolution):
    """train_lcm_distill_lora_sdxl.py's compute_embeddings (encode_prompt, compute_time_ids) and its
    unconditional branch: (prompt_embeds, uncond_embeds, added conditions, uncond added conditions)."""
    embeds_list = []
    for tokenizer, text_encoder in (
        (teacher.tokenizer, teacher.text_encoder),
        (teacher.tokenizer_2, teacher.text_encoder_2),
    ):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        pooled = out[0]
        embeds_list.append(out.hidden_states[-2])
    embeds = torch.concat(embeds_list, dim=-1)
    time_ids = torch.cat(
        [torch.tensor([list(s + c + (resolution, resolution))]) for s, c in zip(original_sizes, crop_top_lefts)]
    ).to(embeds.device, embeds.dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    return embeds, torch.zeros_like(embeds), added, dict(added, text_embeds=torch.zeros_like(pooled))


def test_sdxl_conditions_are_the_sdxl_scripts(xl_world, tmp_path):
    """The trainer's SDXL conditioning of a batch equals the SDXL LCD-LoRA script's: both encoders'
    penultimate states and the pooled projection, the time ids from each image's original size and crop corner
    (or the fixed ones), zero embeddings with the same ids for the unconditional branch."""
    trainer = Trainer(tiny_config(xl_world, tmp_path, use_lora=True, reward_mode="none"))
    assert trainer.config.w_min == 3.0  # the SDXL scripts' default
    sizes, crops = [(20, 40), (30, 20)], [(0, 8), (4, 0)]
    batch = {
        "caption": ["a digit one", "a digit two"],
        "original_size": torch.tensor(sizes),
        "crop_top_left": torch.tensor(crops),
    }
    embeds, uncond, added = trainer._conditions(batch)
    expected = script_sdxl_conditions(trainer.teacher, batch["caption"], sizes, crops, trainer.resolution)
    ours = (embeds, uncond, added["added_cond_kwargs"], added["uncond_added_cond_kwargs"])
    for a, b in zip(ours, expected):
        assert_same(a, b) if isinstance(a, dict) else torch.testing.assert_close(a, b, rtol=0, atol=0)
    trainer.config.use_fix_crop_and_size = True
    R = trainer.resolution
    fixed = trainer._conditions(batch)[2]["added_cond_kwargs"]["time_ids"]
    assert fixed.tolist() == [[R, R, 0, 0, R, R]] * 2


@pytest.mark.parametrize("use_lora, mode", [(True, "lrm"), (False, "direct")], ids=["lora-lrm", "full-direct"])
def test_sdxl_teacher_trains_and_its_outputs_sample_in_diffusers(xl_world, tmp_path, use_lora, mode):
    """RG-LCD from an SDXL teacher end to end, both reward modes; pipeline/ is an SDXL pipeline folder, the LoRA
    loads with StableDiffusionXLPipeline.load_lora_weights, and our sampler's latents equal diffusers' SDXL
    pipeline's with LCMScheduler for the same seed (the full student with its guidance embedding)."""
    trainer = Trainer(tiny_config(xl_world, tmp_path, use_lora=use_lora, reward_mode=mode))
    outputs = trainer.train()
    with open(outputs["logs"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["reward"])) for r in rows)
    assert all(bool(r["lrm_loss"]) == (mode == "lrm") for r in rows)
    with open(os.path.join(outputs["pipeline"], "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "StableDiffusionXLPipeline"
    if use_lora:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(outputs["pipeline"])
        pipe.load_lora_weights(outputs["lora"])
        assert_lora_loaded(pipe.unet, trainer.student)
    assert_sdxl_sampler_matches_pipeline(outputs["pipeline"], outputs.get("lora"), 1.0 if use_lora else 8.0)


def launch_two_ranks(logs, *command):
    """python -m torch.distributed.run, two processes: gloo on CPU, NCCL where two GPUs exist (deterministic
    kernels, for bitwise compares), an explicit rendezvous on a free local port (not --standalone), each rank's
    output kept apart in logs/ and shown on a failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if torch.cuda.device_count() < 2:  # two ranks cannot share one GPU under NCCL
        env["CUDA_VISIBLE_DEVICES"] = ""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--log-dir", str(logs)]
    done = subprocess.run([*cmd, "--redirects", "3", *command], env=env, capture_output=True, text=True, timeout=600)
    ranks = "".join(
        f"\n--- {path.relative_to(logs)}\n{path.read_text()[-3000:]}" for path in sorted(logs.rglob("*.log"))
    )
    assert done.returncode == 0, f"exit {done.returncode}\n" + done.stderr[-3000:] + ranks


def checkpoint_files(folder):
    """Every value of a checkpoint's model and optimiser files (tensors, the optimiser's settings), by file and
    key."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            out.update({f"{name}:{k}": v for k, v in load_file(path).items()})
        elif name.endswith(".pt") and not name.startswith("rng"):
            flat = torch.utils._pytree.tree_flatten_with_path(torch.load(path))[0]
            out.update({f"{name}:{torch.utils._pytree.keystr(k)}": v for k, v in flat})
    return out


def test_the_cli_trains_an_sdxl_lcm_lora(xl_world, tmp_path):
    """`rglcd-fast train --teacher <tiny SDXL> --use-lora true` (the tiny sizes from a config file)."""
    from rglcd_fast import cli

    tiny_config(xl_world, tmp_path / "unused").save(str(tmp_path / "tiny.json"))
    teacher, data = xl_world
    flags = ["--config", str(tmp_path / "tiny.json"), "--teacher", teacher, "--data", data, "--use-lora", "true"]
    assert cli.main(["train", *flags, "--output-dir", str(tmp_path / "out")]) == 0
    assert os.path.isfile(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors")
    with open(tmp_path / "out" / "pipeline" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusionXLPipeline"


@pytest.mark.parametrize("mode", ["none", "lrm"])
def test_the_decoder_upsamplers_are_folded_where_a_reward_decodes_on_cuda(world, tmp_path, mode):
    from diffusers.models.upsampling import Upsample2D

    trainer = Trainer(tiny_config(world, tmp_path, reward_mode=mode))
    upsamplers = [m for m in trainer.teacher.vae.decoder.modules() if isinstance(m, Upsample2D)]
    assert upsamplers
    folded = mode != "none" and trainer.device.type == "cuda"
    assert all(("forward" in m.__dict__) == folded for m in upsamplers)  # fold_upsamplers' instance forward


def test_fsdp_needs_several_processes(world, tmp_path):
    with pytest.raises(ValueError, match="fsdp: shards over several processes"):
        Trainer(tiny_config(world, tmp_path, fsdp=True))


def test_fsdp_student_on_two_ranks_resumes_exactly(xl_world, tmp_path):
    """A full SDXL student, its target and the teacher sharded with FSDP2 over two CPU ranks (gloo), through the
    CLI: 2 steps, a checkpoint, resumed to 4, equals an uninterrupted 4-step run bit for bit (student, EMA target,
    AdamW state, LRM, logs); and it trains what DDP trains (the same 4 steps unsharded: equal within float32
    reduction order)."""
    config = tiny_config(
        xl_world, tmp_path / "unused", train_batch_size=2, lrm_batch_size=2, fsdp=True, fsdp_shard_teacher=True
    )
    config.save(str(tmp_path / "config.json"))

    def train(out, steps, *extra):
        cli = ["-m", "rglcd_fast.cli", "train", "--config", str(tmp_path / "config.json")]
        launch_two_ranks(tmp_path / f"logs-{out}-{steps}", *cli, "--output-dir", str(tmp_path / out),
                         "--max-train-steps", str(steps), *extra)  # fmt: skip
        return tmp_path / out

    straight = train("straight", 4)
    train("resumed", 2)
    resumed = train("resumed", 4, "--resume-from-checkpoint", "latest")
    ours, theirs = checkpoint_files(resumed / "checkpoint-4"), checkpoint_files(straight / "checkpoint-4")
    assert ours.keys() == theirs.keys() and any(k.startswith("optimizer.pt:") for k in ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]) if isinstance(ours[k], torch.Tensor) else ours[k] == theirs[k], k
    assert logged(resumed) == logged(straight)
    ddp = checkpoint_files(train("ddp", 4, "--fsdp", "false", "--fsdp-shard-teacher", "false") / "checkpoint-4")
    for k in ours:
        if k.startswith(("student.", "target.")):
            torch.testing.assert_close(ours[k], ddp[k], rtol=1e-4, atol=1e-6, msg=k)
    from diffusers import UNet2DConditionModel

    saved = UNet2DConditionModel.from_pretrained(straight / "pipeline" / "unet")
    assert_same(weights(saved), {k.split(":", 1)[1]: v for k, v in theirs.items() if k.startswith("student.")})


TWO_RANKS = """
import faulthandler, sys, torch
# a native abort prints every thread's native stack (c10's fatal-signal handler) and Python stack to the log
torch._C._set_print_stack_traces_on_fatal_signal(True)
faulthandler.enable(all_threads=True)
sys.path.insert(0, {tests!r})
from test_train_trainer import weights
from tiny_pipeline import tiny_config
from rglcd_fast.train.trainer import Trainer
torch.use_deterministic_algorithms(True)
resume = None if sys.argv[1] == "none" else sys.argv[1]
config = tiny_config(({teacher!r}, {data!r}), {out!r}, max_train_steps=int(sys.argv[2]), resume_from_checkpoint=resume)
trainer = Trainer(config)
trainer.train()
state = weights(trainer.accelerator.unwrap_model(trainer.student))
flat = torch.cat([v.flatten().float() for v in state.values()])
gathered = trainer.accelerator.gather(flat[None])
assert torch.equal(gathered[0], gathered[1]), "ranks out of sync"
lrm = torch.cat([p.detach().flatten() for p in trainer.guidance.lrm.parameters()])
assert torch.equal(*trainer.accelerator.gather(lrm[None])), "LRM out of sync"
if trainer.accelerator.is_main_process:
    torch.save(state, {out!r} + "/final-" + sys.argv[2] + ("-resumed" if resume else "") + ".pt")
trainer.finish()  # a barrier, then the process group destroyed: exiting with it alive can abort in gloo's teardown
"""


def test_two_processes_stay_in_sync_and_resume(world, tmp_path):
    """Two ranks: gloo on CPU; NCCL where two GPUs exist (deterministic kernels, for the bitwise compare)."""
    teacher, data = world
    script = tmp_path / "two_ranks.py"
    script.write_text(
        TWO_RANKS.format(tests=os.path.dirname(__file__), teacher=teacher, data=data, out=str(tmp_path / "out"))
    )

    def launch(*args):
        launch_two_ranks(tmp_path / f"ranks-{'-'.join(args)}", str(script), *args)

    launch("none", "2")
    assert sorted(os.listdir(tmp_path / "out" / "checkpoint-2")).count("rng_rank1.pt") == 1
    launch("latest", "4")
    final = torch.load(tmp_path / "out" / "final-4-resumed.pt")
    launch_dir = tmp_path / "straight"
    script.write_text(
        TWO_RANKS.format(tests=os.path.dirname(__file__), teacher=teacher, data=data, out=str(launch_dir))
    )
    launch("none", "4")
    assert_same(torch.load(launch_dir / "final-4.pt"), final)
