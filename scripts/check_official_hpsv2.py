"""Checks the HPSv2 expert (rglcd_fast.reward.HPSv2, the official RG-LCD default reward) against the official
score function itself: rg-lcd's reward_fn.get_hpsv2_fn, run verbatim (HPSv2's own open_clip, its
light_augmentation transforms, its tokenizer), and ours (the open_clip_torch package) on the same HPSv2
checkpoint, the same images and prompts: the reward (cos) and the logits (exp(logit_scale)·cos), and the
reward's gradient in the images (the direct mode differentiates through it).

HPS_v2.1_compressed.pt cannot be downloaded here, so the checkpoint is a ViT-H-14 with random weights saved as
that file, where get_hpsv2_fn reads it ($HOME/.cache/hpsv2/, HOME pointed at a temporary folder). rg-lcd pins
torchvision 0.16.2, whose tensor resize does not antialias; the check runs torchvision's resize that way.
Needs torchvision, open_clip_torch, timm, ftfy, diffusers and the two official sources, which the tests do not:
    git clone https://github.com/Ji4chenLi/rg-lcd; git clone https://github.com/tgxs002/HPSv2
    python scripts/check_official_hpsv2.py --rg-lcd-src rg-lcd --hpsv2-src HPSv2
"""

import argparse
import os
import sys
import tempfile

import torch

PROMPTS = ["a photo of a cat on a sofa", "An astronaut riding a horse, highly detailed!!"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rg-lcd-src", required=True, help="a checkout of Ji4chenLi/rg-lcd")
    parser.add_argument("--hpsv2-src", required=True, help="a checkout of tgxs002/HPSv2")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 384), help="the images' height and width")
    args = parser.parse_args(argv)
    sys.path[:0] = [args.rg_lcd_src, args.hpsv2_src]
    from hpsv2.src.open_clip import create_model
    from official_code import resize_tensors_as_torchvision_0_16, verdict

    from rglcd_fast.reward import HPSv2

    resize_tensors_as_torchvision_0_16()
    with tempfile.TemporaryDirectory() as home:
        os.environ["HOME"] = home
        checkpoint = os.path.join(home, ".cache", "hpsv2", "HPS_v2.1_compressed.pt")
        os.makedirs(os.path.dirname(checkpoint))
        torch.manual_seed(0)
        model = create_model("ViT-H-14", pretrained=None)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
            model.logit_scale.fill_(4.2)
        torch.save(model.state_dict(), checkpoint)
        del model
        import reward_fn  # rg-lcd's, with HPSv2's open_clip on the path

        official = reward_fn.get_hpsv2_fn(precision="fp32")
        ours = HPSv2.from_pretrained(checkpoint)

    images = torch.rand(len(PROMPTS), 3, *args.size)

    def scored(reward_and_logits):
        """(reward, logits, d reward / d images)"""
        x = images.clone().requires_grad_(True)
        reward, logits = reward_and_logits(x)
        (grad,) = torch.autograd.grad(reward.sum(), x)
        return reward.detach(), logits.detach(), grad

    theirs_all = scored(lambda x: (official(x, PROMPTS), official(x.detach(), PROMPTS, return_logits=True)))
    mine_all = scored(lambda x: ours.reward_and_logits(x, PROMPTS))
    worst = 0.0
    for what, theirs, mine in zip(("reward", "logits", "d reward / d images"), theirs_all, mine_all):
        error = (mine - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-30)
        worst = max(worst, error)
        print(f"{what}: official {theirs.flatten()[:2].tolist()}, max relative |ours - official| = {error:.1e}")
    return verdict(worst, 1e-4)


if __name__ == "__main__":
    sys.exit(main())
