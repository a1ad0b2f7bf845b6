"""The pre-trained latent reward model: the latent ViT tower, freezing as the official code, `pretrain-lrm`
(contrastive + expert-preference losses, checkpoints, exact resume), and the trainer starting from a
pre-trained LRM, fine-tuned with its first parts frozen or frozen whole."""

import csv
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_train_trainer import assert_same, weights
from tiny_pipeline import tiny_config

from rglcd_fast.reward import LatentRewardModel
from rglcd_fast.train.config import LRMPretrainConfig, make_config
from rglcd_fast.train.lrm_pretrain import LRMPretrainer, contrastive_loss
from rglcd_fast.train.trainer import Trainer

TEXT_CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=12,
)
VIT = dict(latent_size=8, patch_size=2, width=16, layers=3, heads=2)


def tiny_lrm(tower="conv", seed=0):
    torch.manual_seed(seed)
    return LatentRewardModel(
        TEXT_CONFIG,
        embed_dim=8,
        widths=(8, 16),
        groups=4,
        image_tower=tower,
        vit_config=VIT if tower == "vit" else None,
    )


def trainable(model):
    """Names as transformers 5 gives them (4.x nests the text transformer: text_model.text_model.*)."""
    return {
        name.replace("text_model.text_model.", "text_model.", 1)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def test_latent_vit_tower_reads_any_latent_size_and_round_trips(tmp_path):
    lrm = tiny_lrm("vit")
    ids = torch.randint(0, 64, (2, 12))
    for shape in ((2, 4, 8, 8), (2, 4, 12, 16)):  # the native grid, then interpolated positions
        z = torch.randn(shape, requires_grad=True)
        reward = lrm.reward(z, ids)
        assert reward.shape == (2,) and (reward.abs() <= 1 + 1e-6).all()
        reward.sum().backward()
        assert z.grad.abs().sum() > 0
    lrm.save_pretrained(str(tmp_path / "vit"))
    loaded = LatentRewardModel.from_pretrained(str(tmp_path / "vit"))
    assert loaded.config["image_tower"] == "vit" and loaded.config["vit_config"] == VIT
    z = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(loaded.logits(z, ids[:1].expand(3, -1)), lrm.logits(z, ids[:1].expand(3, -1)))
    with pytest.raises(ValueError, match="image_tower"):
        LatentRewardModel(TEXT_CONFIG, image_tower="resnet")


@pytest.mark.parametrize("tower", ["conv", "vit"])
def test_lock_leaves_the_official_parts_trainable(tower):
    """As lock_image_tower(unlocked_groups=2) / lock_text_tower(unlocked_layers=n) of the official code: the
    image tower's last block (with its final norm) and projection, the text tower's last n layers, final
    LayerNorm and projection; the logit scale stays trainable."""
    lrm = tiny_lrm(tower).lock(unlocked_image_groups=2, unlocked_text_layers=1)
    names = trainable(lrm)
    last = "image_encoder.blocks.2."  # the last of 3 blocks (conv: residual, downsample, residual)
    head = (
        {"image_encoder.ln_post.weight", "image_encoder.proj.weight"}
        if tower == "vit"
        else {"image_encoder.norm_out.weight", "image_encoder.proj.weight", "image_encoder.proj.bias"}
    )
    assert head <= names and any(n.startswith(last) for n in names)
    assert not any(
        n.startswith(("image_encoder.blocks.0.", "image_encoder.conv_in", "image_encoder.blocks.1.")) for n in names
    )
    assert {"logit_scale", "text_projection.weight", "text_model.final_layer_norm.weight"} <= names
    assert any(n.startswith("text_model.encoder.layers.2.") for n in names)
    assert not any(
        n.startswith(("text_model.encoder.layers.0.", "text_model.encoder.layers.1.", "text_model.embeddings"))
        for n in names
    )
    assert trainable(tiny_lrm(tower).lock(0, 0)) == {"logit_scale"}
    assert tiny_lrm(tower).default_unlocked_text_layers() == 1  # 5 of 24, scaled to 3 layers
    with pytest.raises(ValueError, match="unlocked_image_groups"):
        tiny_lrm(tower).lock(unlocked_image_groups=99)
    with pytest.raises(ValueError, match="unlocked_text_layers"):
        tiny_lrm(tower).lock(unlocked_text_layers=4)


def test_contrastive_loss_is_clips_with_shared_captions_as_positives():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(u, dim=-1) @ F.normalize(v, dim=-1).T
    labels = torch.arange(4)
    loss, accuracy = contrastive_loss(u, v, scale, ["a", "b", "c", "d"])
    torch.testing.assert_close(loss, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    assert accuracy.item() == (logits.argmax(1) == labels).float().mean().item()
    # captions 0 and 2 equal: each is a positive of both images
    loss, _ = contrastive_loss(u, v, scale, ["a", "b", "a", "d"])
    targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    expected = (
        -(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()
    ) / 2
    torch.testing.assert_close(loss, expected)


def pretrain_config(world, out, **overrides):
    teacher, data = world
    settings = dict(
        teacher=teacher,
        data=data,
        output_dir=str(out),
        max_train_steps=4,
        train_batch_size=4,
        lrm_widths=(8, 16),
        lrm_embed_dim=8,
        checkpointing_steps=2,
        logging_steps=1,
        progress=False,
        lr_warmup_steps=1,
        distill_candidates=2,
        lr_scheduler="constant_with_warmup",
    )  # the interrupted run stops at 2 of the same schedule
    settings.update(overrides)
    return make_config(config_class=LRMPretrainConfig, **settings)


@pytest.mark.parametrize("tower", ["conv", "vit"])
def test_pretrain_resumes_exactly(world, tmp_path, tower):
    """Two steps, a checkpoint, resumed to four: the LRM, its optimiser and the logs equal an uninterrupted run."""
    extra = dict(image_tower=tower, vit_patch_size=2, vit_width=16, vit_layers=2, vit_heads=2)
    full = LRMPretrainer(pretrain_config(world, tmp_path / "full", **extra))
    outputs = full.train()
    with open(outputs["logs"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["distill_loss"] and r["contrastive_loss"] and 0 <= float(r["preference_accuracy"]) <= 1 for r in rows)
    saved = LatentRewardModel.from_pretrained(outputs["lrm"])
    assert_same(weights(saved), weights(full.model))
    assert saved.tokenizer is not None and saved.config["image_tower"] == tower

    half = LRMPretrainer(pretrain_config(world, tmp_path / "half", max_train_steps=2, **extra))
    half.train()
    shutil.rmtree(tmp_path / "half" / "lrm")
    resumed = LRMPretrainer(pretrain_config(world, tmp_path / "half", resume_from_checkpoint="latest", **extra))
    resumed.train()
    assert_same(weights(resumed.model), weights(full.model))
    for a, b in zip(resumed.optimizer.state_dict()["state"].values(), full.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "half" / "logs.csv") as f:
        resumed_rows = list(csv.DictReader(f))
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in rows]


def test_pretrain_beside_an_earlier_runs_checkpoints_is_refused(world, tmp_path):
    os.makedirs(tmp_path / "checkpoint-5")
    with pytest.raises(ValueError, match="output_dir: .* earlier run \\(checkpoint-5\\)"):
        LRMPretrainer(pretrain_config(world, tmp_path))


def test_pretrain_contrastive_only(world, tmp_path):
    trainer = LRMPretrainer(pretrain_config(world, tmp_path, distill_weight=0.0, max_train_steps=2))
    with open(trainer.train()["logs"]) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["distill_loss"] == "" and rows[0]["loss"] == rows[0]["contrastive_loss"]


def test_pretrain_clamps_the_logit_scale_as_open_clip(world, tmp_path):
    """open_clip's training step clamps logit_scale to [0, ln 100] after each optimiser step."""
    trainer = LRMPretrainer(pretrain_config(world, tmp_path, max_train_steps=1))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(6.0)
    trainer.train()
    assert trainer.model.logit_scale.item() == pytest.approx(math.log(100))


@pytest.mark.parametrize("tower, betas, eps", [("vit", (0.9, 0.98), 1e-6), ("conv", (0.9, 0.999), 1e-8)])
def test_pretrain_optimiser_is_open_clips(world, tmp_path, tower, betas, eps):
    """open_clip's AdamW: no weight decay on parameters of fewer than 2 dimensions (gains, biases, the class
    token, the logit scale), its betas and epsilon for the tower's kind (ViT; ResNet for the conv tower); the
    digits preset decays every parameter, as its shipped LRM was trained."""
    extra = dict(image_tower=tower, vit_patch_size=2, vit_width=16, vit_layers=2, vit_heads=2)
    trainer = LRMPretrainer(pretrain_config(world, tmp_path, **extra))
    decayed, undecayed = trainer.optimizer.param_groups
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.1, 0.0)
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in undecayed["params"])
    assert any(p is trainer.model.logit_scale for p in undecayed["params"])
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(trainer.model.parameters()))
    assert (decayed["betas"], decayed["eps"]) == (betas, eps)
    digits = make_config(config_class=LRMPretrainConfig, teacher="digits")
    assert digits.decay_every_parameter and (digits.adam_beta2, digits.adam_epsilon) == (0.999, 1e-8)


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    return LRMPretrainer(pretrain_config(world, out, max_train_steps=2)).train()["lrm"]


def test_trainer_fine_tunes_a_pretrained_lrm_with_its_first_parts_frozen(world, tmp_path, pretrained):
    trainer = Trainer(
        tiny_config(
            world, tmp_path, reward_mode="lrm", lrm_path=pretrained, lrm_unlocked_text_layers=1, lrm_learning_rate=None
        )
    )
    lrm = trainer.guidance.lrm
    start = weights(LatentRewardModel.from_pretrained(pretrained))
    assert_same(weights(lrm), start)
    assert trainer.config.lrm_learning_rate == 3.3e-6  # the official rate for a pre-trained LRM
    frozen = {n for n, p in lrm.named_parameters() if not p.requires_grad}
    assert "image_encoder.conv_in.weight" in frozen and "image_encoder.proj.weight" not in frozen
    trainer.train()
    after = weights(lrm)
    assert all(torch.equal(after[n], start[n]) for n in frozen)
    assert any(not torch.equal(after[n], start[n]) for n, p in lrm.named_parameters() if p.requires_grad)


def test_frozen_lrm_never_moves_and_the_expert_is_still_logged(world, tmp_path, pretrained):
    trainer = Trainer(tiny_config(world, tmp_path, reward_mode="lrm", lrm_path=pretrained, lrm_frozen=True))
    assert trainer.guidance.lrm_optimizer is None and not trainable(trainer.guidance.lrm)
    outputs = trainer.train()
    assert_same(weights(trainer.guidance.lrm), weights(LatentRewardModel.from_pretrained(pretrained)))
    with open(outputs["logs"]) as f:
        rows = list(csv.DictReader(f))
    assert all(r["lrm_loss"] == "" and r["expert_reward"] != "" and -1 <= float(r["reward"]) <= 1 for r in rows)
    assert not any(name.startswith("lrm_optimizer") for name in os.listdir(tmp_path / "checkpoint-4"))


def test_lrm_path_errors_name_the_setting(world, tmp_path, pretrained):
    with pytest.raises(FileNotFoundError, match="lrm_path"):
        Trainer(tiny_config(world, tmp_path, lrm_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="lrm_frozen"):
        make_config(lrm_frozen=True, lrm_path=None)
    source = LatentRewardModel.from_pretrained(pretrained)
    config = {k: v for k, v in source.config.items() if k != "text_config"}
    bad = str(tmp_path / "bad")  # the same LRM made for an 8-channel VAE
    LatentRewardModel(
        source.text_config, tokenizer=source.tokenizer, **{**config, "latent_channels": 8}
    ).save_pretrained(bad)
    with pytest.raises(ValueError, match="lrm_path.*8-channel latents.*makes 4"):
        Trainer(tiny_config(world, tmp_path, lrm_path=bad))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(pretrained, no_tokenizer)
    for name in os.listdir(no_tokenizer):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            os.remove(no_tokenizer / name)
    with pytest.raises(ValueError, match="lrm_path.*no tokenizer"):
        Trainer(tiny_config(world, tmp_path, lrm_path=str(no_tokenizer)))


def test_an_sdxl_teacher_pretrains_an_lrm_that_guides_its_student(tmp_path):
    """The pre-trained-LRM machinery with an SDXL teacher: pretrain-lrm's ranking candidates are the SDXL
    teacher's one-step predictions (its added conditions, the fixed size ids), and the trainer fine-tunes
    the result online."""
    from tiny_pipeline import save_tiny_world

    world = save_tiny_world(tmp_path / "xl_world", xl=True)
    lrm = LRMPretrainer(pretrain_config(world, tmp_path / "lrm", max_train_steps=2)).train()["lrm"]
    outputs = Trainer(tiny_config(world, tmp_path / "run", lrm_path=lrm, lrm_learning_rate=None)).train()
    with open(outputs["logs"]) as f:
        assert all(row["lrm_loss"] and row["distill_loss"] for row in csv.DictReader(f))
