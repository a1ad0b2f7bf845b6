// The reward family's scalar math (docs/design.md §2 "Latent reward head", §1 step 9) for host and device:
// the cosine head and its gradient, the pairwise preference targets and loss, and their argument checks.
#pragma once

#include "common.h"

namespace rglcd_fast {

// The reward head accumulates and differentiates in float64 whatever the features' dtype: a gradient of
// nearly parallel rows is a small difference of unit-scale terms, whose float32 rounding exceeds PyTorch's own
// error there; the head reads rows × D values once, so the cost is the reads either way.
using head_acc_t = double;

// Per-row sums of the reward head: ⟨u, v⟩, ‖u‖², ‖v‖².
template <typename acc_t>
struct CosineSums {
  acc_t dot, uu, vv;
};

// score = scale · ⟨u/‖u‖, v/‖v‖⟩ (no epsilon: a zero row gives NaN, as CLIP's x / x.norm()).
template <typename acc_t>
RGLCD_HD acc_t cosine_score(const CosineSums<acc_t>& s, acc_t scale) {
  return scale * (s.dot / (std::sqrt(s.uu) * std::sqrt(s.vv)));
}

// Backward of the score for one row with upstream gradient g, in the projection form of PyTorch's normalise
// backward: grad_u = (gs/‖u‖)·(v/‖v‖ - c·u/‖u‖), grad_v = (gs/‖v‖)·(u/‖u‖ - c·v/‖v‖), grad_scale = g·c, with
// gs = g·scale and c the cosine. The bracket is formed from unit-scale terms, so rows that are (anti)parallel
// (every row at D = 1) get the exact 0, where the expanded cross·v + self·u leaves a rounding residue.
template <typename acc_t>
struct CosineGrad {
  acc_t nu, nv, c, ku, kv, grad_scale;

  RGLCD_HD acc_t grad_u(acc_t u, acc_t v) const { return ku * (v / nv - c * (u / nu)); }
  RGLCD_HD acc_t grad_v(acc_t u, acc_t v) const { return kv * (u / nu - c * (v / nv)); }
};

template <typename acc_t>
RGLCD_HD CosineGrad<acc_t> cosine_score_grad(const CosineSums<acc_t>& s, acc_t scale, acc_t g) {
  const acc_t nu = std::sqrt(s.uu), nv = std::sqrt(s.vv), c = s.dot / (nu * nv), gs = g * scale;
  return {nu, nv, c, gs / nu, gs / nv, g * c};
}

// Argument checks of the reward head shared by the backends: features [..., D] with D > 0, the text
// features of the same dtype and feature dim, broadcastable to the image features.
inline void check_reward_features(const at::Tensor& image_features, const at::Tensor& text_features) {
  TORCH_CHECK_VALUE(image_features.dim() >= 1, "image_features: expected [..., D], got a 0-d tensor");
  TORCH_CHECK_VALUE(text_features.dim() >= 1 && text_features.dim() <= image_features.dim(),
                    "text_features: expected [..., D] broadcastable to image_features ", image_features.sizes(),
                    ", got ", text_features.sizes());
  TORCH_CHECK_VALUE(text_features.size(-1) == image_features.size(-1), "text_features: expected feature dim ",
                    image_features.size(-1), " (as image_features), got ", text_features.size(-1));
  TORCH_CHECK_VALUE(image_features.size(-1) > 0, "image_features: the feature dim is empty");
  TORCH_CHECK_TYPE(text_features.scalar_type() == image_features.scalar_type(), "text_features: expected dtype ",
                   image_features.scalar_type(), " (as image_features), got ", text_features.scalar_type());
  const int64_t lead = image_features.dim() - text_features.dim();
  for (int64_t d = 0; d < text_features.dim(); ++d) {
    const int64_t t = text_features.size(d), i = image_features.size(lead + d);
    TORCH_CHECK_VALUE(t == i || t == 1, "text_features: shape ", text_features.sizes(),
                      " does not broadcast to image_features ", image_features.sizes());
  }
}

// Logits S and expert logits E of the pairwise preference loss: [K, B], K >= 2, one shape and dtype.
inline void check_pair_logits(const at::Tensor& logits, const at::Tensor& expert_logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(0) >= 2, "logits: expected [K, B] with K >= 2 candidates, got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(expert_logits.sizes() == logits.sizes(), "expert_logits: expected shape ", logits.sizes(), ", got ",
                    expert_logits.sizes());
  TORCH_CHECK_TYPE(expert_logits.scalar_type() == logits.scalar_type(), "expert_logits: expected dtype ",
                   logits.scalar_type(), " (as logits), got ", expert_logits.scalar_type());
}

// Logits S and expert logits E [K, B] read through their strides.
template <typename scalar_t>
struct PairLogits {
  const scalar_t* s;
  const scalar_t* e;
  int64_t s_k, s_b, e_k, e_b;
  template <typename acc_t>
  RGLCD_HD acc_t student(int64_t k, int64_t b) const {
    return static_cast<acc_t>(s[k * s_k + b * s_b]);
  }
  template <typename acc_t>
  RGLCD_HD acc_t expert(int64_t k, int64_t b) const {
    return static_cast<acc_t>(e[k * e_k + b * e_b]);
  }
};

template <typename scalar_t>
PairLogits<scalar_t> pair_logits(const at::Tensor& logits, const at::Tensor& expert) {
  return {logits.const_data_ptr<scalar_t>(),
          expert.const_data_ptr<scalar_t>(),
          logits.stride(0),
          logits.stride(1),
          expert.stride(0),
          expert.stride(1)};
}

enum class PreferenceKind : int { KL = 0, CrossEntropy = 1 };

inline PreferenceKind parse_preference_kind(std::string_view s) {
  if (s == "kl") return PreferenceKind::KL;
  if (s == "ce") return PreferenceKind::CrossEntropy;
  TORCH_CHECK_VALUE(false, "kind must be 'kl' or 'ce', got '", s, "'");
}

// How the pairs of K candidates get their targets: the kind, the real candidate's index (-1: none) and,
// for KL, whether a pair holding the real candidate that the expert loses to the other gets a uniform target.
struct PreferenceRule {
  PreferenceKind kind;
  int64_t real_index;
  bool smooth;
};

inline PreferenceRule parse_preference_rule(std::string_view kind, std::optional<int64_t> real_index,
                                            bool smooth_gt_label, int64_t num_candidates) {
  const PreferenceKind k = parse_preference_kind(kind);
  TORCH_CHECK_VALUE(!real_index.has_value() || (*real_index >= 0 && *real_index < num_candidates),
                    "real_index: expected a candidate index in [0, K) = [0, ", num_candidates, "), got ", *real_index);
  TORCH_CHECK_VALUE(!smooth_gt_label || k == PreferenceKind::KL,
                    "smooth_gt_label: applies to kind 'kl' only (kind 'ce' labels the real candidate's pairs itself)");
  TORCH_CHECK_VALUE(!smooth_gt_label || real_index.has_value(),
                    "smooth_gt_label: needs real_index (the real candidate whose pairs it smooths)");
  return {k, real_index.value_or(-1), smooth_gt_label};
}

// torch.argmax over two values: NaN counts as the maximum, a tie goes to the first.
template <typename T>
RGLCD_HD int pair_argmax(T a, T b) {
  return (a >= b || a != a) ? 0 : 1;
}

// The real candidate's position in pair (i, j), i < j: 0 or 1, or -1 when the pair does not hold it.
RGLCD_HD int real_position(int64_t i, int64_t j, const PreferenceRule& rule) {
  return i == rule.real_index ? 0 : (j == rule.real_index ? 1 : -1);
}

// The label of pair (i, j): the position of its winner. The expert's argmax (a tie to i), except that
// CE with a real_index lets the real candidate win every pair that holds it (the official rule).
template <typename acc_t>
RGLCD_HD int pair_label(acc_t ei, acc_t ej, int64_t i, int64_t j, const PreferenceRule& rule) {
  const int real = real_position(i, j, rule);
  return rule.kind == PreferenceKind::CrossEntropy && real >= 0 ? real : pair_argmax(ei, ej);
}

// smooth_gt_label: the KL target of a pair holding the real candidate is uniform where the expert's argmax
// picks the other candidate (the official `labels == 0` for pairs (i, real), real last).
template <typename acc_t>
RGLCD_HD bool pair_smoothed(acc_t ei, acc_t ej, int64_t i, int64_t j, const PreferenceRule& rule) {
  const int real = real_position(i, j, rule);
  return rule.smooth && real >= 0 && pair_argmax(ei, ej) != real;
}

// a − b as a two-way (log-)softmax sees it after subtracting the maximum: NaN when either is +inf.
template <typename acc_t>
RGLCD_HD acc_t pair_difference(acc_t a, acc_t b) {
  const acc_t m = a > b ? a : b;
  return (m - m) + (a - b);
}

// The two-way softmax of logits (a, b) as a function of d = a − b: (σ(d), σ(−d)) and their logs,
// numerically stable (log σ(d) = min(d, 0) − log1p(e^−|d|)), from one exp and one log1p.
template <typename acc_t>
struct TwoWay {
  acc_t p0, p1, log_p0, log_p1;
};

template <typename acc_t>
RGLCD_HD TwoWay<acc_t> two_way_softmax(acc_t d) {
  const acc_t e = std::exp(-std::abs(d)), l = std::log1p(e);
  const acc_t big = acc_t(1) / (acc_t(1) + e), small = e / (acc_t(1) + e);
  const bool positive = d >= acc_t(0);  // false for NaN: everything below is NaN then
  return {positive ? big : small, positive ? small : big, (positive ? acc_t(0) : d) - l,
          (positive ? -d : acc_t(0)) - l};
}

template <typename acc_t>
RGLCD_HD acc_t sigmoid(acc_t d) {
  const acc_t e = std::exp(-std::abs(d));
  return d >= acc_t(0) ? acc_t(1) / (acc_t(1) + e) : e / (acc_t(1) + e);
}

// The target distribution (p0, p1) of one pair (i, j) of candidates: KL: the expert's two-way softmax
// of E_i − E_j (uniform where smoothed); CE: one-hot on the pair's label.
template <typename acc_t>
struct PairTarget {
  TwoWay<acc_t> p;
  bool one_hot;
};

template <typename acc_t>
RGLCD_HD PairTarget<acc_t> pair_target(acc_t ei, acc_t ej, int64_t i, int64_t j, const PreferenceRule& rule) {
  if (rule.kind == PreferenceKind::CrossEntropy) {
    const bool first = pair_label(ei, ej, i, j, rule) == 0;
    return {{acc_t(first ? 1 : 0), acc_t(first ? 0 : 1), acc_t(0), acc_t(0)}, true};  // logs unused
  }
  if (pair_smoothed(ei, ej, i, j, rule)) {
    const acc_t half = 0.5, log_half = std::log(half);
    return {{half, half, log_half, log_half}, false};
  }
  return {two_way_softmax(pair_difference(ei, ej)), false};
}

// p0 alone (the backward needs no logs).
template <typename acc_t>
RGLCD_HD acc_t pair_target_p0(acc_t ei, acc_t ej, int64_t i, int64_t j, const PreferenceRule& rule) {
  if (rule.kind == PreferenceKind::CrossEntropy) return pair_label(ei, ej, i, j, rule) == 0 ? acc_t(1) : acc_t(0);
  if (pair_smoothed(ei, ej, i, j, rule)) return acc_t(0.5);
  return sigmoid(pair_difference(ei, ej));
}

// Loss of one pair at student difference d = S_i − S_j, q = two-way softmax of d: KL(p ‖ q) with
// torch's kl_div conventions (0·log 0 = 0, 0·log q kept: NaN for a NaN q), or CE −log q_label.
template <typename acc_t>
RGLCD_HD acc_t pair_loss(const PairTarget<acc_t>& t, acc_t d) {
  const TwoWay<acc_t> q = two_way_softmax(d);
  if (t.one_hot) return -(t.p.p0 > acc_t(0) ? q.log_p0 : q.log_p1);
  const acc_t h0 = t.p.p0 > acc_t(0) ? t.p.p0 * t.p.log_p0 : acc_t(0);
  const acc_t h1 = t.p.p1 > acc_t(0) ? t.p.p1 * t.p.log_p1 : acc_t(0);
  return (h0 + h1) - t.p.p0 * q.log_p0 - t.p.p1 * q.log_p1;
}

// ∂loss/∂S_i = −∂loss/∂S_j = q0 − p0, for p0 = pair_target_p0.
template <typename acc_t>
RGLCD_HD acc_t pair_loss_grad(acc_t p0, acc_t d) {
  return sigmoid(d) - p0;
}

}  // namespace rglcd_fast
