// CPU loop helpers shared by the op families: per-sample chunked parallel loops over a
// batch-outer dense layout, and deterministic block reductions.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace rglcd_fast {
namespace cpu {

constexpr int64_t kGrain = 32768;        // elements per parallel task
constexpr int64_t kReduceBlock = 16384;  // elements per reduction partial (fixed: results do not depend on threads)

// Calls body(b, begin, end) on runs of flat indices that all belong to sample b.
template <typename Body>
inline void for_each_sample_run(int64_t begin, int64_t end, int64_t per_sample, const Body& body) {
  while (begin < end) {
    const int64_t b = begin / per_sample;
    const int64_t stop = std::min(end, (b + 1) * per_sample);
    body(b, begin, stop);
    begin = stop;
  }
}

template <typename Body>
inline void parallel_sample_runs(int64_t n, int64_t per_sample, const Body& body) {
  if (n == 0) return;
  at::parallel_for(0, n, kGrain,
                   [&](int64_t begin, int64_t end) { for_each_sample_run(begin, end, per_sample, body); });
}

// Deterministic reduction: fixed-size blocks, each reduced by body(b, begin, end) -> T over its
// per-sample runs, then the partials added in order (results do not depend on the thread count).
// T is any value type with T{} as zero and +=.
template <typename T, typename Body>
inline T blocked_reduce(int64_t n, int64_t per_sample, const Body& body) {
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<T> partial(blocks, T{});
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) {
      T s{};
      for_each_sample_run(k * kReduceBlock, std::min(n, (k + 1) * kReduceBlock), per_sample,
                          [&](int64_t b, int64_t i0, int64_t i1) { s += body(b, i0, i1); });
      partial[k] = s;
    }
  });
  T total{};
  for (const T& p : partial) total += p;
  return total;
}

template <typename Body>
inline double blocked_sum(int64_t n, int64_t per_sample, const Body& body) {
  return blocked_reduce<double>(n, per_sample, body);
}

// Element offsets of the rows of t (all dimensions but the last, in row-major order), read from
// its strides: any layout of the leading dimensions, broadcast (stride 0) ones included.
inline std::vector<int64_t> row_offsets(const at::Tensor& t) {
  const int64_t dims = t.dim() - 1;
  int64_t rows = 1;
  for (int64_t d = 0; d < dims; ++d) rows *= t.size(d);
  std::vector<int64_t> out(rows);
  std::vector<int64_t> index(std::max<int64_t>(dims, 0), 0);
  int64_t offset = 0;
  for (int64_t r = 0; r < rows; ++r) {
    out[r] = offset;
    for (int64_t d = dims - 1; d >= 0; --d) {  // odometer increment
      offset += t.stride(d);
      if (++index[d] < t.size(d)) break;
      offset -= t.stride(d) * t.size(d);
      index[d] = 0;
    }
  }
  return out;
}

// Sum of term(i) over [begin, end) in double, in 8 independent lanes so the loop vectorises
// (a single running sum is a serial dependency chain the compiler may not reorder).
template <typename Term>
inline double lane_sum(int64_t begin, int64_t end, const Term& term) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(term(i + j));
  }
  for (; i < end; ++i) lanes[0] += static_cast<double>(term(i));
  double total = 0;
  for (double lane : lanes) total += lane;
  return total;
}

// Calls body(std::bool_constant<flags>...) so that loop-invariant flags become compile-time
// constants: the inner loops then carry no branches and vectorise.
template <typename Body>
inline void with_flags(const Body& body, bool flag) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

template <typename Body, typename... Rest>
inline void with_flags(const Body& body, bool flag, Rest... rest) {
  with_flags([&](auto first) { with_flags([&](auto... others) { body(first, others...); }, rest...); }, flag);
}

// Per-sample values of an index tensor read on the host, and the schedule as acc_t.
template <typename acc_t>
inline std::vector<acc_t> schedule_values(const at::Tensor& alphas_cumprod) {
  auto table = alphas_cumprod.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = table.template data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + table.numel());
}

}  // namespace cpu
}  // namespace rglcd_fast
