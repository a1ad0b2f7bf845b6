"""The embedded default world the main job runs on (docs/design.md §4)."""
from .classifiers import DigitClassifier, DigitReward, load_classifier, prompted_digit, train_classifier
from .digits import (DIGIT_WORDS, DigitsDataset, load_digits, prompt_for, save_tokenizer, split_halves,
                     to_rgb_images, vocabulary)
from .teacher import (TEACHER_DIR, build_scheduler, build_text_encoder, build_unet, build_vae, encode_latents,
                      load_teacher, make_teacher, reconstruction_accuracy, sample_accuracy, train_unet, train_vae)

__all__ = ["DigitClassifier", "DigitReward", "load_classifier", "prompted_digit", "train_classifier", "DIGIT_WORDS", "DigitsDataset", "load_digits", "prompt_for", "save_tokenizer", "split_halves",
           "to_rgb_images", "vocabulary", "TEACHER_DIR", "build_scheduler", "build_text_encoder", "build_unet",
           "build_vae", "encode_latents", "load_teacher", "make_teacher", "reconstruction_accuracy", "sample_accuracy",
           "train_unet", "train_vae"]
