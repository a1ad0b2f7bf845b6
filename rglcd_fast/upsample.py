"""Nearest ×2 upsampling followed by a 3×3 convolution, as one stride-2 transposed convolution.

diffusers' `Upsample2D` (the VAE decoder's three upsamplers, the UNets' up blocks) doubles a feature map
with nearest-neighbour interpolation and then convolves it (3×3, padding 1). Along each axis the
interpolation repeats every input pixel twice, so output pixel 2i + a sees input pixels i - 1, i, i + 1 through
sums of the kernel's taps; per axis the composite is a stride-2 transposed convolution with the 4-tap kernel

    K = [w2, w1 + w2, w0 + w1, w0]        (w0, w1, w2: the 3×3 kernel's taps along that axis; padding 1)

and in 2-D the outer combination of both axes (a 4×4 kernel). Same sums, so equal in exact arithmetic (fp64:
~1e-13); 16 instead of 36 multiply-adds per input pixel and channel pair (the VAE decoder's upsampling
convolutions are about a third of its work at 768 px), and no 4×-sized interpolated tensor. The 3×3 weight
stays the parameter (state dicts, gradients and LoRA targets are unchanged); K is folded from it on each call
in float32 (or float64).

    from rglcd_fast.upsample import fold_upsamplers
    fold_upsamplers(vae.decoder)   # or a UNet; returns how many upsamplers now take the folded path
"""

import types

import torch
import torch.nn.functional as F


def fold_upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """A 3×3 convolution weight [out, in, 3, 3] -> the 4×4 transposed-convolution weight [in, out, 4, 4] of
    nearest ×2 upsampling followed by it (the module docstring's K on both axes), in float32 (float64 stays)."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"weight: expected [out, in, 3, 3], got {tuple(weight.shape)}")
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    w = torch.stack([w[:, :, 2], w[:, :, 1] + w[:, :, 2], w[:, :, 0] + w[:, :, 1], w[:, :, 0]], dim=2)
    w = torch.stack([w[..., 2], w[..., 1] + w[..., 2], w[..., 0] + w[..., 1], w[..., 0]], dim=3)
    return w.transpose(0, 1)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1), in one call."""
    if x.dim() != 4:
        raise ValueError(f"x: expected [N, C, H, W], got {tuple(x.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: takes {weight.shape[1]} input channels, x has {x.shape[1]}")
    kernel = fold_upsample_kernel(weight).to(weight.dtype)
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


def _foldable_conv(module) -> torch.nn.Conv2d | None:
    """The convolution of an Upsample2D that interpolates (nearest, ×2) and then applies a plain 3×3 /
    padding 1 convolution; None for any other."""
    conv = module.conv if module.name == "conv" else module.Conv2d_0
    foldable = (
        module.interpolate
        and module.use_conv
        and not module.use_conv_transpose
        and module.norm is None
        and type(conv) is torch.nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
    return conv if foldable else None


def _folded_forward(self, hidden_states, output_size=None, *args, **kwargs):
    # the UNets pass output_size for odd latent sizes; only an exact doubling takes the folded path
    # (checked on each call: a convolution wrapped later, e.g. by peft's LoRA, falls back too)
    doubled = output_size is None or tuple(output_size) == tuple(2 * s for s in hidden_states.shape[-2:])
    conv = _foldable_conv(self) if doubled and not args and not kwargs else None
    if conv is None:
        return type(self).forward(self, hidden_states, output_size, *args, **kwargs)
    if hidden_states.shape[1] != self.channels:
        raise ValueError(f"hidden_states: expected {self.channels} channels, got {hidden_states.shape[1]}")
    return upsample_conv(hidden_states, conv.weight, conv.bias)


def fold_upsamplers(model: torch.nn.Module) -> int:
    """Every diffusers Upsample2D in model that upsamples (nearest, ×2) and convolves (3×3, padding 1) computes
    both as one transposed convolution from now on (its forward replaced on the instance; other Upsample2D
    modules, e.g. with a norm or a LoRA-wrapped convolution, keep theirs). Returns the number folded."""
    from diffusers.models.upsampling import Upsample2D

    folded = 0
    for module in model.modules():
        if isinstance(module, Upsample2D) and _foldable_conv(module) is not None:
            module.forward = types.MethodType(_folded_forward, module)
            folded += 1
    return folded
