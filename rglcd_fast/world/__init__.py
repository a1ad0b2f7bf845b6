"""The embedded default world the main job runs on (DESIGN.md §4)."""
from .digits import (DIGIT_WORDS, DigitsDataset, load_digits, prompt_for, save_tokenizer, split_halves,
                     to_rgb_images, vocabulary)

__all__ = ["DIGIT_WORDS", "DigitsDataset", "load_digits", "prompt_for", "save_tokenizer", "split_halves",
           "to_rgb_images", "vocabulary"]
