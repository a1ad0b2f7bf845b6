"""The README's digits picture: the quick start's sample (`rglcd-fast sample ... --out digits.png`) over eight
real sevens of the training data, both 4× enlarged (nearest neighbour, so no detail is invented).

    python scripts/readme_digits_figure.py digits.png results/readme_digits_seven.png
"""

import sys

import torch
from PIL import Image

from rglcd_fast.sample import image_grid
from rglcd_fast.world.digits import load_digits, to_rgb_images


def main(sample_path: str, out: str, scale: int = 4) -> None:
    sample = Image.open(sample_path).convert("RGB")
    images, labels = load_digits()
    real = to_rgb_images(images[labels == 7][:8])
    real = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in real]
    real_row = image_grid(real, columns=len(real))
    figure = Image.new("RGB", (max(sample.width, real_row.width), sample.height + real_row.height + 2), "white")
    figure.paste(sample, (0, 0))
    figure.paste(real_row, (0, sample.height + 2))
    figure.resize((figure.width * scale, figure.height * scale), Image.Resampling.NEAREST).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(*sys.argv[1:3])
