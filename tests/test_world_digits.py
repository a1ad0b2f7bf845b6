"""The digits world's data: images, prompts, the split and the small tokenizer."""

import pytest
import torch
from transformers import CLIPTokenizer

from rglcd_fast.world import (
    DIGIT_WORDS,
    DigitReward,
    DigitsDataset,
    load_classifier,
    load_digits,
    prompt_for,
    prompted_digit,
    save_tokenizer,
    split_halves,
    train_classifier,
)
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


def test_shipped_classifiers_generalise_to_the_other_half():
    images, labels = load_digits()
    for name, half in (("expert", 0), ("evaluator", 1)):
        held_out = DigitsDataset(split_halves(len(labels))[1 - half])
        with torch.no_grad():
            accuracy = (load_classifier(name)(held_out.images).argmax(1) == held_out.labels).float().mean()
        assert accuracy > 0.95, (name, accuracy)


def test_digit_reward_is_the_prompted_probability_and_logits_the_prompted_logit():
    reward = DigitReward.from_pretrained()
    data = DigitsDataset(indices=[3, 4])
    images = ((data.images + 1) / 2).requires_grad_()
    prompts = [prompt_for(int(data.labels[0])), "a handwritten digit two"]
    probability, prompted_logit = reward.reward_and_logits(images, prompts)
    logits = reward.classifier(images * 2 - 1)
    torch.testing.assert_close(prompted_logit, torch.stack([logits[0, int(data.labels[0])], logits[1, 2]]))
    p = logits.softmax(1)
    torch.testing.assert_close(probability, torch.stack([p[0, int(data.labels[0])], p[1, 2]]))
    assert ((probability >= 0) & (probability <= 1)).all()
    torch.testing.assert_close(reward.reward(images, prompts), probability)
    torch.testing.assert_close(reward.logits(images, prompts), prompted_logit)
    (grad,) = torch.autograd.grad(probability.sum(), images)
    assert grad.abs().sum() > 0 and all(p.grad is None and not p.requires_grad for p in reward.parameters())
    assert reward.reward(torch.nn.functional.interpolate(images, size=64), prompts).shape == (2,)
    assert prompted_digit("The handwritten number NINE") == 9
    with pytest.raises(ValueError, match="prompts"):
        reward.reward(images, ["a cat", "a dog"])


def test_classifier_training_is_deterministic():
    a, b = train_classifier("expert", epochs=1), train_classifier("expert", epochs=1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    with pytest.raises(FileNotFoundError, match="expert"):
        load_classifier("expert", folder="/nonexistent")
