"""Reproduces a torch.compile (inductor) gradient error: diffusers' UNet2DConditionModel, tiny and
without attention, compiled; its input and conv_in gradients against eager. Seen wrong on torch
2.13.0+cpu (inductor's CPU backend; backend="aot_eager" is right). The trainer therefore compiles only the
forward-only modules on the CPU (tests/test_train_trainer.py::test_compiled_training_matches_eager).

    python scripts/inductor_cpu_unet_grad.py [cpu|cuda]
"""

import sys

import torch
from diffusers import UNet2DConditionModel

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
unet = UNet2DConditionModel(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    cross_attention_dim=8,
    norm_num_groups=4,
).to(device)
x = torch.randn(4, 4, 8, 8, device=device, requires_grad=True)
t = torch.tensor([999, 500, 100, 10], device=device)
text = torch.randn(4, 7, 8, device=device)


def grads(module):
    out = module(x, t, text).sample
    return torch.autograd.grad((out**2).sum(), [x, unet.conv_in.weight])


for backend in ("aot_eager", "inductor"):
    torch._dynamo.reset()
    errors = [(a - b).abs().max().item() for a, b in zip(grads(unet), grads(torch.compile(unet, backend=backend)))]
    print(
        f"torch {torch.__version__} {device} {backend}: max |grad difference| input {errors[0]:.3g}, "
        f"conv_in.weight {errors[1]:.3g}"
    )
