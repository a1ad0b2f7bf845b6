"""The `rglcd-fast` command line."""

import argparse
import os
import sys
import time


def _sample(args) -> int:
    import torch
    from tqdm import tqdm

    from .sample import LCMSampler, image_grid

    _check_image_path(args.out, "--out")
    dtype = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sampler = LCMSampler.from_pretrained(args.model, lora=args.lora, device=args.device, dtype=dtype)
    if args.compile:
        sampler.compile(args.compile)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    start = time.perf_counter()
    with tqdm(total=args.steps, desc="LCM steps", disable=args.quiet) as progress:
        images = sampler(
            prompts,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            height=args.height,
            width=args.width,
            cuda_graph=args.cuda_graph,
            progress=progress,
        )
    seconds = time.perf_counter() - start
    image_grid(images, columns=args.num_images).save(args.out)
    print(f"wrote {args.out}: {len(images)} image(s), {args.steps} step(s), {seconds:.2f} s on {sampler.device}")
    return 0


def _check_image_path(path, name) -> None:
    """Before any work: a file name whose extension Pillow writes, in an existing folder."""
    from PIL import Image

    Image.init()
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise ValueError(f"{name}: {path!r} has no image extension Pillow writes (e.g. .png)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{name}: the folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{name}: {path!r} is a folder")


def _train(args) -> int:
    from .train.config import config_from_args
    from .train.trainer import Trainer

    trainer = Trainer(config_from_args(args))
    outputs = trainer.train()
    trainer.finish()
    if trainer.accelerator.is_main_process:
        print(f"student (diffusers LCM pipeline): {outputs['pipeline']}")
        for name in ("lora", "unet_target", "lrm", "samples", "logs"):
            if outputs.get(name):
                print(f"{name}: {outputs[name]}")
        lora = f" --lora {outputs['lora']}" if "lora" in outputs else ""
        prompt = trainer.validation_prompts()[0]
        print(
            f'sample from it: rglcd-fast sample --model {outputs["pipeline"]}{lora} --prompt "{prompt}" '
            f"--steps 2 --num-images 4 --out grid.png"
        )
    return 0


def _pretrain_lrm(args) -> int:
    from .train.config import LRMPretrainConfig, config_from_args
    from .train.lrm_pretrain import LRMPretrainer

    trainer = LRMPretrainer(config_from_args(args, LRMPretrainConfig))
    outputs = trainer.train()
    trainer.finish()
    if trainer.accelerator.is_main_process:
        print(f"latent reward model: {outputs['lrm']} (train with it: rglcd-fast train --lrm-path {outputs['lrm']})")
        print(f"logs: {outputs['logs']}")
    return 0


def _convert_lrm(args) -> int:
    from .reward.experts import _load_clip_tokenizer
    from .reward.open_clip_lrm import lrm_from_open_clip, read_open_clip_checkpoint

    tokenizer = _load_clip_tokenizer(args.tokenizer)
    lrm = lrm_from_open_clip(read_open_clip_checkpoint(args.checkpoint), tokenizer)
    lrm.save_pretrained(args.out)
    vit = lrm.config["vit_config"]
    print(
        f"latent reward model: {args.out} (ViT {vit['width']}×{vit['layers']} over {vit['latent_size']}² latents, "
        f"text {lrm.text_config.hidden_size}×{lrm.text_config.num_hidden_layers}, embed {lrm.config['embed_dim']}; "
        f"train with it: rglcd-fast train --lrm-path {args.out})"
    )
    return 0


def _make_world(argv) -> int:
    from .world.teacher import main as make_world

    return make_world(argv, prog="rglcd-fast make-world")


def _positive_int(text: str) -> int:
    """argparse type: argparse names the flag in the error."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _lcm_steps(text: str) -> int:
    from .sample.sampler import MAX_STEPS

    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_STEPS} LCM steps, got {text!r}")
    return int(text)


def _seeds(text: str) -> list:
    seeds = text.replace(",", " ").split()
    if not seeds or not all(s.isdigit() for s in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds >= 0 separated by commas, e.g. 0,1,2; got {text!r}")
    return [int(s) for s in seeds]


def commit_id() -> str:
    """The commit measured: $RGLCD_COMMIT where set (the device machine's copy of the tree may hold a stale
    .git), else this checkout's short HEAD, else "unknown"."""
    import subprocess

    try:
        return (
            os.environ.get("RGLCD_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def _table_header(title: str, args, seeds) -> str:
    import datetime

    import torch

    commit = commit_id()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (
        f"# {title}\n\n{datetime.date.today()}, torch {torch.__version__}, commit {commit}; students trained on "
        f"{device}, sampled and scored on the CPU ({os.cpu_count()} cores). {args.per_digit} samples per digit "
        f'(prompt "a handwritten digit <word>"), the same initial noise in every row; LCM rows at guidance '
        f"scale 8 (w = 7); mean ± std over training seeds {', '.join(map(str, seeds))} (each seed also draws "
        f"the rows' initial noise). Produced by:\n\n    rglcd-fast {args.command} {' '.join(args.argv)}\n\n"
    )


def _eval(args) -> int:
    from .world.evaluate import VARIANTS, evaluate, markdown_table, run_folder, train_runs
    from .world.teacher import TEACHER_DIR

    seeds = args.seeds
    extra = {} if args.train_steps is None else {"max_train_steps": args.train_steps}
    runs = {name: [run_folder(args.work_dir, name, seed) for seed in seeds] for name in VARIANTS}
    train_runs(
        {
            folder: {**VARIANTS[name], **extra, "seed": seed}
            for name, folders in runs.items()
            for seed, folder in zip(seeds, folders)
        },
        jobs=args.jobs,
        quiet=args.quiet,
    )
    out_dir = os.path.splitext(args.out)[0]
    rows = evaluate(runs, TEACHER_DIR, out_dir, per_digit=args.per_digit, steps=tuple(args.steps), seeds=seeds)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(
            _table_header("Digits world: teacher vs LCD vs RG-LCD", args, seeds)
            + markdown_table(rows, relative_to=os.path.dirname(os.path.abspath(args.out)))
        )
    print(markdown_table(rows))
    print(f"wrote {args.out} and one sample grid per row in {out_dir}/")
    return 0


def _sweep(args) -> int:
    from .world.evaluate import (
        REWARD_VARIANTS,
        evaluate,
        markdown_table,
        plot_reward_vs_frechet,
        run_folder,
        train_runs,
    )
    from .world.teacher import TEACHER_DIR

    seeds = args.seeds
    extra = {} if args.train_steps is None else {"max_train_steps": args.train_steps}
    runs, settings = {"LCD": [run_folder(args.work_dir, "LCD", s) for s in seeds]}, {}
    settings.update({folder: {"reward_mode": "none", **extra, "seed": s} for s, folder in zip(seeds, runs["LCD"])})
    for name, variant in REWARD_VARIANTS.items():
        for scale in args.reward_scales:
            row = runs[f"{name} @ {scale:g}"] = [run_folder(args.work_dir, name, s, scale) for s in seeds]
            settings.update(
                {folder: {**variant, **extra, "reward_scale": scale, "seed": s} for s, folder in zip(seeds, row)}
            )
    train_runs(settings, jobs=args.jobs, quiet=args.quiet)
    stem = os.path.splitext(args.out)[0]
    rows = evaluate(runs, TEACHER_DIR, stem, per_digit=args.per_digit, steps=(args.steps,), seeds=seeds)
    plot_reward_vs_frechet(
        rows,
        args.out,
        f"digits world, {args.steps}-step students (teacher: DDIM-50), {len(seeds)} seed(s); labels: reward_scale",
    )
    with open(stem + ".md", "w") as f:
        f.write(
            _table_header("Digits world: expert reward against Fréchet distance over reward_scale", args, seeds)
            + f"![reward vs Fréchet distance]({os.path.basename(args.out)})\n\n"
            + markdown_table(rows, relative_to=os.path.dirname(os.path.abspath(args.out)))
        )
    print(markdown_table(rows))
    print(f"wrote {args.out}, {stem}.md and one sample grid per row in {stem}/")
    return 0


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless it is None, a switch's False, or the help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .sample.sampler import COMPILE_MODES

    parser = argparse.ArgumentParser(prog="rglcd-fast", description=__doc__, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser(
        "sample",
        allow_abbrev=False,
        help="few-step LCM sampling from a diffusers-format model folder",
        formatter_class=_DefaultsHelp,
    )
    sample.add_argument(
        "--model",
        required=True,
        help="diffusers Stable Diffusion folder with an LCM UNet (or a base model with --lora)",
    )
    sample.add_argument("--lora", default=None, help="LCM-LoRA weights (file or folder) to fuse into the UNet")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sample.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt (one grid column each)")
    sample.add_argument("--steps", type=int, default=4, help="LCM steps (1-8)")
    sample.add_argument("--guidance-scale", type=float, default=8.0, help="w of the guidance embedding + 1")
    sample.add_argument("--seed", type=int, default=0, help="seeds the initial noise")
    sample.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    sample.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    sample.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    sample.add_argument(
        "--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="auto: fp16 on CUDA, fp32 on the CPU"
    )
    sample.add_argument(
        "--cuda-graph", action="store_true", help="capture the whole run (text encoders to image bytes) in a CUDA graph"
    )
    sample.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile the UNet and the VAE decoder (mode, default: default); the first call compiles "
        "(a minute or more at SD scale), so it pays off over many calls in one process",
    )
    sample.add_argument("--out", default="grid.png", help="the image grid to write (PNG)")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(run=_sample)

    train = commands.add_parser(
        "train",
        allow_abbrev=False,
        help="RG-LCD distillation; with no arguments, on the embedded digits world",
        description="RG-LCD training (docs/design.md §1). Settings come from the defaults (the "
        "digits world preset when --teacher is digits), then --config, then the flags.",
    )
    from .train.config import add_arguments

    add_arguments(train)
    train.set_defaults(run=_train)

    pretrain = commands.add_parser(
        "pretrain-lrm",
        allow_abbrev=False,
        help="pre-train a latent reward model (latent CLIP) offline; on the digits world by default",
        description="The LRM as a latent CLIP: a contrastive loss between the teacher's VAE latents and captions, "
        "plus the expert's preferences between real latents and the teacher's one-step predictions. Settings as "
        "for train: defaults (the digits preset when --teacher is digits), then --config, then the flags.",
    )
    from .train.config import LRMPretrainConfig

    add_arguments(pretrain, LRMPretrainConfig)
    pretrain.set_defaults(run=_pretrain_lrm)

    convert = commands.add_parser(
        "convert-lrm",
        allow_abbrev=False,
        help="an official RG-LCD latent CLIP (open_clip latent_ViT checkpoint) as an LRM folder",
        description="Reads the official code's --pretrained_latent_rm file (open_clip's training checkpoint, "
        "rg-lcd's checkpoint-<step>-rm.pt, a state dict or .safetensors) and writes it as an LRM folder of ours, "
        "with the tokenizer given. `train --lrm-path FILE` reads such a file directly (with the teacher's "
        "tokenizer).",
    )
    convert.add_argument("checkpoint", help="the open_clip latent_ViT checkpoint")
    convert.add_argument(
        "--tokenizer",
        required=True,
        help="a CLIP tokenizer folder, or a model folder holding tokenizer/ (e.g. SD 2.1's): CLIP's BPE, the "
        "vocabulary of open_clip's ViT-H-14 tokenizer",
    )
    convert.add_argument("--out", required=True, help="the LRM folder to write")
    convert.set_defaults(run=_convert_lrm)

    # listed here for the help; main() hands its arguments to python -m rglcd_fast.world.teacher's own parser
    commands.add_parser("make-world", help="rebuild the digits world (classifiers, teacher) from scratch")

    def comparison(name, help, out):
        command = commands.add_parser(name, help=help, allow_abbrev=False, formatter_class=_DefaultsHelp)
        command.add_argument(
            "--work-dir",
            default="rglcd-eval",
            help="where the students are trained / found "
            "(<work-dir>/<row>/[scale-<s>/]seed-<n>; reused only with the same settings)",
        )
        command.add_argument(
            "--seeds", type=_seeds, default="0,1,2", help="training seeds, e.g. 0,1,2 (mean ± std over them)"
        )
        command.add_argument(
            "--train-steps", type=_positive_int, default=None, help="training steps (default: the preset's)"
        )
        command.add_argument("--per-digit", type=_positive_int, default=50, help="samples per digit in every row")
        command.add_argument(
            "--jobs",
            type=_positive_int,
            default=1,
            help="students trained at once (rglcd-fast train processes, the CPU's threads split between them)",
        )
        command.add_argument("--out", default=out, help="the table / the plot (grids go next to it)")
        command.add_argument("--quiet", action="store_true")
        return command

    evaluation = comparison(
        "eval", "the digits world comparison table (trains the students first)", "results/digits_eval.md"
    )
    evaluation.add_argument("--steps", type=_lcm_steps, nargs="+", default=[1, 2, 4], help="LCM step counts")
    evaluation.set_defaults(run=_eval)
    sweep = comparison(
        "sweep",
        "the digits world's expert reward against Fréchet distance over reward_scale (trains the students first)",
        "results/reward_vs_frechet.png",
    )
    sweep.add_argument("--reward-scales", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    sweep.add_argument("--steps", type=_lcm_steps, default=2, help="LCM steps")
    sweep.set_defaults(run=_sweep)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["make-world"]:
        return _make_world(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    errors = (FileNotFoundError, ValueError)
    if args.command in ("train", "pretrain-lrm"):
        from .train.trainer import CheckpointWriteError, NonFiniteLossError

        errors += (NonFiniteLossError, CheckpointWriteError)
    try:
        return args.run(args)
    except errors as error:
        print(f"rglcd-fast {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
