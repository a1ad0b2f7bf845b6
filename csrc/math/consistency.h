// The consistency family's scalar math (docs/design.md §2 parameterisation table, boundary scalings,
// distillation loss) for host and device: per-sample linear maps of (x, m) and the loss ρ.
#pragma once

#include "common.h"

namespace rglcd_fast {

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

}  // namespace rglcd_fast
