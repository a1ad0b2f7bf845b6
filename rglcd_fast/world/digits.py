"""The data of the embedded default world (docs/design.md §4): the 1,797 handwritten digits scikit-learn
ships (8×8, 17 grey levels), as 32×32 RGB images of dark ink on white paper with prompts like
"a handwritten digit seven", a fixed split into two halves (one for the expert reward model, the
other for the held-out evaluator), and the small vocabulary those prompts need.
"""

import json
import os

import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Paraphrases, chosen per sample by its index: the same image always gets the same prompt.
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the handwritten number {word}",
    "a digit {word}, written by hand",
    "a scanned handwritten {word}",
)
RESOLUTION = 32
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def load_digits():
    """(images uint8 [N, 8, 8] in 0..16, labels int64 [N]) from scikit-learn's copy of the UCI digits."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    return torch.from_numpy(data.images).to(torch.uint8), torch.from_numpy(data.target).long()


def to_rgb_images(images: torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """[N, 8, 8] ink levels 0..16 -> [N, 3, R, R] float in [-1, 1], dark ink (-1) on white paper (+1),
    upsampled bilinearly (the strokes stay soft, as in the scans)."""
    if images.dim() != 3:
        raise ValueError(f"images: expected [N, H, W] ink levels, got shape {tuple(images.shape)}")
    paper = 1.0 - images.float()[:, None] / 16.0  # 1 = white, 0 = full ink
    upsampled = F.interpolate(paper, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (upsampled * 2.0 - 1.0).clamp(-1.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def prompt_for(label: int, index: int = 0) -> str:
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label: expected a digit 0-9, got {label}")
    return PROMPT_TEMPLATES[index % len(PROMPT_TEMPLATES)].format(word=DIGIT_WORDS[int(label)])


def split_halves(num_samples: int, seed: int = 0):
    """Two disjoint halves of the sample indices (a seeded permutation): the expert reward model trains
    on the first, the held-out evaluator on the second."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    half = num_samples // 2
    return order[:half].sort().values, order[half:].sort().values


class DigitsDataset(torch.utils.data.Dataset):
    """Items as rglcd_fast.train.data yields them: {"pixel_values": [3, R, R] in [-1, 1], "caption": str},
    plus the label."""

    def __init__(self, indices=None, resolution: int = RESOLUTION):
        images, labels = load_digits()
        self.indices = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices).long()
        self.images = to_rgb_images(images[self.indices], resolution)
        self.labels = labels[self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        label = int(self.labels[i])
        return {"pixel_values": self.images[i], "caption": prompt_for(label, int(self.indices[i])), "label": label}


def vocabulary() -> list[str]:
    """Every word of every prompt (word-final '</w>' form, as CLIP's BPE ends words), the letters and
    digits alone and word-final (so any other text still tokenises, letter by letter), and CLIP's
    special tokens."""
    words = sorted(
        {
            w.strip(",")
            for template in PROMPT_TEMPLATES
            for word in DIGIT_WORDS
            for w in template.format(word=word).split()
        }
    )
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789,")
    return list(_SPECIAL_TOKENS) + symbols + [s + "</w>" for s in symbols] + [w + "</w>" for w in words if len(w) > 1]


def save_tokenizer(folder: str, model_max_length: int = 16):
    """A CLIPTokenizer over vocabulary(): vocab.json + merges.txt (the merges that build each prompt word
    from its letters), saved with save_pretrained so diffusers pipelines load it as usual."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = vocabulary()
    merges, tokens = [], list(vocab)
    for token in vocab:
        if not token.endswith("</w>") or len(token) <= 5:  # a single symbol + </w>: no merge needed
            continue
        word = token[:-4]
        # merge left to right: w + o -> wo, wo + r -> wor, ..., then + d</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{current} {piece}")
            current = current + piece
            if current not in tokens:
                tokens.append(current)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer
