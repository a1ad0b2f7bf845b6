"""`rglcd-fast train` as diffusers' and RG-LCD's users call it: the official scripts' command lines (their
READMEs', with local paths) parse to the settings the scripts would train with; flags we don't take say so;
no abbreviations; bare boolean switches; accelerate's mixed precision and trackers are respected."""

import shlex

import pytest
import torch
from tiny_pipeline import tiny_config

from rglcd_fast.cli import build_parser
from rglcd_fast.train.config import config_from_args

# diffusers' examples/consistency_distillation/README.md: the full-model and the LoRA command (their
# PROGRAM), with local paths for the model, the output and the shards
DIFFUSERS_FULL = """train_lcm_distill_sd_wds.py \
    --pretrained_teacher_model=/models/sd15 \
    --output_dir=/runs/lcm \
    --mixed_precision=fp16 \
    --resolution=512 \
    --learning_rate=1e-6 --loss_type="huber" --ema_decay=0.95 --adam_weight_decay=0.0 \
    --max_train_steps=1000 \
    --max_train_samples=4000000 \
    --dataloader_num_workers=8 \
    --train_shards_path_or_url='/data/laion/{00000..01210}.tar' \
    --validation_steps=200 \
    --checkpointing_steps=200 --checkpoints_total_limit=10 \
    --train_batch_size=12 \
    --gradient_checkpointing --enable_xformers_memory_efficient_attention \
    --gradient_accumulation_steps=1 \
    --use_8bit_adam \
    --resume_from_checkpoint=latest \
    --report_to=wandb \
    --seed=453645634 \
    --push_to_hub"""
DIFFUSERS_LORA = """train_lcm_distill_lora_sd_wds.py \
    --pretrained_teacher_model=/models/sd15 \
    --output_dir=/runs/lcm-lora \
    --mixed_precision=fp16 \
    --resolution=512 \
    --lora_rank=64 \
    --learning_rate=1e-6 --loss_type="huber" --adam_weight_decay=0.0 \
    --max_train_steps=1000 \
    --max_train_samples=4000000 \
    --dataloader_num_workers=8 \
    --train_shards_path_or_url='/data/laion/{00000..01210}.tar' \
    --validation_steps=200 \
    --checkpointing_steps=200 --checkpoints_total_limit=10 \
    --train_batch_size=12 \
    --gradient_checkpointing --enable_xformers_memory_efficient_attention \
    --gradient_accumulation_steps=1 \
    --use_8bit_adam \
    --resume_from_checkpoint=latest \
    --report_to=wandb \
    --seed=453645634 \
    --push_to_hub"""
# RG-LCD's README (accelerate launch main.py ...), with a local teacher and shards
RGLCD_DIRECT = """main.py --output_dir=/runs/rglcd \
 --pretrained_teacher_model /models/sd21 \
 --gradient_checkpointing \
 --use_8bit_adam \
 --enable_xformers_memory_efficient_attention --resolution 768 \
 --train_shards_path_or_url "/data/cc12m/{00000..01090}.tar" \
 --optimize_reward_fn \
 --reward_fn_name hpsv2 \
 --direct_optim_expert_reward \
 --reward_scale 1"""


def parse(command: str):
    """The config of a script command line given to `rglcd-fast train` (the script's name dropped)."""
    return config_from_args(build_parser().parse_args(["train", *shlex.split(command)[1:]]))


def test_diffusers_full_model_command(capsys):
    config = parse(DIFFUSERS_FULL)
    assert (config.teacher, config.output_dir, config.mixed_precision, config.resolution) == (
        "/models/sd15",
        "/runs/lcm",
        "fp16",
        512,
    )
    assert (config.learning_rate, config.loss_type, config.ema_decay, config.adam_weight_decay) == (
        1e-6,
        "huber",
        0.95,
        0.0,
    )
    assert (config.max_train_steps, config.dataloader_num_workers, config.validation_steps) == (1000, 8, 200)
    assert (config.checkpointing_steps, config.checkpoints_total_limit, config.train_batch_size) == (200, 10, 12)
    assert config.data == "/data/laion/{00000..01210}.tar"
    assert config.gradient_checkpointing and config.gradient_accumulation_steps == 1
    assert (config.resume_from_checkpoint, config.report_to, config.seed) == ("latest", "wandb", 453645634)
    assert config.reward_mode == "none" and not config.use_lora  # the LCD script: no reward, a full student
    ignored = capsys.readouterr().err
    for flag in ("max_train_samples", "enable_xformers_memory_efficient_attention", "use_8bit_adam", "push_to_hub"):
        assert f"--{flag}: ignored:" in ignored
    assert len(ignored.strip().splitlines()) == 4  # one line each


def test_diffusers_lora_command_trains_a_lora_student():
    config = parse(DIFFUSERS_LORA)
    assert config.use_lora and config.lora_rank == 64 and config.reward_mode == "none"
    assert config.learning_rate == 1e-6  # the command's, not our LoRA default


def test_rglcd_command_and_reward_switches():
    config = parse(RGLCD_DIRECT)
    assert (config.reward_mode, config.reward_model, config.reward_scale) == ("direct", "hpsv2", 1.0)
    assert (config.resolution, config.gradient_checkpointing, config.output_dir) == (768, True, "/runs/rglcd")
    lrm = (
        "x.py --pretrained_teacher_model=/m --optimize_reward_fn --pretrained_latent_rm=/lrm --rm_lr=1e-5 "
        "--rm_batch_size 4 --unlocked_rm_text_layers 3 --latent_rm_loss_type distillation --smooth_gt_label"
    )
    online = parse(lrm + " --guide_with_expert_reward")
    assert (online.reward_mode, online.lrm_frozen, online.lrm_path) == ("lrm", False, "/lrm")
    assert (online.lrm_learning_rate, online.lrm_batch_size, online.lrm_unlocked_text_layers) == (1e-5, 4, 3)
    assert online.lrm_loss == "kl" and online.smooth_gt_label is True
    frozen = parse(lrm.replace("distillation --smooth_gt_label", "cross_entropy"))
    assert frozen.lrm_frozen and frozen.lrm_loss == "ce"  # no --guide_with_expert_reward: frozen
    # our own flags win over what the dialect implies
    assert parse("x.py --pretrained_teacher_model=/m --reward-mode lrm --lrm-frozen false").reward_mode == "lrm"
    assert parse("x.py --pretrained_teacher_model=/m --lora_rank 4 --use-lora false").use_lora is False


def test_spellings_bare_switches_and_no_abbreviations(capsys):
    config = parse("x --teacher=/m --gradient-checkpointing --max_train_steps 5 --lrm-widths 8 16 --use_lora false")
    assert config.gradient_checkpointing and config.max_train_steps == 5 and config.lrm_widths == (8, 16)
    assert not config.use_lora
    assert not parse("x --teacher /m --gradient_checkpointing=false").gradient_checkpointing
    for abbreviated in ("--reward 1", "--max-train 5", "--lrm-pa /x"):
        with pytest.raises(SystemExit):
            parse(f"x --teacher /m {abbreviated}")
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, match",
    [
        ("--train_shards_path_or_url 'pipe:aws s3 cp s3://b/{0..9}.tar -'", "data: .*remote.*local"),
        ("--train_shards_path_or_url https://huggingface.co/d/{00000..01090}.tar", "data: .*remote"),
        ("--proportion_empty_prompts 0.1", "--proportion_empty_prompts: not supported: caption dropout"),
        ("--latent_rm_type latent_ViT", "--latent_rm_type: not supported: .*pretrain-lrm --image-tower vit"),
        ("--teacher_revision fp16", "--teacher_revision: not supported"),
        ("--mixed_precision fp8", "mixed_precision: expected one of no, fp16, bf16"),
        ("--report_to comet", "report_to: expected one of"),
        # the official script would guide with a random LRM it never trains
        ("--optimize_reward_fn", "lrm_frozen: .*--pretrained_latent_rm.*--guide_with_expert_reward"),
    ],
)
def test_what_we_do_not_take_stops_with_one_clear_line(command, match):
    with pytest.raises(ValueError, match=match):
        parse(f"x --pretrained_teacher_model /m {command}")


def test_accelerate_mixed_precision_sets_the_weight_dtype(world, tmp_path, monkeypatch):
    """No --mixed-precision: accelerate's own setting (accelerate launch --mixed_precision bf16 exports it)."""
    from accelerate.state import AcceleratorState

    from rglcd_fast.train.trainer import Trainer

    assert tiny_config(world, tmp_path).mixed_precision is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state()  # accelerate keeps one mixed-precision setting a process
    try:
        trainer = Trainer(tiny_config(world, tmp_path, reward_mode="none"))
        assert trainer.accelerator.mixed_precision == "bf16" and trainer.teacher.unet.dtype == torch.bfloat16
        AcceleratorState._reset_state()
        trainer = Trainer(tiny_config(world, tmp_path, reward_mode="none", mixed_precision="no"))  # ours wins
        assert trainer.teacher.unet.dtype == torch.float32
    finally:
        AcceleratorState._reset_state()


def test_fp16_on_the_cpu_is_refused_by_name():
    from types import SimpleNamespace

    from rglcd_fast.train.trainer import weight_dtype

    with pytest.raises(ValueError, match="mixed_precision: fp16 needs a CUDA device"):
        weight_dtype(SimpleNamespace(mixed_precision="fp16", device=torch.device("cpu")))
    assert weight_dtype(SimpleNamespace(mixed_precision="fp16", device=torch.device("cuda"))) == torch.float16
    assert weight_dtype(SimpleNamespace(mixed_precision="bf16", device=torch.device("cpu"))) == torch.bfloat16


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb"])
def test_validation_grids_reach_the_tracker_as_images(world, tmp_path, monkeypatch, report_to):
    """--report-to through accelerate's trackers (wandb offline): the student's and the EMA target's
    validation grids arrive as images, at the validation steps and at the end."""
    import glob

    from rglcd_fast.train.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    trainer = Trainer(
        tiny_config(world, out, reward_mode="none", max_train_steps=2, validation_steps=1, report_to=report_to)
    )
    assert [tracker.name for tracker in trainer.accelerator.trackers] == []  # started by train()
    trainer.train()
    trainer.finish()
    if report_to == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "logs" / "rglcd"), size_guidance={"images": 0})
        events.Reload()
        images = {tag: [event.step for event in events.Images(tag)] for tag in events.Tags()["images"]}
    else:
        files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "validation" / "*"))
        images = {}
        for path in files:  # <name>_<step>_<hash>.png
            name, step = path.rsplit("/", 1)[1].split("_")[:2]
            images.setdefault(f"validation/{name}", []).append(int(step))
    assert {tag: sorted(steps) for tag, steps in images.items()} == {
        "validation/student": [1, 2],
        "validation/target": [1, 2],
    }


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--resolution", "33"],
            "resolution: 33 px does not pass the teacher's VAE and UNet (a multiple of 4 does, e.g. 32)",
        ),
        (
            ["--reward-mode", "direct", "--reward-model", "clip", "--reward-model-path", "TEACHER"],
            "reward_model_path: reward model 'clip' needs a transformers CLIP folder",
        ),
        (["--lrm-path", "TEACHER"], "lrm_path: no LRM folder (lrm_config.json)"),
        (
            ["--pretrained_latent_rm", "TEACHER/model_index.json"],
            "lrm_path: TEACHER/model_index.json is not a torch checkpoint",
        ),
        (["--vae", "TEACHER"], "vae: no diffusers AutoencoderKL folder (config.json)"),
        (["--pretrained_vae_model_name_or_path", "TEACHER"], "vae: no diffusers AutoencoderKL folder (config.json)"),
        (["--lora-rank", "0"], "lora_rank: expected a positive integer, got 0"),
        (["--fsdp", "true", "--use-lora", "true"], "fsdp: shards a full student"),
        (["--fsdp", "true", "--compile-unets", "frozen"], "fsdp: not with compile_unets 'frozen' yet"),
        (["--fsdp-shard-teacher", "true"], "fsdp_shard_teacher: shards the teacher beside an FSDP student"),
        # values that would otherwise fail a step, a checkpoint or the final save later, or train NaN weights
        (["--learning-rate", "inf"], "learning_rate: expected a finite value >= 0, got inf"),
        (["--learning-rate", "-1"], "learning_rate: expected a finite value >= 0, got -1.0"),
        (["--lrm-learning-rate", "-1"], "lrm_learning_rate: expected a finite value >= 0, got -1.0"),
        (["--max-grad-norm", "nan"], "max_grad_norm: expected a finite value > 0, got nan"),
        (["--reward-scale", "nan"], "reward_scale: expected a finite value >= 0, got nan"),
        (["--timestep-scaling", "0"], "timestep_scaling: expected a finite value > 0, got 0.0"),
        (["--w-max", "inf"], "w_max: expected a finite value >= 0, got inf"),
        (["--adam-beta1", "2"], "adam_beta1: expected a value in [0, 1), got 2.0"),
        (["--seed", "-1"], "seed: expected an integer in [0, 2**32), got -1"),
        (["--num-ddim-timesteps", "0"], "num_ddim_timesteps: expected a positive integer, got 0"),
        (["--time-cond-proj-dim", "0"], "time_cond_proj_dim: expected a positive integer, got 0"),
        (["--lrm-widths", "0", "8"], "lrm_widths: expected positive channel counts, got (0, 8)"),
        (["--validation-steps", "-1"], "validation_steps: expected an integer >= 0, got -1"),
        (["--validation-lcm-steps", "9"], "validation_lcm_steps: expected LCM step counts from 1 to 8, got (9,)"),
        (["--checkpoints-total-limit", "0"], "checkpoints_total_limit: expected a positive integer, or None"),
        (["--dataloader-num-workers", "-1"], "dataloader_num_workers: expected an integer >= 0, got -1"),
        (["--lr-scheduler", "cosinee"], "lr_scheduler: expected one of linear, cosine,"),
        (["--output-dir", "TEACHER/model_index.json/run"], "output_dir: TEACHER/model_index.json is a file"),
    ],
)
def test_bad_settings_stop_with_one_line_before_any_model_is_built(world, tmp_path, capsys, monkeypatch, flags, line):
    from rglcd_fast import cli
    from rglcd_fast.train import models

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr(models.Teacher, "from_pretrained", no_models)
    teacher, data = world
    flags, line = [flag.replace("TEACHER", teacher) for flag in flags], line.replace("TEACHER", teacher)
    assert cli.main(["train", "--teacher", teacher, "--data", data, "--output-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rglcd-fast train: {line}") and len(err.strip().splitlines()) == 1


def test_the_readmes_accelerate_launch_command_runs_at_tiny_size(world, tmp_path):
    """The README's `accelerate launch` example as written, with the tiny world's paths and sizes appended
    (the last of a repeated flag wins): accelerate's --mixed_precision bf16 reaches the run."""
    import glob
    import os
    import re
    import subprocess
    import sys

    import yaml

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    command = re.search(r"^accelerate launch .*?(?<!\\)$", readme, re.S | re.M).group(0).replace("\\\n", " ")
    teacher, data = world
    argv = shlex.split(command) + [
        f"--pretrained_teacher_model={teacher}",
        f"--train_shards_path_or_url={data}",
        f"--output_dir={tmp_path}",
        "--resolution=16",
        "--max_train_steps=2",
        "--train_batch_size=4",
        "--validation_steps=1",
        "--progress=false",
    ]
    argv[:2] = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=1", "--cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.isfile(tmp_path / "pipeline" / "unet" / "config.json")
    (hparams,) = glob.glob(str(tmp_path / "logs" / "rglcd" / "*" / "hparams.yml"))
    settings = yaml.safe_load(open(hparams))
    assert (settings["mixed_precision"], settings["reward_mode"], settings["gradient_checkpointing"]) == (
        "bf16",
        "none",
        True,
    )


def test_make_world_takes_the_world_builders_options(capsys, monkeypatch):
    """`rglcd-fast make-world ARGS` is `python -m rglcd_fast.world.teacher ARGS`: options reach it, bad ones stop."""
    from rglcd_fast import cli
    from rglcd_fast.world import teacher

    with pytest.raises(SystemExit) as stop:
        cli.main(["make-world", "--help"])
    assert stop.value.code == 0 and "--skip-classifiers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["make-world", "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(teacher, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    assert cli.main(["make-world", "--seed", "1", "--skip-lrm"]) == 0
    assert seen == [(["--seed", "1", "--skip-lrm"], "rglcd-fast make-world")]


@pytest.mark.parametrize("command, shown", [("sample", "(default: 4)"), ("eval", "(default: 50)")])
def test_help_shows_each_default_once_and_never_none(capsys, command, shown):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert shown in text and "default: None" not in text and "(default: False)" not in text
    assert "(default: the model's size) (default" not in text


@pytest.mark.parametrize(
    "command, line",
    [
        ("eval --jobs 0", "argument --jobs: expected a positive integer"),
        ("eval --per-digit 0", "argument --per-digit: expected a positive integer"),
        ("eval --seeds a,b", "argument --seeds: expected seeds >= 0"),
        ("eval --steps 0", "argument --steps: expected 1 to 8 LCM steps"),
        ("sweep --steps 9", "argument --steps: expected 1 to 8 LCM steps"),
        ("sweep --train-steps -3", "argument --train-steps: expected a positive integer"),
    ],
)
def test_comparison_flags_are_checked_before_anything_trains(capsys, command, line):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(command.split())
    assert stop.value.code == 2 and line in capsys.readouterr().err


def test_reward_settings_a_reward_mode_does_not_use_get_a_line(capsys):
    assert parse("x --reward-mode none --lrm-path /x --reward-scale 3").reward_mode == "none"
    assert "--lrm-path, --reward-scale: ignored: reward_mode none does not use them" in capsys.readouterr().err
    parse("x --reward-mode direct --lrm-batch-size 4 --reward-scale 2")
    assert capsys.readouterr().err.strip() == "--lrm-batch-size: ignored: reward_mode direct does not use them"
    parse("x --lrm-batch-size 4 --reward-scale 2")  # the LRM mode uses both
    assert capsys.readouterr().err == ""
