"""Reference reward family (docs/design.md §2 "Latent reward head", §1 step 9): the CLIP-style reward head
and the latent reward model's pairwise preference loss, written as the public RG-LCD training script
computes them (open_clip features, then F.kl_div / F.cross_entropy per pair of candidates)."""

import torch
import torch.nn.functional as F

from ._schedule import accumulation_dtype

PREFERENCE_KINDS = ("kl", "ce")


def reward_head(image_features, text_features, logit_scale):
    """score = logit_scale · ⟨u/‖u‖, v/‖v‖⟩ over the last dim; text_features broadcast to image_features.
    logit_scale is the already-exp()'d scale (a tensor of one value or a float). No epsilon: a zero
    feature vector gives NaN. Returned in the features' dtype, computed in float32 (float64)."""
    acc = accumulation_dtype(image_features.dtype)
    u = image_features.to(acc)
    v = text_features.to(acc)
    u = u / u.norm(dim=-1, keepdim=True)
    v = v / v.norm(dim=-1, keepdim=True)
    scale = logit_scale.to(acc).reshape(()) if isinstance(logit_scale, torch.Tensor) else logit_scale
    return (scale * (u * v).sum(-1)).to(image_features.dtype)


def check_preference_rule(kind, real_index, smooth_gt_label, num_candidates):
    """The pairwise loss's target options: kind "kl" or "ce"; real_index None or the real candidate's index
    in [0, K) (an int); smooth_gt_label (kl only) needs real_index. TypeError / ValueError naming the
    argument otherwise."""
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"kind: expected 'kl' or 'ce', got {kind!r}")
    if real_index is not None:
        if not isinstance(real_index, int) or isinstance(real_index, bool):
            raise TypeError(
                f"real_index: expected an int (the real candidate's index) or None, got {type(real_index).__name__}"
            )
        if not 0 <= real_index < num_candidates:
            raise ValueError(
                f"real_index: expected a candidate index in [0, K) = [0, {num_candidates}), got {real_index}"
            )
    if not isinstance(smooth_gt_label, bool):
        raise TypeError(f"smooth_gt_label: expected a bool, got {type(smooth_gt_label).__name__}")
    if smooth_gt_label and kind != "kl":
        raise ValueError(
            "smooth_gt_label: applies to kind 'kl' only (kind 'ce' labels the real candidate's pairs itself)"
        )
    if smooth_gt_label and real_index is None:
        raise ValueError("smooth_gt_label: needs real_index (the real candidate whose pairs it smooths)")


def pairwise_preference_loss(logits, expert_logits, kind="kl", real_index=None, smooth_gt_label=False):
    """Latent reward model loss over K candidates × B prompts (logits and expert_logits [K, B]), the
    official script's loop over pairs i < j: Σ of KL(softmax(E_i, E_j) ‖ softmax(S_i, S_j)) averaged
    over b ("kl"), or of the cross-entropy of (S_i, S_j) against labels ("ce"); accuracy: the fraction
    over pairs and b where argmax(S_i, S_j) == labels. Labels: argmax(E_i, E_j) (ties: the first); with
    kind "ce" and real_index r, every pair holding r is labelled "r wins". smooth_gt_label ("kl", needs
    real_index): a pair holding r whose expert argmax picks the other candidate gets the uniform target
    (its label, for the accuracy, stays the argmax). Both 0-d float32 (float64 for float64 inputs)."""
    check_preference_rule(kind, real_index, smooth_gt_label, logits.shape[0])
    acc = accumulation_dtype(logits.dtype)
    latent = logits.to(acc)
    expert = expert_logits.detach().to(acc)  # a target: no gradient reaches the expert
    loss = latent.new_zeros(())
    pair_accuracy = []
    num_candidates = latent.shape[0]
    for i in range(num_candidates - 1):
        for j in range(i + 1, num_candidates):
            pair = torch.stack([latent[i], latent[j]]).transpose(0, 1)  # [B, 2]
            expert_pair = torch.stack([expert[i], expert[j]]).transpose(0, 1)
            labels = expert_pair.argmax(dim=1)
            real_position = (i, j).index(real_index) if real_index in (i, j) else None
            if kind == "kl":
                expert_prob = F.softmax(expert_pair, dim=1)
                if smooth_gt_label and real_position is not None:
                    smoothed = labels != real_position  # the expert prefers the generated candidate
                    expert_prob[smoothed] = 0.5
                loss = loss + F.kl_div(F.log_softmax(pair, dim=1), expert_prob, reduction="batchmean")
            else:
                if real_position is not None:
                    labels = torch.full_like(labels, real_position)  # the real candidate always wins
                loss = loss + F.cross_entropy(pair, labels)
            pair_accuracy.append((pair.detach().argmax(dim=1) == labels).to(acc).mean())
    return loss, torch.stack(pair_accuracy).mean()
