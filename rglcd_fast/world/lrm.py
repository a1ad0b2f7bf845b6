"""The digits world's pre-trained latent reward model (docs/design.md §4 and §1 step 9): `rglcd-fast pretrain-lrm`'s
digits preset (a conv tower over the teacher's 4×8×8 latents, the teacher's text encoder as the text tower,
the contrastive loss plus the digits expert's preferences), shipped in rglcd_fast/world/weights/lrm/ and used
by `rglcd-fast train` with no arguments.

Rebuild it (fixed seed) with `python -m rglcd_fast.world.lrm` or as part of `rglcd-fast make-world`."""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

from .classifiers import WEIGHTS_DIR

LRM_DIR = os.path.join(WEIGHTS_DIR, "lrm")


def build_digits_lrm(
    out: str = LRM_DIR,
    teacher_dir: str | None = None,
    classifiers_dir: str = WEIGHTS_DIR,
    seed: int = 0,
    progress: bool = True,
    config_file: str | None = None,
    **overrides,
) -> str:
    """Pre-trains the digits LRM with the digits preset (then config_file's settings, then overrides) against the
    teacher folder (default: the shipped one) and the digits expert in classifiers_dir, on CUDA when available (as
    the pre-trainer's accelerator); writes it to `out`. Prints its pairwise accuracy against the expert on freshly
    drawn candidates, beside a random LRM's."""
    from ..files import write_folder
    from ..reward import load_reward_model
    from ..train.config import LRMPretrainConfig, make_config
    from ..train.lrm_pretrain import LRMPretrainer, preference_accuracy
    from ..train.models import Teacher, make_lrm
    from .digits import DigitsDataset
    from .teacher import TEACHER_DIR

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = Teacher.from_pretrained(teacher_dir or TEACHER_DIR, device, torch.float32)
    expert = load_reward_model("digits", classifiers_dir, device=device)
    dataset = DigitsDataset(resolution=teacher.default_resolution)
    with tempfile.TemporaryDirectory() as work:
        config = make_config(
            config_file,
            LRMPretrainConfig,
            **{**overrides, "teacher": "digits", "seed": seed, "output_dir": work, "progress": progress},
        )
        config.teacher = teacher.folder  # the digits preset applies to a teacher folder given as teacher_dir too
        trainer = LRMPretrainer(config, teacher=teacher, dataset=dataset, reward_model=expert)
        trainer.train()
        lrm = trainer.model.eval()
        write_folder(out, lrm.save_pretrained)
    torch.manual_seed(seed)
    untrained = make_lrm(teacher, config.lrm_widths, config.lrm_embed_dim).to(device).eval()
    accuracy = {
        name: preference_accuracy(model, teacher, expert, dataset)
        for name, model in (("pre-trained", lrm), ("random", untrained))
    }
    print(
        f"digits LRM saved to {out}; pairwise accuracy against the expert on fresh candidates: "
        f"{accuracy['pre-trained']:.3f} (a random LRM: {accuracy['random']:.3f})"
    )
    return out


def main(argv=None) -> int:
    from ..train.config import LRMPretrainConfig, add_arguments

    parser = argparse.ArgumentParser(
        prog="python -m rglcd_fast.world.lrm", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--out", default=LRM_DIR, help="the LRM folder to write (default: the shipped one)")
    add_arguments(parser, LRMPretrainConfig)  # --config and every pretrain-lrm setting, over the digits preset
    parser.set_defaults(teacher=None, seed=0)  # the shipped teacher folder
    args = parser.parse_args(argv)
    if "output_dir" in vars(args):
        parser.error("--output-dir: the LRM folder is --out here")
    names = {f.name for f in dataclasses.fields(LRMPretrainConfig)} - {"teacher", "seed"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    start = time.perf_counter()
    build_digits_lrm(
        args.out,
        args.teacher,
        seed=args.seed,
        config_file=args.config,
        progress=overrides.pop("progress", True),
        **overrides,
    )
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
