"""The digits world's teacher: the shipped StableDiffusionPipeline folder loads as a real SD folder does,
its VAE and samples are good enough for the evaluator, and the training code rebuilds the same folder."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rglcd_fast.world import (
    TEACHER_DIR,
    DigitsDataset,
    build_scheduler,
    build_vae,
    load_classifier,
    load_teacher,
    make_teacher,
    reconstruction_accuracy,
    sample_accuracy,
    train_vae,
)
from rglcd_fast.world.teacher import SCHEDULER_CONFIG

CONFIG_FILES = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/tokenizer.json",
]


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


@pytest.fixture(scope="module")
def evaluator():
    return load_classifier("evaluator")


def _config(folder, name):
    with open(os.path.join(folder, name)) as f:
        if not name.endswith(".json"):
            return f.read()
        config = json.load(f)
    # versions and the VAE's trained latent scale are not part of the architecture
    ignored = ("_diffusers_version", "transformers_version", "scaling_factor")
    return {k: v for k, v in config.items() if k not in ignored}


def test_shipped_folder_loads_as_an_sd_folder(teacher):
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(TEACHER_DIR) for f in files)
    assert size < 12e6, size
    assert all(f.endswith((".json", ".txt", ".safetensors")) for _, _, files in os.walk(TEACHER_DIR) for f in files)
    assert isinstance(StableDiffusionPipeline.from_pretrained(TEACHER_DIR), StableDiffusionPipeline)
    assert teacher.safety_checker is None and teacher.feature_extractor is None
    unet = UNet2DConditionModel.from_pretrained(TEACHER_DIR, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(TEACHER_DIR, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(TEACHER_DIR, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(TEACHER_DIR, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(TEACHER_DIR, subfolder="scheduler")
    for key, value in SCHEDULER_CONFIG.items():
        assert scheduler.config[key] == value, key
    assert unet.config.time_cond_proj_dim is None and unet.config.in_channels == unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == teacher.vae.config.scaling_factor
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert text_encoder.config.max_position_embeddings == tokenizer.model_max_length == 16
    for a, b in zip(unet.state_dict().values(), teacher.unet.state_dict().values()):
        assert torch.equal(a, b)
    ids = tokenizer(["a handwritten digit seven", ""], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        context = text_encoder(ids).last_hidden_state
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), context).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_latents_are_4x8x8_with_unit_scale(teacher):
    vae = teacher.vae
    data = DigitsDataset()
    assert vae.config.scaling_factor != AutoencoderKL().config.scaling_factor  # set from the data, not SD's default
    with torch.no_grad():
        latents = vae.encode(data.images).latent_dist.sample(torch.Generator().manual_seed(0))
    assert latents.shape == (len(data), 4, 8, 8)
    assert 0.7 < (latents * vae.config.scaling_factor).std().item() < 1.3


def test_vae_round_trip_keeps_the_digit(teacher, evaluator):
    data = DigitsDataset(indices=torch.arange(0, 1797, 18))  # 100 digits
    assert reconstruction_accuracy(teacher.vae, evaluator, data.images, data.labels) >= 0.9


def test_teacher_samples_the_prompted_digit(teacher, evaluator):
    accuracy = sample_accuracy(teacher, evaluator, per_digit=2, num_inference_steps=20, guidance_scale=7.5, seed=0)
    assert accuracy >= 0.8, accuracy


def _trained_vae(images, seed=0):
    torch.manual_seed(seed)  # the initial weights
    return train_vae(
        build_vae(), images, steps=2, batch_size=4, generator=torch.Generator().manual_seed(seed), progress=False
    )


def test_vae_training_is_deterministic():
    images = DigitsDataset(indices=torch.arange(8)).images
    a, b = _trained_vae(images), _trained_vae(images)
    assert a.config.scaling_factor == b.config.scaling_factor
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_make_teacher_writes_a_loadable_folder_with_the_shipped_configs(tmp_path):
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "stale.txt").write_text("replaced as a whole")
    assert make_teacher(str(out), vae_steps=2, unet_steps=2, progress=False) == str(out)
    assert sorted(os.listdir(tmp_path)) == ["teacher"]  # no temporary folder left behind
    assert not (out / "stale.txt").exists()
    for name in CONFIG_FILES:
        assert _config(str(out), name) == _config(TEACHER_DIR, name), name
    pipeline = load_teacher(str(out))
    assert pipeline.scheduler.config.num_train_timesteps == build_scheduler().config.num_train_timesteps
    images = pipeline(["a handwritten digit one"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
