"""rglcd_fast.upsample: nearest ×2 + 3×3 convolution as one transposed convolution, against the two-step
original (forward and gradients, per dtype, layout and edge case), and fold_upsamplers on diffusers' VAE
decoder and UNet (equal outputs, state dict unchanged, fallbacks, copies, compile)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DEVICES,
    LAYOUTS,
    assert_tight,
    check_against_reference,
    device_dtype_params,
    in_layout,
    no_tf32,
    randn,
)

from rglcd_fast.upsample import fold_upsample_kernel, fold_upsamplers, upsample_conv


def interpolate_then_conv(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_interpolate_then_conv(device, dtype, layout):
    g = torch.Generator().manual_seed(0)
    x = in_layout(randn(2, 6, 5, 7, dtype=dtype, device=device, generator=g), layout)
    weight = randn(4, 6, 3, 3, dtype=dtype, device=device, generator=g) / 4
    bias = randn(4, dtype=dtype, device=device, generator=g)
    out = check_against_reference(upsample_conv, interpolate_then_conv, [x, weight, bias], grad_argnums=(0, 1, 2))[0]
    assert out.shape == (2, 4, 10, 14)


def test_float64_gradcheck_and_exactness():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(upsample_conv, (x, weight, bias))
    assert (upsample_conv(x, weight, bias) - interpolate_then_conv(x, weight, bias)).abs().max() < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device):
    weight = torch.randn(4, 3, 3, 3, device=device)
    empty = torch.randn(0, 3, 5, 5, device=device)
    assert upsample_conv(empty, weight).shape == (0, 4, 10, 10)
    one_pixel = torch.randn(2, 3, 1, 1, device=device)
    with no_tf32():  # float32 exactness (cuDNN's default TF32 on CUDA rounds to 10-bit mantissas)
        assert_tight(upsample_conv(one_pixel, weight), interpolate_then_conv(one_pixel, weight, None), "1x1 input")
    # NaN and Inf propagate to the same outputs. (Where an Inf meets taps of both signs the original sums
    # inf·w1 + inf·w2 = NaN, the folded kernel inf·(w1 + w2) = ±inf: non-finite either way.)
    x = torch.randn(1, 3, 4, 4, device=device)
    x[0, 1, 2, 3] = float("nan")
    ours, theirs = upsample_conv(x, weight), interpolate_then_conv(x, weight, None)
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan().any()
    x[0, 2, 0, 0] = float("inf")
    ours, theirs = upsample_conv(x, weight), interpolate_then_conv(x, weight, None)
    assert torch.equal(ours.isfinite(), theirs.isfinite())


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="weight"):
        fold_upsample_kernel(torch.randn(4, 3, 5, 5))
    with pytest.raises(ValueError, match="x"):
        upsample_conv(torch.randn(3, 4, 4), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="weight"):
        upsample_conv(torch.randn(1, 2, 4, 4), torch.randn(4, 3, 3, 3))


def test_compiled_matches_eager():
    x, weight, bias = torch.randn(2, 3, 5, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    compiled = torch.compile(upsample_conv, fullgraph=True)
    assert_tight(compiled(x, weight, bias), upsample_conv(x, weight, bias), "compiled")


def tiny_vae():
    """The digits world's VAE architecture (two upsamplers), random weights."""
    from diffusers import AutoencoderKL

    from rglcd_fast.world.teacher import VAE_CONFIG

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_CONFIG).eval()


def test_vae_decoder_folded_decodes_the_same_and_trains_the_same():
    vae = tiny_vae()
    folded = copy.deepcopy(vae)
    assert fold_upsamplers(folded.decoder) == 2  # one upsampler per up block but the last
    assert folded.state_dict().keys() == vae.state_dict().keys()
    z = torch.randn(2, 4, 5, 7)
    expected = vae.decode(z).sample
    assert_tight(folded.decode(z).sample, expected, "decode", tol=1e-5)
    # gradients through the decoder (the direct reward differentiates through it), to the latents and weights
    for model in (vae, folded):
        model.zero_grad()
    zs = [z.clone().requires_grad_() for _ in range(2)]
    for model, zz in zip((vae, folded), zs):
        model.decode(zz).sample.square().mean().backward()
    assert_tight(zs[1].grad, zs[0].grad, "latent grad", tol=1e-5)
    up = [m.decoder.up_blocks[0].upsamplers[0].conv.weight.grad for m in (vae, folded)]
    assert_tight(up[1], up[0], "upsampler weight grad", tol=1e-5)
    # a copy of a folded model (the EMA target is a deepcopy of the student) keeps the folded path, on itself
    again = copy.deepcopy(folded)
    upsampler = again.decoder.up_blocks[0].upsamplers[0]
    assert upsampler.forward.__self__ is upsampler
    assert_tight(again.decode(z).sample, expected, "copy", tol=1e-5)
    # static shapes: with symbolic ones torch 2.13's CPU inductor fails on diffusers' decoder, folded or not
    # ("cannot determine truth value of Relational"), and a decoder compiled earlier in the process at other
    # sizes would make them symbolic
    compiled = torch.compile(folded.decoder, fullgraph=True, dynamic=False)
    assert_tight(compiled(z), vae.decoder(z), "compiled decoder", tol=1e-5)


def test_unet_folded_including_odd_sizes_and_lora_fallback():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    folded = copy.deepcopy(unet)
    assert fold_upsamplers(folded) == 1
    text = torch.randn(1, 3, 8)
    for size in (8, 7):  # 7: odd, the UNet passes output_size (4 -> 7 is no doubling: the original path)
        x = torch.randn(1, 4, size, size)
        with torch.no_grad():
            assert_tight(folded(x, 10, text).sample, unet(x, 10, text).sample, f"UNet at {size}", tol=1e-5)
    # a convolution wrapped afterwards (peft's LoRA) is no plain Conv2d: the upsampler goes the original way
    from peft import LoraConfig, inject_adapter_in_model

    lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv"], init_lora_weights=False), folded)
    upsampler = lora.up_blocks[0].upsamplers[0]
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        expected = upsampler.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert_tight(upsampler(x), expected, "LoRA-wrapped upsampler")


def test_other_upsamplers_are_left_alone():
    from diffusers.models.upsampling import Upsample2D

    with_norm = Upsample2D(4, use_conv=True, norm_type="rms_norm", eps=1e-6, elementwise_affine=True)
    transpose = Upsample2D(4, use_conv_transpose=True)
    no_conv = Upsample2D(4, use_conv=False)
    model = torch.nn.Sequential(with_norm, transpose, no_conv)
    assert fold_upsamplers(model) == 0
