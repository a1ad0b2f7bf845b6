// Shared helpers for every op family and backend: argument parsing, the per-sample schedule math
// (docs/design.md §2) as host/device scalar functions, and the batch-outer memory layout.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#define RGLCD_HD __host__ __device__ __forceinline__
#else
#define RGLCD_HD inline
#endif

namespace rglcd_fast {

enum class PredictionType : int { Epsilon = 0, VPrediction = 1, Sample = 2 };

inline PredictionType parse_prediction_type(std::string_view s) {
  if (s == "epsilon") return PredictionType::Epsilon;
  if (s == "v_prediction") return PredictionType::VPrediction;
  if (s == "sample") return PredictionType::Sample;
  TORCH_CHECK_VALUE(false, "prediction_type must be 'epsilon', 'v_prediction' or 'sample', got '", s, "'");
}

// Calls body(tag) with the prediction type as a compile-time constant (decltype(tag)::value), so that
// loops over elements carry no per-element switch and vectorise.
template <PredictionType T>
using PredictionTag = std::integral_constant<PredictionType, T>;

template <typename Body>
inline void with_prediction_type(PredictionType type, const Body& body) {
  switch (type) {
    case PredictionType::Epsilon:
      body(PredictionTag<PredictionType::Epsilon>{});
      break;
    case PredictionType::VPrediction:
      body(PredictionTag<PredictionType::VPrediction>{});
      break;
    default:
      body(PredictionTag<PredictionType::Sample>{});
      break;
  }
}

// A per-sample linear map of (sample x, model output m), evaluated in the reference's (diffusers') operation
// order: value = r·x + q·(px·x + pm·m). E.g. x0 = (x - σ·m) / α is r = 0, q = 1/α, px = 1, pm = -σ: x and σ·m
// cancel before the scaling, where the folded x/α - (σ/α)·m loses float32 precision at high noise (α ≈ 0.07)
// and large inputs. Its gradients follow the same order (grad_x = r·g + q·(px·g), grad_m = q·(pm·g)), so an
// infinite g meets a zero coefficient as the reference's autograd meets it (0·inf = NaN); cx() and cm() are
// the folded derivatives, for maps composed further (the guided step's backward). A zero r or px skips its
// term and has_x = false skips x altogether (an Inf in x cannot turn into 0 * Inf = NaN where the formula
// does not read it; its gradient is 0).
template <typename acc_t>
struct Linear {
  acc_t r, q, px, pm;
  bool has_x = true;

  RGLCD_HD acc_t cx() const { return has_x ? r + q * px : acc_t(0); }
  RGLCD_HD acc_t cm() const { return q * pm; }

  template <typename T>
  RGLCD_HD acc_t operator()(T x, T m) const {
    const acc_t xv = static_cast<acc_t>(x), mm = pm * static_cast<acc_t>(m);
    if (!has_x) return q * mm;
    const acc_t inner = px != acc_t(0) ? px * xv + mm : mm;
    return r != acc_t(0) ? r * xv + q * inner : q * inner;
  }

  RGLCD_HD acc_t grad_m(acc_t g) const { return q * (pm * g); }
  RGLCD_HD acc_t grad_x(acc_t g) const {
    if (!has_x) return acc_t(0);
    const acc_t through_x0 = px != acc_t(0) ? q * (px * g) : acc_t(0);
    return r != acc_t(0) ? r * g + through_x0 : through_x0;
  }
};

// docs/design.md §2 parameterisation table, with a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t).
template <typename acc_t>
RGLCD_HD Linear<acc_t> x0_coefficients(acc_t alpha_bar, PredictionType type) {
  const acc_t a = std::sqrt(alpha_bar), s = std::sqrt(acc_t(1) - alpha_bar);
  switch (type) {
    case PredictionType::Epsilon:
      return {acc_t(0), acc_t(1) / a, acc_t(1), -s};  // (x - s m) / a
    case PredictionType::VPrediction:
      return {acc_t(0), acc_t(1), a, -s};  // a x - s m
    default:
      return {acc_t(0), acc_t(1), acc_t(0), acc_t(1), false};  // m
  }
}

template <typename acc_t>
RGLCD_HD Linear<acc_t> eps_coefficients(acc_t alpha_bar, PredictionType type) {
  const acc_t a = std::sqrt(alpha_bar), s = std::sqrt(acc_t(1) - alpha_bar);
  switch (type) {
    case PredictionType::Epsilon:
      return {acc_t(0), acc_t(1), acc_t(0), acc_t(1), false};  // m
    case PredictionType::VPrediction:
      return {acc_t(0), acc_t(1), s, a};  // a m + s x
    default:
      return {acc_t(0), acc_t(1) / s, acc_t(1), -a};  // (x - a m) / s
  }
}

// LCM boundary scalings: c_skip = σ_d² / ((k t)² + σ_d²), c_out = k t / sqrt((k t)² + σ_d²).
template <typename acc_t>
RGLCD_HD void boundary_scalings(acc_t t, acc_t timestep_scaling, acc_t sigma_data, acc_t& c_skip, acc_t& c_out) {
  const acc_t st = timestep_scaling * t, sd2 = sigma_data * sigma_data, denom = st * st + sd2;
  c_skip = sd2 / denom;
  c_out = st / std::sqrt(denom);
}

// Consistency output f = c_skip x + c_out x0(m, x, t), itself linear in (x, m).
template <typename acc_t>
RGLCD_HD Linear<acc_t> consistency_coefficients(acc_t alpha_bar, acc_t t, PredictionType type, acc_t timestep_scaling,
                                                acc_t sigma_data) {
  acc_t c_skip, c_out;
  boundary_scalings(t, timestep_scaling, sigma_data, c_skip, c_out);
  const Linear<acc_t> x0 = x0_coefficients(alpha_bar, type);
  return {c_skip, c_out * x0.q, x0.px, x0.pm};
}

// The consistency-family maps: per-sample coefficients from (ᾱ_t, t); shared by every backend.
struct X0Map {
  PredictionType type;
  template <typename acc_t>
  RGLCD_HD Linear<acc_t> operator()(acc_t alpha_bar, acc_t) const {
    return x0_coefficients(alpha_bar, type);
  }
};
struct EpsMap {
  PredictionType type;
  template <typename acc_t>
  RGLCD_HD Linear<acc_t> operator()(acc_t alpha_bar, acc_t) const {
    return eps_coefficients(alpha_bar, type);
  }
};
struct ConsistencyMap {
  PredictionType type;
  double timestep_scaling, sigma_data;
  template <typename acc_t>
  RGLCD_HD Linear<acc_t> operator()(acc_t alpha_bar, acc_t t) const {
    return consistency_coefficients(alpha_bar, t, type, acc_t(timestep_scaling), acc_t(sigma_data));
  }
};

// ---- solver steps (docs/design.md §2: the guided DDIM step, diffusers' LCM and DDIM steps) ----------

// ᾱ at the previous timestep: the schedule, or final_alpha_cumprod for a negative one (diffusers'
// `alphas_cumprod[prev] if prev >= 0 else final_alpha_cumprod`).
template <typename acc_t>
RGLCD_HD acc_t alpha_bar_prev(const acc_t* table, int64_t prev, acc_t final_alpha_cumprod) {
  return prev >= 0 ? table[prev] : final_alpha_cumprod;
}

// Classifier-free guidance in the LCM paper's form, c + w (c - u). The solver step guides x0 and ε as the LCD
// script does (the same as mapping the guided output, in exact arithmetic; the backward uses that).
template <typename acc_t>
RGLCD_HD acc_t guided(acc_t cond, acc_t uncond, acc_t w) {
  return cond + w * (cond - uncond);
}

// torch.clamp: NaN stays NaN (in the value or in the bounds).
template <typename acc_t>
RGLCD_HD acc_t clamp_nan(acc_t v, acc_t lo, acc_t hi) {
  const acc_t at_least_lo = v < lo ? lo : v;  // torch.clamp's order: bounds that cross give hi
  return at_least_lo > hi ? hi : at_least_lo;
}

// torch.lerp's formula, which torch.quantile uses for its linear interpolation.
template <typename acc_t>
RGLCD_HD acc_t lerp(acc_t start, acc_t end, acc_t weight) {
  return (weight < acc_t(0.5) && weight > acc_t(-0.5)) ? start + weight * (end - start)
                                                       : end - (end - start) * (acc_t(1) - weight);
}

// The clip / dynamic-thresholding of predicted x0 (diffusers clip_sample / _threshold_sample):
// off, clamp(x0, -bound, bound), or clamp(x0, -s, s) / s with the per-sample s as bound.
enum class X0Limit : int { None = 0, Clip = 1, Threshold = 2 };

template <typename acc_t>
struct X0Clamp {
  X0Limit kind;
  acc_t bound;

  RGLCD_HD acc_t operator()(acc_t v) const {
    if (kind == X0Limit::None) return v;
    const acc_t c = clamp_nan(v, -bound, bound);
    return kind == X0Limit::Threshold ? c / bound : c;
  }
};

// The threshold s of _threshold_sample from the ratio-quantile q of |x0| over the sample.
template <typename acc_t>
RGLCD_HD acc_t threshold_from_quantile(acc_t q, acc_t sample_max_value) {
  return clamp_nan(q, acc_t(1), sample_max_value);
}

// torch.quantile's positions for the ratio-quantile of n >= 1 sorted values: rank = ratio·(n − 1)
// computed in acc_t (torch computes it in the quantile's dtype), the indices at its floor and ceiling
// and the lerp weight; quantile = lerp(sorted[below], sorted[above], weight), NaN if any value is NaN.
// (The indices are capped at n − 1: rank can round past it only beyond torch.quantile's 2^24 limit.)
template <typename acc_t>
struct QuantileRank {
  int64_t below, above;
  acc_t weight;
};

template <typename acc_t>
inline QuantileRank<acc_t> quantile_rank(double ratio, int64_t n) {
  const acc_t rank = static_cast<acc_t>(ratio) * static_cast<acc_t>(n - 1);
  const int64_t below = static_cast<int64_t>(rank);
  const int64_t above = static_cast<int64_t>(std::ceil(rank));
  return {std::min(below, n - 1), std::min(above, n - 1), rank - static_cast<acc_t>(below)};
}

// DDIM variance σ_t² / η² of diffusers' _get_variance.
template <typename acc_t>
RGLCD_HD acc_t ddim_variance(acc_t alpha_bar, acc_t alpha_bar_prev) {
  return ((acc_t(1) - alpha_bar_prev) / (acc_t(1) - alpha_bar)) * (acc_t(1) - alpha_bar / alpha_bar_prev);
}

// x0 and ε from (x, m) in diffusers' operation order with the prediction type a compile-time constant (the
// step kernels' loops): the values x0_coefficients / eps_coefficients evaluate.
template <typename acc_t>
RGLCD_HD acc_t x0_from(acc_t x, acc_t m, acc_t a, acc_t s, PredictionType type) {
  switch (type) {
    case PredictionType::Epsilon:
      return (x - s * m) / a;
    case PredictionType::VPrediction:
      return a * x - s * m;
    default:
      return m;
  }
}

template <typename acc_t>
RGLCD_HD acc_t eps_from(acc_t x, acc_t m, acc_t a, acc_t s, PredictionType type) {
  switch (type) {
    case PredictionType::Epsilon:
      return m;
    case PredictionType::VPrediction:
      return a * m + s * x;
    default:
      return (x - a * m) / s;
  }
}

// Per-sample scalars of a DDIM step (diffusers DDIMScheduler.step), a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t):
// prev = sqrt_prev·x0 + c_dir·ε + std_dev·z, with c_dir = sqrt(1 - ᾱ_prev - std_dev²).
// With eta = 0 this is also the LCD teacher's solver step (c_dir = sqrt(1 - ᾱ_prev)).
template <typename acc_t>
struct DdimCoefficients {
  acc_t a, s, sqrt_prev, c_dir, std_dev;
};

template <typename acc_t>
RGLCD_HD DdimCoefficients<acc_t> ddim_coefficients(acc_t alpha_bar, acc_t alpha_bar_prev, acc_t eta) {
  DdimCoefficients<acc_t> c;
  c.a = std::sqrt(alpha_bar);
  c.s = std::sqrt(acc_t(1) - alpha_bar);
  c.std_dev = eta * std::sqrt(ddim_variance(alpha_bar, alpha_bar_prev));
  c.sqrt_prev = std::sqrt(alpha_bar_prev);
  c.c_dir = std::sqrt(acc_t(1) - alpha_bar_prev - c.std_dev * c.std_dev);
  return c;
}

// x_prev of the LCD teacher's solver step, sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev)·ε, in float64 as the script's
// DDIMSolver (float64 tables) computes it: in float32 the square roots and products add ~2 ulp to the training
// target, which the Huber loss's derivative near 0 (c = 0.001) turns into gradient noise.
struct SolverStep {
  double sqrt_prev = 0, c_dir = 0;

  SolverStep() = default;
  RGLCD_HD explicit SolverStep(double alpha_bar_prev)
      : sqrt_prev(std::sqrt(alpha_bar_prev)), c_dir(std::sqrt(1.0 - alpha_bar_prev)) {}

  template <typename acc_t>
  RGLCD_HD double operator()(acc_t x0, acc_t eps) const {
    return sqrt_prev * static_cast<double>(x0) + c_dir * static_cast<double>(eps);
  }
};

// Per-sample scalars of an LCM step (diffusers LCMScheduler.step), a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t):
// denoised = c_out·x0 + c_skip·x; prev = sqrt_prev·denoised + sigma_prev·z (not the last step).
template <typename acc_t>
struct LcmCoefficients {
  acc_t a, s, c_skip, c_out, sqrt_prev, sigma_prev;
};

template <typename acc_t>
RGLCD_HD LcmCoefficients<acc_t> lcm_coefficients(acc_t alpha_bar, acc_t alpha_bar_prev, acc_t t, acc_t timestep_scaling,
                                                 acc_t sigma_data) {
  LcmCoefficients<acc_t> c;
  c.a = std::sqrt(alpha_bar);
  c.s = std::sqrt(acc_t(1) - alpha_bar);
  boundary_scalings(t, timestep_scaling, sigma_data, c.c_skip, c.c_out);
  c.sqrt_prev = std::sqrt(alpha_bar_prev);
  c.sigma_prev = std::sqrt(acc_t(1) - alpha_bar_prev);
  return c;
}

enum class LossType : int { L2 = 0, Huber = 1 };

inline LossType parse_loss_type(std::string_view s) {
  if (s == "l2") return LossType::L2;
  if (s == "huber") return LossType::Huber;
  TORCH_CHECK_VALUE(false, "loss_type must be 'l2' or 'huber', got '", s, "'");
}

// ρ(d) and ρ'(d) of docs/design.md §1 step 7: L2 d², Huber sqrt(d² + c²) - c.
template <typename acc_t>
RGLCD_HD acc_t loss_value(acc_t d, LossType type, acc_t c) {
  return type == LossType::Huber ? std::sqrt(d * d + c * c) - c : d * d;
}

template <typename acc_t>
RGLCD_HD acc_t loss_derivative(acc_t d, LossType type, acc_t c) {
  return type == LossType::Huber ? d / std::sqrt(d * d + c * c) : acc_t(2) * d;
}

// ---- reward family (docs/design.md §2 "Latent reward head", §1 step 9) ----------------------------

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

// ValueError naming the argument unless t lives on the op's `device`: the dispatcher picks the kernel by
// the highest-priority device among the arguments, and a CUDA kernel must not read the host's (or another
// GPU's) memory. Every op body (csrc/ops/) checks each tensor argument against its device.
inline void check_device(const at::Tensor& t, const c10::Device& device, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected device ", device, ", got ", t.device());
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

// ---- host-side argument handling -------------------------------------------------------------

// Per-sample index tensors are [B] or a single element broadcast over the batch.
RGLCD_HD int64_t per_sample_index(int64_t numel, int64_t b) { return numel == 1 ? 0 : b; }

inline int64_t batch_size(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

// The kernels index samples as flat_index / (numel / B); that holds when the batch dimension is
// outermost in a dense layout (contiguous and channels_last both qualify).
inline bool batch_outer_dense(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  const int64_t b = batch_size(t);
  return t.dim() == 0 || b <= 1 || t.numel() == 0 || t.stride(0) * b == t.numel();
}

// Outputs follow empty_like(reference), which is what the fake kernels promise. Kernels run on
// `strides`: those same strides when they are batch-outer dense, else contiguous ones, in which
// case deliver() copies the result into the promised layout (a permuted batch dimension: rare).
struct Layout {
  at::Tensor reference;
  std::vector<int64_t> strides;
  bool direct;

  explicit Layout(const at::Tensor& ref) : reference(ref) {
    const at::Tensor meta = at::empty_like(ref, ref.options().device(at::kMeta));
    direct = batch_outer_dense(meta);
    if (direct) {
      strides = meta.strides().vec();
    } else {
      const auto contiguous = c10::contiguous_strides(ref.sizes());
      strides.assign(contiguous.begin(), contiguous.end());
    }
  }
  at::Tensor output(c10::ScalarType dtype) const {
    return at::empty_strided(reference.sizes(), strides, reference.options().dtype(dtype));
  }
  at::Tensor output() const { return output(reference.scalar_type()); }
  // `t` (same shape) with the working strides, copied only when needed.
  at::Tensor input(const at::Tensor& t) const {
    return t.strides() == c10::IntArrayRef(strides) ? t : output(t.scalar_type()).copy_(t);
  }
  at::Tensor deliver(const at::Tensor& work) const {
    return direct ? work : at::empty_like(reference, work.options()).copy_(work);
  }
};

// A requested gradient, or an empty placeholder for one that was not asked for.
inline at::Tensor unrequested(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Reads a per-sample integer tensor (timesteps, indices) as int64 on its own device.
inline at::Tensor as_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                   ": expected an integer tensor (timesteps / indices), got ", t.scalar_type());
  return t.reshape({-1}).to(at::kLong).contiguous();
}

// CPU-only range check: a clear ValueError naming the argument (CUDA kernels cannot raise without
// a host sync; they write NaN for an out-of-range timestep instead).
inline void check_index_range_cpu(const at::Tensor& idx, int64_t upper, const char* name, bool allow_negative) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK_VALUE((allow_negative || p[i] >= 0) && p[i] < upper, name, ": value ", p[i],
                      " is outside the schedule [0, ", upper, ")");
  }
}

// A per-sample index tensor (timesteps, indices) read on the CPU: int64, [B] or one value, in range.
inline at::Tensor per_sample_index_cpu(const at::Tensor& t, int64_t batch, int64_t upper, const char* name,
                                       bool allow_negative) {
  const at::Tensor idx = as_index(t, name);
  TORCH_CHECK_VALUE(idx.numel() == 1 || idx.numel() == batch, name, ": expected ", batch,
                    " values (one per sample) or one, got ", idx.numel());
  check_index_range_cpu(idx, upper, name, allow_negative);
  return idx;
}

// ValueError naming `name` unless b (the argument of that name) has the shape of a (the argument `like`).
inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* name, const char* like) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), name, ": expected shape ", a.sizes(), " (as ", like, "), got ", b.sizes());
}

// A per-sample float tensor (guidance scales): [B] or one value, flat, contiguous, as `dtype` on its
// own device (no host read).
inline at::Tensor per_sample_values(const at::Tensor& t, int64_t batch, c10::ScalarType dtype, const char* name) {
  const at::Tensor v = t.reshape({-1}).to(dtype).contiguous();
  TORCH_CHECK_VALUE(v.numel() == 1 || v.numel() == batch, name, ": expected ", batch,
                    " values (one per sample) or one, got ", v.numel());
  return v;
}

// ---- solver family: arguments shared by the backends ---------------------------------------------

constexpr double kLcmSigmaData = 0.5;  // LCMScheduler's fixed sigma_data

// The x0 clip / threshold options shared by the LCM and DDIM steps.
struct X0Options {
  X0Limit kind;
  double clip_sample_range, dynamic_thresholding_ratio, sample_max_value;
};

inline X0Options x0_options(bool clip_sample, double clip_sample_range, bool thresholding,
                            double dynamic_thresholding_ratio, double sample_max_value) {
  // diffusers' domain: any clip range and maximum (torch.clamp's rule where bounds cross), q in [0, 1]
  TORCH_CHECK_VALUE(dynamic_thresholding_ratio >= 0 && dynamic_thresholding_ratio <= 1,
                    "dynamic_thresholding_ratio: expected a value in [0, 1] (torch.quantile's q), got ",
                    dynamic_thresholding_ratio);
  const X0Limit kind = thresholding ? X0Limit::Threshold : (clip_sample ? X0Limit::Clip : X0Limit::None);
  return {kind, clip_sample_range, dynamic_thresholding_ratio, sample_max_value};
}

// The inputs of a sampling step (model_output, sample, optional noise: same shape and dtype) in the
// working layout of `sample`.
struct StepInputs {
  Layout layout;
  at::Tensor m, x, z;  // z undefined without noise
  int64_t n, batch, per_sample;

  StepInputs(const at::Tensor& model_output, const at::Tensor& sample, const std::optional<at::Tensor>& noise)
      : layout(sample) {
    TORCH_CHECK_TYPE(at::isFloatingType(sample.scalar_type()),
                     "sample: expected float16, bfloat16, float32 or float64, got ", sample.scalar_type());
    check_same_shape(sample, model_output, "model_output", "sample");
    m = layout.input(model_output);
    x = layout.input(sample);
    if (noise.has_value() && noise->defined()) {
      check_same_shape(sample, *noise, "noise", "sample");
      TORCH_CHECK_TYPE(noise->scalar_type() == sample.scalar_type(), "noise: expected dtype ", sample.scalar_type(),
                       ", got ", noise->scalar_type());
      z = layout.input(*noise);
    }
    TORCH_CHECK_TYPE(model_output.scalar_type() == sample.scalar_type(), "model_output: expected dtype ",
                     sample.scalar_type(), ", got ", model_output.scalar_type());
    n = x.numel();
    batch = batch_size(x);
    per_sample = batch ? n / batch : 1;
  }

  // These inputs with the noise drawn as torch.randn(sample.shape, generator=generator,
  // dtype=sample.dtype, device=sample.device) draws it (a contiguous draw, in the working layout).
  StepInputs with_drawn_noise(const std::optional<at::Generator>& generator) const {
    StepInputs drawn = *this;
    drawn.z = layout.input(at::randn(layout.reference.sizes(), generator, layout.reference.options()));
    return drawn;
  }
};

}  // namespace rglcd_fast
