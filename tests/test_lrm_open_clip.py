"""The official RG-LCD latent reward model read into ours: an open_clip LatentCLIP of rg-lcd's latent_ViT layout
scores, and back-propagates, as open_clip computes it; the trainer reads the official --pretrained_latent_rm
file; `rglcd-fast convert-lrm` writes it as an LRM folder; files that are not one stop with one line.

The reference is a transcription of open_clip's CLIP (rg-lcd's open_clip_customized: transformer.py's
ResidualAttentionBlock, VisionTransformer with pool_type 'tok', model.py's CLIP.encode_text and LatentCLIP's
encode_image of 4-channel latents), with open_clip's parameter names, so its state_dict() is the official file's."""

import json
import string
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from tiny_pipeline import tiny_config, tiny_tokenizer
from torch import nn
from transformers import CLIPTokenizer

from rglcd_fast.reward import LatentRewardModel
from rglcd_fast.reward.open_clip_lrm import lrm_from_open_clip, read_open_clip_checkpoint
from rglcd_fast.train.trainer import Trainer

PROMPTS = ["a 7", "the digit three", "zero"]


class OpenClipBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x, attn_mask=None):  # x: [L, N, D], as open_clip's transformer runs
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenClipBlock(width, heads) for _ in range(layers))

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class OpenClipVisual(nn.Module):
    def __init__(self, in_chans, image_size, patch_size, width, layers, heads, embed_dim):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(in_chans, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OpenClipTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)[:, 0] @ self.proj


class OpenClipLatentCLIP(nn.Module):
    """rg-lcd's latent_ViT at a small size (its config: vision 4 channels, image 64, patch 4, width 512, 12
    layers; text ViT-H-14's 1024 × 24; embed 1024; head width 64 in both towers), plus a stand-in for the
    SD VAE that LatentCLIP holds as `vae`."""

    def __init__(self, vocab_size, context_length, image_size=16, patch_size=4, width=128, text_width=128, embed=32):
        super().__init__()
        self.visual = OpenClipVisual(4, image_size, patch_size, width, 2, width // 64, embed)
        self.transformer = OpenClipTransformer(text_width, 2, text_width // 64)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed))
        self.register_buffer("attn_mask", torch.full((context_length,) * 2, float("-inf")).triu(1), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))
        self.vae = nn.Conv2d(3, 8, 1)
        with torch.no_grad():  # every weight away from its initial value (zero biases, unit norms)
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def encode_image(self, latents):
        return self.visual(latents)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), attn_mask=self.attn_mask.to(x.dtype)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection  # the end-of-text token

    def cosine(self, latents, text):
        return (F.normalize(self.encode_image(latents), dim=-1) * F.normalize(self.encode_text(text), dim=-1)).sum(-1)


def open_clip_tokens(tokenizer, prompts):
    """open_clip's tokenize: start, BPE, end of text, then zeros (its pad id) to the context length."""
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length).input_ids
    ends = [row.index(tokenizer.eos_token_id) for row in ids]
    return torch.tensor([row[: end + 1] + [0] * (len(row) - end - 1) for row, end in zip(ids, ends)])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A character-level CLIP tokenizer whose end-of-text token has the highest id, as in CLIP's vocabulary
    (open_clip pools the argmax id), with one merge ("!!") and SD 2.1's pad token "!"."""
    folder = tmp_path_factory.mktemp("tokenizer")
    symbols = list(string.ascii_lowercase + string.digits + '!&"')
    vocab = symbols + [s + "</w>" for s in symbols] + ["!!</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n! !</w>\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12, pad_token="!")


def official(tokenizer, seed=0, **sizes):
    torch.manual_seed(seed)
    return OpenClipLatentCLIP(len(tokenizer), tokenizer.model_max_length, **sizes).double()


def save_official(model, path, layout):
    """The file as each official writer leaves it: open_clip's training loop (DDP `module.` prefix, the VAE
    inside), rg-lcd's checkpoint-<step>-rm.pt (VAE deleted), safetensors."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if layout == "open_clip":
        torch.save({"epoch": 3, "name": "latent_ViT", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "rg-lcd":
        state = {k: v for k, v in state.items() if not k.startswith("vae.")}
        torch.save({"global_step": 10, "optimizer": {"state": {}, "param_groups": []}, "latent_rm": state}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, path)
    return str(path)


@pytest.mark.parametrize("layout", ["open_clip", "rg-lcd", "safetensors"])
def test_the_official_latent_clip_scores_as_open_clip(tokenizer, tmp_path, layout):
    reference = official(tokenizer)
    path = save_official(
        reference, tmp_path / f"latent_vit.{'safetensors' if layout == 'safetensors' else 'pt'}", layout
    )
    lrm = lrm_from_open_clip(read_open_clip_checkpoint(path), tokenizer).double()
    assert lrm.config["vit_config"] == dict(latent_size=16, patch_size=4, width=128, layers=2, heads=2)
    assert lrm.text_config.num_attention_heads == 2 and lrm.config["embed_dim"] == 32

    latents = torch.randn(3, 4, 16, 16, dtype=torch.float64, requires_grad=True)
    cos = reference.cosine(latents, open_clip_tokens(tokenizer, PROMPTS))
    (expected_grad,) = torch.autograd.grad(cos.sum(), latents)
    ours = lrm.reward(latents, PROMPTS)
    (grad,) = torch.autograd.grad(ours.sum(), latents)
    torch.testing.assert_close(ours, cos.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(
        lrm.logits(latents, PROMPTS), (reference.logit_scale.exp() * cos).float(), rtol=1e-5, atol=1e-5
    )
    with torch.no_grad():  # the towers' embeddings, not only their cosine
        torch.testing.assert_close(lrm.encode_latents(latents), reference.encode_image(latents))
        torch.testing.assert_close(
            lrm.encode_text(PROMPTS), reference.encode_text(open_clip_tokens(tokenizer, PROMPTS))
        )


def test_prompts_are_tokenised_as_open_clip_does(tokenizer):
    """open_clip's cleaning (ftfy, HTML entities, whitespace, lower case) before the BPE, and a special token's
    text inside a prompt left to the BPE: "!!" is one token, not two pad tokens "!"."""
    lrm = lrm_from_open_clip(official(tokenizer).state_dict(), tokenizer)
    ids = lrm.tokenize(["  A &amp;amp; “B”!!  "])
    expected = tokenizer(['a & "b"!!'], split_special_tokens=True).input_ids[0]
    assert ids[0, : len(expected)].tolist() == expected and tokenizer.convert_ids_to_tokens(expected[-2]) == "!!</w>"
    assert (ids[0, len(expected) :] == tokenizer.pad_token_id).all()


def test_the_trainer_reads_the_official_pretrained_latent_rm_file(world, tmp_path):
    """--pretrained_latent_rm FILE: the run starts from its weights (the text tower reading the teacher's
    tokenizer) and fine-tunes them as the official code: the image tower's last 2 groups and the last text
    layers only."""
    teacher_tokenizer = tiny_tokenizer(str(tmp_path / "tokenizer"))[0]
    path = save_official(official(teacher_tokenizer).float(), tmp_path / "epoch_32.pt", "open_clip")
    trainer = Trainer(tiny_config(world, tmp_path / "run", reward_mode="lrm", lrm_path=path, lrm_learning_rate=None))
    lrm = trainer.guidance.lrm
    start = {
        k: v.to(trainer.device) for k, v in lrm_from_open_clip(read_open_clip_checkpoint(path)).state_dict().items()
    }
    assert all(torch.equal(v, start[k]) for k, v in lrm.state_dict().items())
    frozen = {n for n, p in lrm.named_parameters() if not p.requires_grad}
    assert "image_encoder.conv_in.weight" in frozen and "image_encoder.proj.weight" not in frozen
    outputs = trainer.train()
    moved = [k for k, v in lrm.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and not frozen & set(moved)
    saved = LatentRewardModel.from_pretrained(outputs["lrm"])
    assert (saved.config["image_tower"], saved.config["text_preprocessing"]) == ("vit", "open_clip")


def test_convert_lrm_writes_an_lrm_folder(tokenizer, tmp_path, capsys):
    from rglcd_fast import cli

    reference = official(tokenizer)
    path = save_official(reference, tmp_path / "epoch_1.pt", "open_clip")
    folder = tmp_path / "model" / "tokenizer"  # a model folder holding tokenizer/, as SD 2.1's
    tokenizer.save_pretrained(folder)
    out = str(tmp_path / "lrm")
    assert cli.main(["convert-lrm", path, "--tokenizer", str(folder.parent), "--out", out]) == 0
    assert "ViT 128×2 over 16² latents" in capsys.readouterr().out
    lrm = LatentRewardModel.from_pretrained(out).double()
    latents = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(
        lrm.reward(latents, PROMPTS[:2]),
        reference.cosine(latents, open_clip_tokens(tokenizer, PROMPTS[:2])).float(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_files_that_are_no_latent_vit_stop_with_one_line(tokenizer, tmp_path, capsys):
    from rglcd_fast import cli

    state = official(tokenizer).state_dict()
    cases = {
        "rn50.pt": (
            {
                "visual.conv1.weight": torch.zeros(32, 4, 3, 3),
                "visual.attnpool.positional_embedding": torch.zeros(5, 64),
            },
            "latent_RN50",
        ),
        "layer_scale.pt": ({**state, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(128)}, "no place.*ls_1"),
        "custom_text.pt": (
            {k if k.startswith(("visual.", "logit")) else f"text.{k}": v for k, v in state.items()},
            "own text tower: no token_embedding.weight",
        ),
        "not_tensors.pt": ({"state_dict": {"logit_scale": 1.0}}, "no state dict of tensors"),
    }
    for name, (content, match) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=f"lrm_path: .*{match}"):
            lrm_from_open_clip(read_open_clip_checkpoint(str(tmp_path / name)))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="lrm_path: .*notes.txt is not a torch checkpoint"):
        read_open_clip_checkpoint(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="lrm_path: no file"):
        read_open_clip_checkpoint(str(tmp_path / "missing.pt"))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "lrm"
    assert cli.main(["convert-lrm", str(tmp_path / "rn50.pt"), "--tokenizer", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("rglcd-fast convert-lrm: lrm_path: only open_clip latent_ViT")
    assert not out.exists()
