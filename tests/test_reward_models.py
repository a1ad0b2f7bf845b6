"""Expert reward adapters and the latent proxy reward model, on tiny random models built from configs."""
import builtins
import math
import os

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from rglcd_fast.reward import (AestheticHead, AestheticScore, ClipScore, HPSv2, ImageReward, LatentRewardModel,
                               PickScore, load_reward_model, preprocess)
from tiny_pipeline import tiny_tokenizer

PROMPTS = ["a red cat", "digit 7"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip"))
    tokenizer, vocab_size = tiny_tokenizer(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8),
                        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    torch.manual_seed(1)
    AestheticHead(8).save(os.path.join(folder, "aesthetic_head.safetensors"))
    return folder


def images(b=2, h=20, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


@pytest.mark.parametrize("name", ["clip", "pickscore", "aesthetic"])
def test_adapter_score_logits_and_gradients(clip_folder, name):
    rm = load_reward_model(name, clip_folder)
    assert not rm.training and all(not p.requires_grad for p in rm.parameters())
    rm.train()
    assert not rm.training  # experts stay in eval mode
    x = images().requires_grad_(True)
    score = rm.score(x, PROMPTS)
    assert score.shape == (2,) and score.dtype == torch.float32 and torch.isfinite(score).all()
    torch.testing.assert_close(rm.logits(x, PROMPTS), rm.logit_scale * score, rtol=1e-5, atol=1e-5)
    (-score.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in rm.parameters())


def test_clip_score_is_cosine_and_pickscore_scaled(clip_folder):
    clip, pick = ClipScore.from_pretrained(clip_folder), PickScore.from_pretrained(clip_folder)
    x = images()
    cos = clip.score(x, PROMPTS)
    assert (cos.abs() <= 1 + 1e-5).all()
    scale = clip.model.logit_scale.exp()
    torch.testing.assert_close(clip.logit_scale, scale.detach())
    torch.testing.assert_close(pick.score(x, PROMPTS), scale.detach() * cos, rtol=1e-5, atol=1e-5)
    assert float(pick.logit_scale) == 1.0
    with torch.no_grad():  # matches the CLIP model's own forward on the same preprocessed pixels
        tok = clip.tokenizer(PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        out = clip.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                         pixel_values=clip.preprocess(x))
    torch.testing.assert_close(pick.score(x, PROMPTS), out.logits_per_image.diagonal(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        clip.score(x, PROMPTS[:1])


def test_aesthetic_is_text_independent(clip_folder):
    rm = AestheticScore.from_pretrained(clip_folder)
    x = images()
    torch.testing.assert_close(rm.score(x, PROMPTS), rm.score(x, ["zzz", "q"]))
    torch.testing.assert_close(rm.score(x), rm.score(x, PROMPTS))


def test_preprocess_non_square():
    x = torch.rand(1, 3, 30, 60, dtype=torch.float64, requires_grad=True)
    y = preprocess(x, 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert y.shape == (1, 3, 16, 16) and y.dtype == torch.float64
    # shortest side 30 -> 16, long side 60 -> 32, centre crop keeps columns 8..24
    full = torch.nn.functional.interpolate(x, size=(16, 32), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(y, (full[..., 8:24] - 0.5) / 0.5)
    assert preprocess(torch.rand(2, 3, 40, 24), (16, 16)).shape == (2, 3, 16, 16)
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        preprocess(torch.rand(3, 16, 16), 16)


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_aesthetic_head_round_trip(tmp_path, ext):
    torch.manual_seed(3)
    head = AestheticHead(8).eval()
    path = str(tmp_path / ("head" + ext))
    head.save(path)
    loaded = AestheticHead.from_file(path).eval()
    e = torch.randn(4, 8)
    torch.testing.assert_close(loaded(e), head(e))
    assert [m for m in loaded.layers if isinstance(m, torch.nn.Linear)][0].in_features == 8


def test_factory_errors(clip_folder, tmp_path):
    with pytest.raises(ValueError, match="clip, pickscore, aesthetic, hpsv2, imagereward"):
        load_reward_model("fid", clip_folder)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_reward_model("clip", missing)
    with pytest.raises(FileNotFoundError, match="head"):
        load_reward_model("aesthetic", str(tmp_path))


def _block_import(monkeypatch, blocked):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] == blocked:
            raise ImportError(f"No module named '{blocked}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_hpsv2_without_open_clip(monkeypatch, tmp_path):
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    ckpt.write_bytes(b"")
    _block_import(monkeypatch, "open_clip")
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        load_reward_model("hpsv2", str(ckpt))
    with pytest.raises(ImportError, match="open_clip_torch"):
        HPSv2.from_pretrained(str(ckpt), model_name="tiny")


def test_imagereward_without_package(monkeypatch, tmp_path):
    _block_import(monkeypatch, "ImageReward")
    with pytest.raises(ImportError, match="image-reward.*own environment"):
        ImageReward.from_pretrained(str(tmp_path))


# -- latent proxy reward model ------------------------------------------------------------------------
def tiny_lrm(clip_folder, seed=0):
    torch.manual_seed(seed)
    return LatentRewardModel.from_clip(clip_folder, widths=(8, 16), groups=4)


def test_lrm_from_clip_copies_text_tower(clip_folder):
    lrm = tiny_lrm(clip_folder)
    clip = CLIPModel.from_pretrained(clip_folder)
    for k, v in clip.text_model.state_dict().items():
        torch.testing.assert_close(lrm.text_model.state_dict()[k], v)
    torch.testing.assert_close(lrm.text_projection.weight, clip.text_projection.weight)
    assert lrm.config["embed_dim"] == 8 and lrm.tokenizer is not None
    assert math.isclose(lrm.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_lrm_logits(clip_folder):
    lrm = tiny_lrm(clip_folder)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    s = lrm.logits(z, PROMPTS)
    assert s.shape == (2,) and s.dtype == torch.float32
    assert (s.abs() <= lrm.logit_scale.exp() + 1e-4).all()
    ids = lrm.tokenize(PROMPTS)
    torch.testing.assert_close(lrm.logits(z, ids), s)
    s.sum().backward()
    assert z.grad.abs().sum() > 0 and lrm.logit_scale.grad is not None
    assert lrm.logits(torch.randn(2, 4, 16, 12), PROMPTS).shape == (2,)


def test_lrm_save_load_round_trip(clip_folder, tmp_path):
    lrm = tiny_lrm(clip_folder)
    with torch.no_grad():
        lrm.logit_scale.add_(0.5)
    lrm.save_pretrained(str(tmp_path / "lrm"))
    loaded = LatentRewardModel.from_pretrained(str(tmp_path / "lrm"))
    assert loaded.config == lrm.config
    for k, v in lrm.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    z = torch.randn(3, 4, 8, 8)
    p = ["a", "b", "c"]
    lrm.eval(), loaded.eval()
    torch.testing.assert_close(loaded.logits(z, p), lrm.logits(z, p))


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_lrm_preference_step(clip_folder, kind):
    lrm = tiny_lrm(clip_folder)
    g = torch.Generator().manual_seed(5)
    candidates = [torch.randn(4, 4, 8, 8, generator=g) for _ in range(3)]
    prompts = ["a cat", "a dog", "digit 1", "digit 2"]
    expert = torch.randn(3, 4, generator=g) * 3
    opt = torch.optim.Adam(lrm.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in lrm.state_dict().items()}
    loss0, acc0 = lrm.preference_loss(candidates, prompts, expert, kind=kind)
    assert loss0.dim() == 0 and 0.0 <= acc0.item() <= 1.0
    opt.zero_grad()
    loss0.backward()
    opt.step()
    changed = [k for k, v in lrm.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("image_encoder") for k in changed) and any(k.startswith("text_model") for k in changed)
    loss1, _ = lrm.preference_loss(candidates, prompts, expert, kind=kind)
    assert loss1.item() != loss0.item()
    for _ in range(5):
        opt.zero_grad()
        loss, _ = lrm.preference_loss(candidates, prompts, expert, kind=kind)
        loss.backward()
        opt.step()
    assert lrm.preference_loss(candidates, prompts, expert, kind=kind)[0].item() < loss0.item()
    with pytest.raises(ValueError, match="expert_logits"):
        lrm.preference_loss(candidates, prompts, expert[:2])
