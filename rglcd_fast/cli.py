"""The `rglcd-fast` command line."""
import argparse
import sys
import time


def _sample(args) -> int:
    import torch
    from tqdm import tqdm

    from .sample import LCMSampler, image_grid

    dtype = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sampler = LCMSampler.from_pretrained(args.model, lora=args.lora, device=args.device, dtype=dtype)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    start = time.perf_counter()
    with tqdm(total=args.steps, desc="LCM steps", disable=args.quiet) as progress:
        images = sampler(prompts, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                         height=args.height, width=args.width, cuda_graph=args.cuda_graph, progress=progress)
    seconds = time.perf_counter() - start
    image_grid(images, columns=args.num_images).save(args.out)
    print(f"wrote {args.out}: {len(images)} image(s), {args.steps} step(s), {seconds:.2f} s on {sampler.device}")
    return 0


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
        print(f'sample from it: rglcd-fast sample --model {outputs["pipeline"]}{lora} --prompt "{prompt}" '
              f"--steps 2 --num-images 4 --out grid.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rglcd-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="few-step LCM sampling from a diffusers-format model folder",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample.add_argument("--model", required=True, help="diffusers Stable Diffusion folder with an LCM UNet "
                        "(or a base model with --lora)")
    sample.add_argument("--lora", default=None, help="LCM-LoRA weights (file or folder) to fuse into the UNet")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sample.add_argument("--num-images", type=int, default=1, help="images per prompt (one grid column each)")
    sample.add_argument("--steps", type=int, default=4, help="LCM steps (1-8)")
    sample.add_argument("--guidance-scale", type=float, default=8.0, help="w of the guidance embedding + 1")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--height", type=int, default=None, help="pixels (default: the model's size)")
    sample.add_argument("--width", type=int, default=None, help="pixels (default: the model's size)")
    sample.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    sample.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                        help="auto: fp16 on CUDA, fp32 on the CPU")
    sample.add_argument("--cuda-graph", action="store_true", help="capture the denoising loop in a CUDA graph")
    sample.add_argument("--out", default="grid.png", help="the image grid to write (PNG)")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(run=_sample)

    train = commands.add_parser("train", help="RG-LCD distillation; with no arguments, on the embedded digits world",
                                description="RG-LCD training (DESIGN.md §1). Settings come from the defaults (the "
                                "digits world preset when --teacher is digits), then --config, then the flags.")
    from .train.config import add_arguments
    add_arguments(train)
    train.set_defaults(run=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    errors = (FileNotFoundError, ValueError)
    if args.command == "train":
        from .train.trainer import NonFiniteLossError
        errors += (NonFiniteLossError,)
    try:
        return args.run(args)
    except errors as error:
        print(f"rglcd-fast {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
