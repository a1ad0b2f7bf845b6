"""The digits world's pre-trained latent reward model (DESIGN.md §4 and §1 step 9): `rglcd-fast pretrain-lrm`'s
digits preset (a conv tower over the teacher's 4×8×8 latents, the teacher's text encoder as the text tower,
the contrastive loss plus the digits expert's preferences), shipped in rglcd_fast/world/weights/lrm/ and used
by `rglcd-fast train` with no arguments.

Rebuild it (fixed seed) with `python -m rglcd_fast.world.lrm` or as part of `rglcd-fast make-world`."""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

from .classifiers import WEIGHTS_DIR

LRM_DIR = os.path.join(WEIGHTS_DIR, "lrm")


def build_digits_lrm(out: str = LRM_DIR, teacher_dir: str | None = None, classifiers_dir: str = WEIGHTS_DIR, seed: int = 0,
             progress: bool = True, **overrides) -> str:
    """Pre-trains the digits LRM with the digits preset (overrides on top) against the teacher folder
    (default: the shipped one) and the digits expert in classifiers_dir, on CUDA when available (as the
    pre-trainer's accelerator); writes it to `out`. Prints its pairwise accuracy against the expert on freshly drawn
    candidates, beside a random LRM's."""
    from ..reward import load_reward_model
    from ..train.checkpoint import write_folder
    from ..train.config import DIGITS_LRM_PRESET, LRMPretrainConfig
    from ..train.lrm_pretrain import LRMPretrainer, preference_accuracy
    from ..train.models import Teacher, make_lrm
    from .digits import DigitsDataset
    from .teacher import TEACHER_DIR

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = Teacher.from_pretrained(teacher_dir or TEACHER_DIR, device, torch.float32)
    expert = load_reward_model("digits", classifiers_dir, device=device)
    dataset = DigitsDataset(resolution=teacher.default_resolution)
    with tempfile.TemporaryDirectory() as work:
        config = LRMPretrainConfig(**{**DIGITS_LRM_PRESET, "teacher": teacher.folder, "seed": seed, "output_dir": work,
                                      "progress": progress, **overrides})
        trainer = LRMPretrainer(config, teacher=teacher, dataset=dataset, reward_model=expert)
        trainer.train()
        lrm = trainer.model.eval()
        write_folder(out, lrm.save_pretrained)
    torch.manual_seed(seed)
    untrained = make_lrm(teacher, config.lrm_widths, config.lrm_embed_dim).to(device).eval()
    accuracy = {name: preference_accuracy(model, teacher, expert, dataset) for name, model in
                (("pre-trained", lrm), ("random", untrained))}
    print(f"digits LRM saved to {out}; pairwise accuracy against the expert on fresh candidates: "
          f"{accuracy['pre-trained']:.3f} (a random LRM: {accuracy['random']:.3f})")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rglcd_fast.world.lrm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=LRM_DIR, help="the LRM folder to write (default: the shipped one)")
    parser.add_argument("--teacher", default=None, help="the teacher folder (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a pretrain-lrm setting over the digits preset (VALUE as JSON), e.g. max_train_steps=6000")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:  # a bare word: a string setting (image_tower=vit)
            overrides[key] = value
    start = time.perf_counter()
    build_digits_lrm(args.out, args.teacher, seed=args.seed, **overrides)
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
