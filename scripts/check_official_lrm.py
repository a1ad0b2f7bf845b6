"""Checks `--lrm-path FILE` / `rglcd-fast convert-lrm` against the official code itself, at full size: builds
rg-lcd's latent_ViT model with its own open_clip (open_clip_customized: CLIP from the latent_ViT config;
LatentCLIP is that model plus an SD VAE it downloads, which the LRM never uses), moves every weight off its
initial value, saves the state dict as open_clip's training loop does, reads the file back with rglcd_fast and
compares the image and text embeddings and the cosine on random latents and prompts (tokenised by open_clip for
the official model, by a transformers CLIPTokenizer over the same BPE for ours).

Needs the official source and its dependencies (torchvision, ftfy, regex, diffusers), which the tests do not:
    git clone https://github.com/Ji4chenLi/rg-lcd
    python scripts/check_official_lrm.py --open-clip-src rg-lcd/open_clip_customized/src
"""

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on the Moon, highly detailed; 8k!!",
    "café  crème — “quoted” ünïcödé, salt &amp; pepper, &lt;b&gt;",
    "",
    " ".join(["a very long prompt that open_clip truncates to its context of 77 tokens"] * 8),
]


def clip_tokenizer_from_open_clip(open_clip, folder):
    """A transformers CLIPTokenizer over open_clip's own BPE file (the vocabulary as its SimpleTokenizer builds
    it), padding with "!" (id 0) as SD 2.1's tokenizer and open_clip do: the tokens --lrm-path FILE reads."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--open-clip-src", required=True, help="rg-lcd's open_clip_customized/src")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    sys.path.insert(0, args.open_clip_src)
    import open_clip
    from official_code import verdict
    from open_clip.model import CLIP

    from rglcd_fast.reward.open_clip_lrm import lrm_from_open_clip, read_open_clip_checkpoint

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with open(os.path.join(args.open_clip_src, "open_clip", "model_configs", "latent_ViT.json")) as f:
        official = CLIP(**json.load(f))
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "epoch_1.pt")
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, path)
        ours = lrm_from_open_clip(read_open_clip_checkpoint(path), clip_tokenizer_from_open_clip(open_clip, folder))
    official, ours = official.to(dtype).eval(), ours.to(dtype).eval()

    tokens = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)
    latents = torch.randn(len(PROMPTS), 4, 64, 64, dtype=dtype)
    with torch.no_grad():
        image = (official.encode_image(latents), ours.encode_latents(latents))
        text = (official.encode_text(tokens), ours.encode_text(PROMPTS))  # ours tokenises with transformers
        cos = [(F.normalize(i, dim=-1) * F.normalize(t, dim=-1)).sum(-1) for i, t in zip(image, text)]
    print(f"official latent_ViT ({sum(p.numel() for p in official.parameters()) / 1e6:.0f}M parameters), {args.dtype}")
    for name, (theirs, mine) in {"image embedding": image, "text embedding": text, "cosine": cos}.items():
        error = (mine.double() - theirs.double()).abs().max().item()
        print(f"{name}: max |ours - official| = {error:.2e} (official's max |value| {theirs.abs().max().item():.2e})")
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    worst = max(((m - t).abs() / (1 + t.abs())).max().item() for t, m in (image, text, cos))
    return verdict(worst, tolerance)


if __name__ == "__main__":
    sys.exit(main())
