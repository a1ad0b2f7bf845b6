"""Expert reward adapters and the latent proxy reward model, on tiny random models built from configs."""

import builtins
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_pipeline import tiny_tokenizer
from transformers import CLIPConfig, CLIPModel

from rglcd_fast.reward import (
    AestheticLinearHead,
    AestheticMLPHead,
    AestheticMLPScore,
    AestheticScore,
    ClipScore,
    HPSv2,
    ImageReward,
    LatentRewardModel,
    PickScore,
    WeightedReward,
    load_reward_model,
    preprocess,
)
from rglcd_fast.reward.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PROMPTS = ["a red cat", "digit 7"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip"))
    tokenizer, vocab_size = tiny_tokenizer(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    torch.manual_seed(1)
    AestheticLinearHead(8).save(os.path.join(folder, "aesthetic_linear.safetensors"))
    AestheticMLPHead(8).save(os.path.join(folder, "aesthetic_mlp.safetensors"))
    return folder


def images(b=2, h=20, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def clip_normalize(x):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return (x - mean) / std


def official_clip_pixels(x, size):
    """The official reward functions' CLIP_NORMALIZE(CLIP_RESIZE(x)) on square images: torchvision 0.16's
    Resize(size, BICUBIC) on a tensor (its antialias="warn" default: not antialiased) and Normalize with
    OpenAI's mean/std."""
    return clip_normalize(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=False))


def official_hpsv2_pixels(x, size):
    """The official get_hpsv2_fn's preprocess_val.transforms[2:] (hpsv2 loaded with light_augmentation=True),
    image by image: ResizeMaxSize(size) (the longest side to size, torchvision 0.16's bicubic tensor resize,
    F.pad(padding=[left, top, right, bottom], fill=0)) and MaskAwareNormalize (OpenAI's mean/std)."""
    out = []
    for img in x:
        height, width = img.shape[1:]
        scale = size / float(max(height, width))
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = F.interpolate(img[None], size=new_size, mode="bicubic", align_corners=False, antialias=False)[0]
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        out.append(F.pad(img, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
    return clip_normalize(torch.stack(out))


@pytest.mark.parametrize("name", ["clip", "pickscore", "aesthetic", "aesthetic_mlp"])
def test_adapter_reward_logits_and_gradients(clip_folder, name):
    rm = load_reward_model(name, clip_folder)
    assert not rm.training and all(not p.requires_grad for p in rm.parameters())
    rm.train()
    assert not rm.training  # experts stay in eval mode
    x = images().requires_grad_(True)
    reward, logits = rm.reward_and_logits(x, PROMPTS)
    for t in (reward, logits):
        assert t.shape == (2,) and t.dtype == torch.float32 and torch.isfinite(t).all()
    torch.testing.assert_close(rm.reward(x, PROMPTS), reward)
    torch.testing.assert_close(rm.logits(x, PROMPTS), logits)
    torch.testing.assert_close(rm(x, PROMPTS), reward)
    (-reward.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in rm.parameters())
    assert not rm.logits_use_lrm_scale


def pooled(features):
    """transformers 4 returns the projected embedding, 5 an output whose pooler_output it is."""
    return getattr(features, "pooler_output", features)


@pytest.mark.parametrize("cls", [ClipScore, PickScore])
def test_clip_family_units_are_the_official_ones(clip_folder, cls):
    """reward_fn.py (get_pick_score_fn / get_clip_score_fn): the student's reward is the plain cosine of the
    normalised embeddings; return_logits=True multiplies it by exp(logit_scale)."""
    rm = cls.from_pretrained(clip_folder)
    x = images(h=24, w=24)  # square, as the official code's images
    with torch.no_grad():
        model = rm.model
        u = pooled(model.get_image_features(pixel_values=official_clip_pixels(x, 16)))
        tok = rm.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        v = pooled(model.get_text_features(**tok))
        cos = ((u / u.norm(dim=-1, keepdim=True)) * (v / v.norm(dim=-1, keepdim=True))).sum(-1)
        reward, logits = rm.reward_and_logits(x, PROMPTS)
        out = model(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=official_clip_pixels(x, 16)
        )
    assert (reward.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(reward, cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, cos * model.logit_scale.exp(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, out.logits_per_image.diagonal(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        rm.reward(x, PROMPTS[:1])


def test_features_from_transformers_4_and_5(clip_folder, monkeypatch):
    """transformers 4.x returns the projected embeddings as a tensor, 5.x as an output's pooler_output."""
    rm = ClipScore.from_pretrained(clip_folder)
    x = images()
    expected = rm.reward(x, PROMPTS)
    image_fn, text_fn = rm.model.get_image_features, rm.model.get_text_features

    def the_other_version(features):  # the installed version's answer as the other major version gives it
        return features.pooler_output if hasattr(features, "pooler_output") else SimpleNamespace(pooler_output=features)

    monkeypatch.setattr(rm.model, "get_image_features", lambda **kw: the_other_version(image_fn(**kw)))
    monkeypatch.setattr(rm.model, "get_text_features", lambda **kw: the_other_version(text_fn(**kw)))
    torch.testing.assert_close(rm.reward(x, PROMPTS), expected)


def test_aesthetic_is_the_official_linear_head(clip_folder):
    """get_aesthetic_model: nn.Linear(768, 1) (keys weight, bias) on L2-normalised CLIP image embeddings;
    reward and logits are both the rating (its score_fn ignores return_logits)."""
    head = AestheticLinearHead()
    assert isinstance(head, torch.nn.Linear) and tuple(head.weight.shape) == (1, 768)
    assert set(head.state_dict()) == {"weight", "bias"}
    rm = AestheticScore.from_pretrained(clip_folder)
    x = images(h=24, w=24)
    with torch.no_grad():
        u = pooled(rm.model.get_image_features(pixel_values=official_clip_pixels(x, 16)))
        rating = rm.head(u / u.norm(dim=-1, keepdim=True)).squeeze(-1)
        reward, logits = rm.reward_and_logits(x, PROMPTS)
    torch.testing.assert_close(reward, rating, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, reward)
    torch.testing.assert_close(rm.reward(x, PROMPTS), rm.reward(x, ["zzz", "q"]))  # text-independent
    torch.testing.assert_close(rm.reward(x, None), reward)
    assert isinstance(AestheticMLPScore.from_pretrained(clip_folder).head, AestheticMLPHead)


class FakeOpenClip(torch.nn.Module):
    """An open_clip-like model (encode_image, encode_text, logit_scale) for the HPSv2 adapter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
        self.text = torch.nn.Embedding(64, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, tokens):
        return self.text(tokens).mean(1)


def fake_open_clip_tokenizer(prompts):
    return torch.tensor([[ord(c) % 64 for c in p.ljust(12)[:12]] for p in prompts])


@pytest.mark.parametrize("h, w", [(32, 32), (20, 32), (45, 27)])
def test_hpsv2_units_are_the_official_ones(h, w):
    """get_hpsv2_fn: reward = (normalised image · normalised text).sum(-1); logits × exp(logit_scale); its
    images resized on the longest side and padded (non-square ones too)."""
    rm = HPSv2(FakeOpenClip(), fake_open_clip_tokenizer, image_size=16)
    x = images(h=h, w=w).requires_grad_(True)
    reward, logits = rm.reward_and_logits(x, PROMPTS)
    with torch.no_grad():
        u = F.normalize(rm.model.encode_image(official_hpsv2_pixels(x, 16)), dim=-1)
        v = F.normalize(rm.model.encode_text(fake_open_clip_tokenizer(PROMPTS)), dim=-1)
        cos = (u * v).sum(-1)
    torch.testing.assert_close(reward, cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, cos * rm.model.logit_scale.exp(), rtol=1e-5, atol=1e-5)
    reward.sum().backward()
    assert x.grad.abs().sum() > 0


class FakeImageRewardModel(torch.nn.Module):
    """ImageReward's interface (blip.tokenizer, blip.visual_encoder, score_gard) with a raw reward of
    2·mean(normalised pixels) + 1."""

    def __init__(self, tokenizer):
        super().__init__()
        self.blip = torch.nn.Module()
        self.blip.tokenizer = tokenizer
        self.blip.visual_encoder = torch.nn.Identity()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def score_gard(self, input_ids, attention_mask, image):
        return (self.weight * self.blip.visual_encoder(image).mean(dim=(1, 2, 3)) * 2 + 1)[:, None]


def test_imagereward_is_clipped_at_2_and_takes_the_lrm_scale(clip_folder):
    """get_img_reward_fn returns -relu(-r + 2) = min(r, 2) - 2; with return_logits the training script
    multiplies ImageReward's by the LRM's exp(logit_scale)."""
    tokenizer = tiny_tokenizer(os.path.join(clip_folder, "ir_tokenizer"))[0]
    rm = ImageReward(FakeImageRewardModel(tokenizer))
    x = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.5, 0.9, 0.9)])
    x[3, 0, 0, 0] = float("nan")
    prompts = ["a", "b", "c", "d"]
    raw = rm.model.score_gard(None, None, preprocess(x, 224)).squeeze(-1)
    reward, logits = rm.reward_and_logits(x, prompts)
    official = -F.relu(-raw + 2)
    torch.testing.assert_close(reward, official, equal_nan=True)
    torch.testing.assert_close(reward, torch.minimum(raw, torch.tensor(2.0)) - 2, equal_nan=True)
    assert reward[1].item() < 0 and reward[2].item() == 0.0 and torch.isnan(reward[3])  # clipped; NaN kept
    torch.testing.assert_close(logits, reward, equal_nan=True)
    assert rm.logits_use_lrm_scale


def test_weighted_expert_is_hpsv2_plus_a_tenth_of_imagereward(clip_folder):
    tokenizer = tiny_tokenizer(os.path.join(clip_folder, "ir_tokenizer2"))[0]
    hps = HPSv2(FakeOpenClip(), fake_open_clip_tokenizer, image_size=16)
    ir = ImageReward(FakeImageRewardModel(tokenizer))
    rm = WeightedReward([hps, ir], (1.0, 0.1))
    x = images(h=16, w=16)
    reward, logits = rm.reward_and_logits(x, PROMPTS)
    torch.testing.assert_close(reward, hps.reward(x, PROMPTS) + 0.1 * ir.reward(x, PROMPTS))
    torch.testing.assert_close(logits, hps.logits(x, PROMPTS) + 0.1 * ir.logits(x, PROMPTS))
    with pytest.raises(ValueError, match="weights"):
        WeightedReward([hps], (1.0, 0.1))


def test_compiled_image_encoders_score_as_eager(clip_folder):
    """image_encoders(): the modules the trainer compiles. Compiled in place, each adapter's reward, logits and
    gradient in the images stay eager's (CLIP from transformers; HPSv2 and ImageReward through the weighted
    expert, on stand-ins with their module layout)."""
    tokenizer = tiny_tokenizer(os.path.join(clip_folder, "ir_tokenizer3"))[0]
    experts = {
        "clip": ClipScore.from_pretrained(clip_folder),
        "weighted": WeightedReward(
            [
                HPSv2(FakeOpenClip(), fake_open_clip_tokenizer, image_size=16),
                ImageReward(FakeImageRewardModel(tokenizer)),
            ],
            (1.0, 0.1),
        ),
    }
    assert len(experts["weighted"].image_encoders()) == 2
    for name, rm in experts.items():
        x = images(h=32, w=32)

        def scored():
            pixels = x.clone().requires_grad_(True)
            reward, logits = rm.reward_and_logits(pixels, PROMPTS)
            reward.sum().backward()
            return reward.detach(), logits.detach(), pixels.grad

        eager = scored()
        for module in rm.image_encoders():
            module.compile()
        for ours, theirs in zip(scored(), eager):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)
        assert all(module._compiled_call_impl is not None for module in rm.image_encoders())


def test_preprocess_non_square():
    x = torch.rand(1, 3, 30, 60, dtype=torch.float64, requires_grad=True)
    y = preprocess(x, 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert y.shape == (1, 3, 16, 16) and y.dtype == torch.float64
    # shortest side 30 -> 16, long side 60 -> 32, centre crop keeps columns 8..24 (no antialiasing: torchvision
    # 0.16's tensor resize, the official code's)
    full = torch.nn.functional.interpolate(x, size=(16, 32), mode="bicubic", antialias=False, align_corners=False)
    torch.testing.assert_close(y, (full[..., 8:24] - 0.5) / 0.5)
    # torchvision's sizes: the long side truncated (30x47 -> 16x25), CenterCrop's offset rounded (round(4.5) = 4)
    odd = torch.rand(1, 3, 30, 47, dtype=torch.float64)
    full = torch.nn.functional.interpolate(odd, size=(16, 25), mode="bicubic", antialias=False, align_corners=False)
    torch.testing.assert_close(preprocess(odd, 16, mean=(0.5,) * 3, std=(0.5,) * 3), (full[..., 4:20] - 0.5) / 0.5)
    # fit="pad": the longest side to 16 (30x60 -> 8x16), 4 rows of zeros above and below, then normalised
    padded = preprocess(x, 16, mean=(0.5,) * 3, std=(0.5,) * 3, fit="pad")
    small = torch.nn.functional.interpolate(x, size=(8, 16), mode="bicubic", antialias=False, align_corners=False)
    torch.testing.assert_close(padded, (torch.nn.functional.pad(small, (0, 0, 4, 4)) - 0.5) / 0.5)
    with pytest.raises(ValueError, match="fit"):
        preprocess(x, 16, fit="stretch")
    with pytest.raises(ValueError, match="size: fit='pad' resizes to a square"):
        preprocess(x, (16, 24), fit="pad")
    assert preprocess(torch.rand(2, 3, 40, 24), (16, 16)).shape == (2, 3, 16, 16)
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        preprocess(torch.rand(3, 16, 16), 16)


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
@pytest.mark.parametrize("cls", [AestheticLinearHead, AestheticMLPHead])
def test_aesthetic_head_round_trip(tmp_path, ext, cls):
    torch.manual_seed(3)
    head = cls(8).eval()
    path = str(tmp_path / ("head" + ext))
    head.save(path)
    loaded = cls.from_file(path).eval()
    e = torch.randn(4, 8)
    torch.testing.assert_close(loaded(e), head(e))
    assert loaded.input_size == 8
    other = AestheticMLPHead if cls is AestheticLinearHead else AestheticLinearHead
    with pytest.raises(ValueError, match="not the expected aesthetic head"):
        other.from_file(path)


def test_factory_errors(clip_folder, tmp_path):
    with pytest.raises(
        ValueError, match="clip, pickscore, aesthetic, aesthetic_mlp, hpsv2, imagereward, weighted_hpsv2_imagereward"
    ):
        load_reward_model("fid", clip_folder)
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_reward_model("clip", missing)
    headless = tmp_path / "clip_without_head"
    headless.mkdir()
    (headless / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(FileNotFoundError, match="head"):
        load_reward_model("aesthetic", str(headless))
    # a path of the wrong kind: named before anything is built
    with pytest.raises(ValueError, match="reward_model_path: .*'aesthetic' needs a transformers CLIP folder"):
        load_reward_model("aesthetic", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="reward_model_path: the digits expert .*expert.safetensors"):
        load_reward_model("digits", clip_folder)
    with pytest.raises(ValueError, match="reward_model_path: the weighted expert needs .*hpsv2/ and imagereward/"):
        load_reward_model("weighted_hpsv2_img_reward", clip_folder)
    assert isinstance(load_reward_model("pick", clip_folder), PickScore)  # the official code's name


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
    with pytest.raises(ImportError, match="image-reward"):
        load_reward_model("img_reward", str(tmp_path))  # the official code's name


# -- latent proxy reward model ------------------------------------------------------------------------
def tiny_lrm(clip_folder, seed=0):
    torch.manual_seed(seed)
    return LatentRewardModel.from_clip(clip_folder, widths=(8, 16), groups=4)


def test_lrm_from_clip_copies_text_tower(clip_folder):
    lrm = tiny_lrm(clip_folder)
    clip = CLIPModel.from_pretrained(clip_folder)
    for k, v in clip.text_model.state_dict().items():
        torch.testing.assert_close(lrm.text_transformer.state_dict()[k], v)
    torch.testing.assert_close(lrm.text_projection.weight, clip.text_projection.weight)
    assert lrm.config["embed_dim"] == 8 and lrm.tokenizer is not None
    assert math.isclose(lrm.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_lrm_reward_is_the_cosine_and_logits_are_scaled(clip_folder):
    """The official latent_score_fn: the student's reward is the plain cosine (return_logits=False), the
    preference loss compares it × exp(logit_scale)."""
    lrm = tiny_lrm(clip_folder)
    with torch.no_grad():
        lrm.logit_scale.add_(0.7)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    s = lrm.logits(z, PROMPTS)
    assert s.shape == (2,) and s.dtype == torch.float32
    reward = lrm.reward(z, PROMPTS)
    with torch.no_grad():
        u = F.normalize(lrm.encode_latents(z), dim=-1)
        v = F.normalize(lrm.encode_text(PROMPTS), dim=-1)
    torch.testing.assert_close(reward, (u * v).sum(-1), rtol=1e-5, atol=1e-6)
    assert (reward.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(s, reward * lrm.logit_scale.exp(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lrm(z, PROMPTS), reward)
    ids = lrm.tokenize(PROMPTS)
    torch.testing.assert_close(lrm.logits(z, ids), s)
    s.sum().backward()
    assert z.grad.abs().sum() > 0 and lrm.logit_scale.grad is not None
    lrm.zero_grad()
    lrm.reward(z, PROMPTS).sum().backward()
    assert lrm.logit_scale.grad is None  # the reward does not depend on the scale
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


class _Payload:
    """Unpickling this would create a folder: the stand-in for a checkpoint that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_crafted_pickle_is_refused_and_never_runs(clip_folder, tmp_path):
    from rglcd_fast.reward.experts import load_state_file

    marker = str(tmp_path / "payload-ran")
    crafted = str(tmp_path / "aesthetic_linear.pth")
    torch.save({"weight": torch.zeros(1, 8), "bias": torch.zeros(1), "extra": _Payload(marker)}, crafted)
    with pytest.raises(ValueError, match="HPSv2: .* holds pickled objects besides tensors.*convert it once"):
        load_state_file(crafted, "HPSv2")
    with pytest.raises(ValueError, match="aesthetic head: .* holds pickled objects"):
        load_reward_model("aesthetic", clip_folder, head_path=crafted)
    assert not os.path.exists(marker)
    plain = str(tmp_path / "plain.pt")  # tensors under "state_dict", DDP's "module." prefix: loads
    torch.save({"state_dict": {"module.weight": torch.ones(1, 8), "module.bias": torch.zeros(1)}, "epoch": 3}, plain)
    assert set(load_state_file(plain, "HPSv2")) == {"weight", "bias"}
