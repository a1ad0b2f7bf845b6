// CUDA helpers shared by the op families: 16-byte vector access, per-sample schedule look-ups,
// launch shapes and deterministic block reductions. Host-side helpers here only read metadata or
// enqueue work on the current stream: nothing synchronises with the device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "common.h"
#include "math/consistency.h"

namespace rglcd_fast {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kReduceBlocks = 1024;  // fixed: the reduction order, hence the bits, never change

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte access, or 1 when a pointer is not 16-byte aligned or a vector would
// straddle two samples (per_sample not a multiple of it).
template <typename scalar_t>
inline int vector_width(int64_t per_sample, std::initializer_list<const void*> pointers) {
  constexpr int width = 16 / sizeof(scalar_t);
  if (per_sample % width != 0) return 1;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return width;
}

inline unsigned blocks_for(int64_t work_items) {
  return static_cast<unsigned>(std::max<int64_t>(1, (work_items + kThreads - 1) / kThreads));
}

// ᾱ at an integer timestep; NaN when outside the schedule (a kernel cannot raise without a host
// sync, so an out-of-range timestep poisons its sample's outputs instead of reading out of bounds).
template <typename acc_t>
__device__ __forceinline__ acc_t schedule_at(const acc_t* table, int64_t length, int64_t t) {
  return (t >= 0 && t < length) ? table[t] : std::numeric_limits<acc_t>::quiet_NaN();
}

// Sum over the block (every thread gets the total). Shuffles within warps, then across warps.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  value = threadIdx.x < warps ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) warp_sums[0] = value;
  }
  __syncthreads();
  const acc_t total = warp_sums[0];
  __syncthreads();  // warp_sums may be reused by a following call
  return total;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---- added for the reward family: warp sums, one-value tensors read and written on the device ----

// Sum over a warp, every lane gets the total: a xor butterfly, so a fixed order, and since each
// step adds the same two values on both lanes, bitwise the same total on every lane.
template <typename T>
__device__ __forceinline__ T warp_all_sum(T value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// One value of a floating tensor ([] or [1], any floating dtype) that a kernel reads or writes on
// the device: no host copy (graph capturable) and no dtype-conversion launch. A CPU tensor is read
// on the host instead (a plain load, no device synchronisation) and passed by value.
struct DeviceScalar {
  enum Kind : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3, Immediate = 4 };
  void* ptr;
  Kind kind;
  double value;  // Immediate

  static DeviceScalar of(const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.numel() == 1, "expected a single value, got shape ", t.sizes());
    if (!t.is_cuda()) return {nullptr, Immediate, t.item<double>()};
    Kind kind;
    switch (t.scalar_type()) {
      case at::kFloat:
        kind = Float;
        break;
      case at::kDouble:
        kind = Double;
        break;
      case at::kHalf:
        kind = Half;
        break;
      case at::kBFloat16:
        kind = BFloat16;
        break;
      default:
        TORCH_CHECK_TYPE(false, "expected a floating tensor, got ", t.scalar_type());
    }
    return {t.data_ptr(), kind, 0.0};
  }

  template <typename T>
  __device__ __forceinline__ T load() const {
    switch (kind) {
      case Float:
        return static_cast<T>(*static_cast<const float*>(ptr));
      case Double:
        return static_cast<T>(*static_cast<const double*>(ptr));
      case Half:
        return static_cast<T>(static_cast<float>(*static_cast<const c10::Half*>(ptr)));
      case BFloat16:
        return static_cast<T>(static_cast<float>(*static_cast<const c10::BFloat16*>(ptr)));
      default:
        return static_cast<T>(value);
    }
  }

  // v in the tensor's dtype, converted as at::full(sizes, double) converts on the CPU (through float
  // for half and bfloat16).
  __device__ __forceinline__ void store(double v) const {
    switch (kind) {
      case Float:
        *static_cast<float*>(ptr) = static_cast<float>(v);
        break;
      case Double:
        *static_cast<double*>(ptr) = v;
        break;
      case Half:
        *static_cast<c10::Half*>(ptr) = static_cast<c10::Half>(static_cast<float>(v));
        break;
      case BFloat16:
        *static_cast<c10::BFloat16*>(ptr) = static_cast<c10::BFloat16>(static_cast<float>(v));
        break;
      default:
        break;
    }
  }
};

}  // namespace cuda

using cuda::Vec;

template <typename scalar_t, int N>
__device__ __forceinline__ Vec<scalar_t, N> load(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, N>*>(p);
}

template <typename scalar_t, int N>
__device__ __forceinline__ void store(scalar_t* p, const Vec<scalar_t, N>& v) {
  *reinterpret_cast<Vec<scalar_t, N>*>(p) = v;
}

// Runs launch(std::integral_constant<int, W>) for the widest vector the pointers allow.
template <typename scalar_t, typename Launch>
void with_vector_width(int64_t per_sample, std::initializer_list<const void*> pointers, const Launch& launch) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (cuda::vector_width<scalar_t>(per_sample, pointers) == wide) {
    launch(std::integral_constant<int, wide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename T>
T* pointer_or_null(at::Tensor& t, bool wanted) {
  return wanted ? t.mutable_data_ptr<T>() : nullptr;
}

// A per-sample index tensor (timesteps, indices) as int64 on its own device, [B] or one value. Its
// range is not checked here (that would read it on the host): the kernels map an out-of-range value
// to NaN through schedule_at.
inline at::Tensor per_sample_index_cuda(const at::Tensor& t, int64_t batch, const char* name) {
  at::Tensor idx = as_index(t, name);
  TORCH_CHECK_VALUE(idx.numel() == 1 || idx.numel() == batch, name, ": expected ", batch,
                    " values (one per sample) or one, got ", idx.numel());
  return idx;
}

// Per-sample schedule look-up: timesteps (int64, one or B values) and ᾱ in acc_t.
template <typename acc_t>
struct SampleSchedule {
  const int64_t* timesteps;
  int64_t timesteps_numel;
  const acc_t* table;
  int64_t length;

  __device__ __forceinline__ int64_t timestep(int64_t b) const {
    return timesteps[per_sample_index(timesteps_numel, b)];
  }
  // ᾱ[t], NaN outside the schedule.
  __device__ __forceinline__ acc_t alpha_bar(int64_t t) const { return cuda::schedule_at(table, length, t); }

  template <typename Map>
  __device__ __forceinline__ Linear<acc_t> coefficients(const Map& map, int64_t b) const {
    const int64_t t = timestep(b);
    return map(alpha_bar(t), static_cast<acc_t>(t));
  }
};

// Owns the (possibly converted) index and schedule tensors behind a SampleSchedule.
struct ScheduleTensors {
  at::Tensor timesteps, table;
  ScheduleTensors(const at::Tensor& ts, const at::Tensor& alphas_cumprod, int64_t batch, at::ScalarType acc_type)
      : timesteps(per_sample_index_cuda(ts, batch, "timesteps")), table(alphas_cumprod.to(acc_type).contiguous()) {}
  template <typename acc_t>
  SampleSchedule<acc_t> view() const {
    return {timesteps.const_data_ptr<int64_t>(), timesteps.numel(), table.const_data_ptr<acc_t>(), table.numel()};
  }
};
}  // namespace rglcd_fast
