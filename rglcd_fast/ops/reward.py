"""Reward family ops (docs/design.md §2 "Latent reward head", §1 step 9): the CLIP-style reward head
score = scale·cos(u, v) and the latent reward model's pairwise preference loss. Each op: schema, fake
kernel, autograd (the backward is itself an op) and a validating public function."""

import torch

from .. import _library as lib
from ..reference import reward as ref
from . import _checks as check

# ---- schemas and reference kernels ------------------------------------------------------------
# The kernels return contiguous tensors (what the fake kernels promise); so do the reference kernels.


def _reward_head_reference(image_features, text_features, logit_scale):
    return ref.reward_head(image_features, text_features, logit_scale).contiguous()


def _reward_head_backward_reference(grad, image_features, text_features, logit_scale, output_mask):
    inputs = [t.detach().requires_grad_() for t in (image_features, text_features, logit_scale)]
    with torch.enable_grad():
        scores = ref.reward_head(*inputs)
        result = torch.autograd.grad(scores, inputs, grad, allow_unused=True, materialize_grads=True)
    return tuple(g.contiguous() if wanted else t.new_empty(0) for g, t, wanted in zip(result, inputs, output_mask))


_reward_head = lib.define(
    "reward_head",
    "(Tensor image_features, Tensor text_features, Tensor logit_scale) -> Tensor",
    _reward_head_reference,
    differentiable=True,
)
_reward_head_backward = lib.define(
    "reward_head_backward",
    "(Tensor grad, Tensor image_features, Tensor text_features, Tensor logit_scale, bool[3] output_mask) "
    "-> (Tensor, Tensor, Tensor)",
    _reward_head_backward_reference,
)


def _pairwise_backward_reference(grad_loss, logits, expert_logits, kind, real_index=None, smooth_gt_label=False):
    latent = logits.detach().requires_grad_()
    with torch.enable_grad():
        loss, _ = ref.pairwise_preference_loss(latent, expert_logits, kind, real_index, smooth_gt_label)
        (grad,) = torch.autograd.grad(loss, latent, grad_loss)
    return grad.contiguous()


_PAIRWISE_OPTIONS = "str kind, int? real_index=None, bool smooth_gt_label=False"
_pairwise_preference_loss = lib.define(
    "pairwise_preference_loss",
    f"(Tensor logits, Tensor expert_logits, {_PAIRWISE_OPTIONS}) -> (Tensor, Tensor)",
    ref.pairwise_preference_loss,
    differentiable=True,
)
_pairwise_preference_loss_backward = lib.define(
    "pairwise_preference_loss_backward",
    f"(Tensor grad_loss, Tensor logits, Tensor expert_logits, {_PAIRWISE_OPTIONS}) -> Tensor",
    _pairwise_backward_reference,
)

# ---- fake kernels -------------------------------------------------------------------------------


@torch.library.register_fake(lib.qualname("reward_head"))
def _(image_features, text_features, logit_scale):
    return image_features.new_empty(image_features.shape[:-1])


@torch.library.register_fake(lib.qualname("reward_head_backward"))
def _(grad, image_features, text_features, logit_scale, output_mask):
    return tuple(
        t.new_empty(t.shape) if wanted else t.new_empty(0)
        for t, wanted in zip((image_features, text_features, logit_scale), output_mask)
    )


def _loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(lib.qualname("pairwise_preference_loss"))
def _(logits, expert_logits, kind, real_index=None, smooth_gt_label=False):
    dtype = _loss_dtype(logits.dtype)
    return logits.new_empty((), dtype=dtype), logits.new_empty((), dtype=dtype)


@torch.library.register_fake(lib.qualname("pairwise_preference_loss_backward"))
def _(grad_loss, logits, expert_logits, kind, real_index=None, smooth_gt_label=False):
    return logits.new_empty(logits.shape)


# ---- public functions ---------------------------------------------------------------------------


def reward_head(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
    """CLIP-style reward: score = logit_scale · ⟨u/‖u‖, v/‖v‖⟩ over the last dim.

    image_features [..., D]; text_features [..., D] broadcastable to it (e.g. [K, B, D] candidates
    with the prompts' [B, D]); logit_scale: the already-exp()'d scale, a one-value tensor or a float.
    Returns scores [...] in the features' dtype (norms and dot in float32; float64 for float64).
    Differentiable in both features and in logit_scale when it is a tensor. No epsilon: a zero
    feature vector gives NaN."""
    check.tensor("image_features", image_features)
    check.tensor("text_features", text_features)
    if image_features.dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"image_features: expected float16, bfloat16, float32 or float64, got {image_features.dtype}")
    if text_features.dtype != image_features.dtype:
        raise TypeError(
            f"text_features: expected dtype {image_features.dtype} (as image_features), got {text_features.dtype}"
        )
    if text_features.device != image_features.device:
        raise ValueError(
            f"text_features: expected device {image_features.device} (as image_features), got {text_features.device}"
        )
    if image_features.dim() < 1 or image_features.shape[-1] == 0:
        raise ValueError(f"image_features: expected [..., D] with D > 0, got shape {tuple(image_features.shape)}")
    if text_features.dim() < 1 or text_features.shape[-1] != image_features.shape[-1]:
        raise ValueError(
            f"text_features: expected feature dim {image_features.shape[-1]} (as image_features), "
            f"got shape {tuple(text_features.shape)}"
        )
    check.broadcastable_to("text_features", text_features, image_features.shape, "image_features")
    logit_scale = check.scalar("logit_scale", logit_scale, image_features.device)
    return _reward_head(image_features, text_features, logit_scale)


def pairwise_preference_loss(
    logits: torch.Tensor,
    expert_logits: torch.Tensor,
    kind: str = "kl",
    real_index: int | None = None,
    smooth_gt_label: bool = False,
):
    """Latent reward model loss (docs/design.md §1 step 9) over K >= 2 candidates × B prompts.

    logits S [K, B] (the latent reward model's, differentiable); expert_logits E [K, B] (the expert
    RM's, times its logit scale: a target, no gradient). kind "kl": Σ over pairs i < j of
    KL(softmax(E_i, E_j) ‖ softmax(S_i, S_j)) averaged over b; "ce": Σ over pairs of the cross-entropy
    of (S_i, S_j) against the pair's label, averaged over b. Labels: argmax(E_i, E_j) (ties: the first).
    real_index: the real candidate's index r (the official candidates are [student prediction, target,
    real], r = 2); with "ce", every pair holding r is labelled "r wins". smooth_gt_label ("kl", needs
    real_index): a pair holding r whose expert argmax picks the other candidate gets the uniform target
    (0.5, 0.5). Returns (loss, accuracy): accuracy is the fraction over pairs and b where argmax(S_i, S_j)
    == the label (for "kl", the expert's argmax, smoothed or not). Both 0-d float32 (float64 for float64
    inputs)."""
    check.latents(logits=logits, expert_logits=expert_logits)
    if logits.dim() != 2 or logits.shape[0] < 2:
        raise ValueError(f"logits: expected [K, B] with K >= 2 candidates, got shape {tuple(logits.shape)}")
    ref.check_preference_rule(kind, real_index, smooth_gt_label, logits.shape[0])
    return _pairwise_preference_loss(logits, expert_logits, kind, real_index, smooth_gt_label)
