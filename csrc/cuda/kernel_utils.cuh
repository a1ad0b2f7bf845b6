// CUDA helpers shared by the op families: 16-byte vector access, per-sample schedule look-ups,
// launch shapes and deterministic block reductions.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "common.h"

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

}  // namespace cuda
}  // namespace rglcd_fast
