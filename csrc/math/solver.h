// The solver family's scalar math (docs/design.md §2: the guided DDIM step, diffusers' LCM and DDIM steps)
// for host and device: per-sample step coefficients, guidance, the x0 clip and threshold.
#pragma once

#include "common.h"
#include "math/consistency.h"

namespace rglcd_fast {

// ᾱ at the previous timestep: the schedule, or final_alpha_cumprod for a negative one (diffusers'
// `alphas_cumprod[prev] if prev >= 0 else final_alpha_cumprod`).
template <typename acc_t>
RGLCD_HD acc_t alpha_bar_prev(const acc_t* table, int64_t prev, acc_t final_alpha_cumprod) {
  return prev >= 0 ? table[prev] : final_alpha_cumprod;
}

// The guided step's working type, forward and backward on every backend: float32 inputs in double. The guidance
// amplifies (w up to ~15 on outputs up to 1e4) and x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev)·ε cancels: in float32
// one ulp of x0 became ~23 ulps of x_prev in a fuzz case where PyTorch's op-by-op float32 happened to make ~6.
template <typename scalar_t>
using guided_acc_t = std::conditional_t<std::is_same_v<scalar_t, float>, double, at::opmath_type<scalar_t>>;

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

}  // namespace rglcd_fast
