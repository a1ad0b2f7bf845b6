// Shared helpers for every op family and backend: argument parsing, the per-sample schedule math
// (DESIGN.md §2) as host/device scalar functions, and the batch-outer memory layout.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <c10/util/strides.h>

#include <cmath>
#include <vector>
#include <string_view>

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

// A per-sample linear map of (sample x, model output m): value = cx * x + cm * m. has_x is false
// where the formula does not read x at all (so an Inf in x cannot turn into 0 * Inf = NaN).
template <typename acc_t>
struct Linear {
  acc_t cx, cm;
  bool has_x = true;

  template <typename T>
  RGLCD_HD acc_t operator()(T x, T m) const {
    const acc_t mm = cm * static_cast<acc_t>(m);
    return has_x ? cx * static_cast<acc_t>(x) + mm : mm;
  }
};

// DESIGN.md §2 parameterisation table, with a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t).
template <typename acc_t>
RGLCD_HD Linear<acc_t> x0_coefficients(acc_t alpha_bar, PredictionType type) {
  const acc_t a = std::sqrt(alpha_bar), s = std::sqrt(acc_t(1) - alpha_bar);
  switch (type) {
    case PredictionType::Epsilon: return {acc_t(1) / a, -s / a};     // (x - s m) / a
    case PredictionType::VPrediction: return {a, -s};                 // a x - s m
    default: return {acc_t(0), acc_t(1), false};                      // m
  }
}

template <typename acc_t>
RGLCD_HD Linear<acc_t> eps_coefficients(acc_t alpha_bar, PredictionType type) {
  const acc_t a = std::sqrt(alpha_bar), s = std::sqrt(acc_t(1) - alpha_bar);
  switch (type) {
    case PredictionType::Epsilon: return {acc_t(0), acc_t(1), false}; // m
    case PredictionType::VPrediction: return {s, a};                  // a m + s x
    default: return {acc_t(1) / s, -a / s};                           // (x - a m) / s
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
RGLCD_HD Linear<acc_t> consistency_coefficients(acc_t alpha_bar, acc_t t, PredictionType type,
                                                acc_t timestep_scaling, acc_t sigma_data) {
  acc_t c_skip, c_out;
  boundary_scalings(t, timestep_scaling, sigma_data, c_skip, c_out);
  const Linear<acc_t> x0 = x0_coefficients(alpha_bar, type);
  return {c_skip + c_out * x0.cx, c_out * x0.cm};
}

// The consistency-family maps: per-sample coefficients from (ᾱ_t, t); shared by every backend.
struct X0Map {
  PredictionType type;
  template <typename acc_t>
  RGLCD_HD Linear<acc_t> operator()(acc_t alpha_bar, acc_t) const { return x0_coefficients(alpha_bar, type); }
};
struct EpsMap {
  PredictionType type;
  template <typename acc_t>
  RGLCD_HD Linear<acc_t> operator()(acc_t alpha_bar, acc_t) const { return eps_coefficients(alpha_bar, type); }
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

// ρ(d) and ρ'(d) of DESIGN.md §1 step 7: L2 d², Huber sqrt(d² + c²) - c.
template <typename acc_t>
RGLCD_HD acc_t loss_value(acc_t d, LossType type, acc_t c) {
  return type == LossType::Huber ? std::sqrt(d * d + c * c) - c : d * d;
}

template <typename acc_t>
RGLCD_HD acc_t loss_derivative(acc_t d, LossType type, acc_t c) {
  return type == LossType::Huber ? d / std::sqrt(d * d + c * c) : acc_t(2) * d;
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
inline at::Tensor as_index(const at::Tensor& t) { return t.reshape({-1}).to(at::kLong).contiguous(); }

// CPU-only range check: a clear ValueError naming the argument (CUDA kernels cannot raise without
// a host sync; they write NaN for an out-of-range timestep instead).
inline void check_index_range_cpu(const at::Tensor& idx, int64_t upper, const char* name, bool allow_negative) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK_VALUE((allow_negative || p[i] >= 0) && p[i] < upper, name, ": value ", p[i],
                      " is outside the schedule [0, ", upper, ")");
  }
}

}  // namespace rglcd_fast
