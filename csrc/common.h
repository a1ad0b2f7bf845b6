// Shared host helpers of every op family and backend: the prediction type, device checks, per-sample
// index and value tensors, and the batch-outer memory layout. Each family's scalar math (host and device)
// is in csrc/math/<family>.h.
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

// ValueError naming the argument unless t lives on the op's `device`: the dispatcher picks the kernel by
// the highest-priority device among the arguments, and a CUDA kernel must not read the host's (or another
// GPU's) memory. Every op body (csrc/ops/) checks each tensor argument against its device.
inline void check_device(const at::Tensor& t, const c10::Device& device, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected device ", device, ", got ", t.device());
}

// The schedule arguments every per-sample op reads on the device: timesteps and ᾱ.
inline void check_schedule_devices(const c10::Device& device, const at::Tensor& timesteps,
                                   const at::Tensor& alphas_cumprod) {
  check_device(timesteps, device, "timesteps");
  check_device(alphas_cumprod, device, "alphas_cumprod");
}

}  // namespace rglcd_fast
