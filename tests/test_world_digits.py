"""The digits world's data: images, prompts, the split and the small tokenizer."""
import pytest
import torch
from transformers import CLIPTokenizer

from rglcd_fast.world import DIGIT_WORDS, DigitsDataset, load_digits, prompt_for, save_tokenizer, split_halves
from rglcd_fast.world.digits import PROMPT_TEMPLATES, to_rgb_images


def test_images_and_prompts():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,) and int(images.max()) == 16
    rgb = to_rgb_images(images[:5])
    assert rgb.shape == (5, 3, 32, 32) and rgb.min() >= -1 and rgb.max() <= 1
    assert torch.equal(rgb[:, 0], rgb[:, 2])  # grey: ink on paper
    blank = to_rgb_images(torch.zeros(1, 8, 8, dtype=torch.uint8))
    assert torch.all(blank == 1)  # no ink: white paper
    dataset = DigitsDataset(indices=[0, 1, 17])
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 32, 32) and item["label"] == int(labels[17])
    assert DIGIT_WORDS[item["label"]] in item["caption"]
    assert prompt_for(7) == "a handwritten digit seven" and prompt_for(7, 1) != prompt_for(7, 0)
    with pytest.raises(ValueError, match="label"):
        prompt_for(10)
    with pytest.raises(ValueError, match="images"):
        to_rgb_images(images[0])


def test_split_halves_disjoint_and_covering():
    a, b = split_halves(1797, seed=0)
    assert len(a) == 898 and len(b) == 899
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(set(a.tolist()) | set(b.tolist())) == 1797
    assert torch.equal(split_halves(1797, seed=0)[0], a) and not torch.equal(split_halves(1797, seed=1)[0], a)


def test_tokenizer_keeps_prompt_words_whole(tmp_path):
    save_tokenizer(str(tmp_path))
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    for label in range(10):
        for i in range(len(PROMPT_TEMPLATES)):
            prompt = prompt_for(label, i)
            tokens = tokenizer.tokenize(prompt)
            assert len(tokens) == len(prompt.replace(",", " ,").split()), (prompt, tokens)
            assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids[1:-1]
    # other text still tokenises, letter by letter, without unknown tokens
    ids = tokenizer("a blurry zebra 42").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(tokenizer("a handwritten digit seven", padding="max_length").input_ids) == 16
