"""Reference reward family (DESIGN.md §2 "Latent reward head", §1 step 9): the CLIP-style reward head
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


def pairwise_preference_loss(logits, expert_logits, kind="kl"):
    """Latent reward model loss over K candidates × B prompts (logits and expert_logits [K, B]):
    Σ over pairs i < j of KL(softmax(E_i, E_j) ‖ softmax(S_i, S_j)) averaged over b ("kl"), or of the
    cross-entropy of (S_i, S_j) against argmax(E_i, E_j) ("ce"); accuracy: the fraction over pairs and
    b where argmax(S_i, S_j) == argmax(E_i, E_j). Both 0-d float32 (float64 for float64 inputs)."""
    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"kind: expected 'kl' or 'ce', got {kind!r}")
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
            if kind == "kl":
                loss = loss + F.kl_div(F.log_softmax(pair, dim=1), F.softmax(expert_pair, dim=1),
                                       reduction="batchmean")
            else:
                loss = loss + F.cross_entropy(pair, labels)
            pair_accuracy.append((pair.detach().argmax(dim=1) == labels).to(acc).mean())
    return loss, torch.stack(pair_accuracy).mean()
