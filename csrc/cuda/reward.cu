// CUDA kernels of the reward family (docs/design.md §2 "Latent reward head", §1 step 9), the same math as
// csrc/cpu/reward.cpp: the CLIP-style reward head score = scale·cos(u, v) and the latent reward
// model's pairwise preference loss, with backwards.
//
// Reward head: one warp per image row (norms and dot in float64, head_acc_t, a fixed lane order and butterfly).
// Row offsets come from the (coalesced) leading sizes and strides, decomposed in the kernel: any
// layout of the leading dims, text features broadcast with stride 0, no host-side offset tables.
// Backward in two launches: (1) per image row, grad_u and the row's coefficients, stored at the
// row's slot (text row, member) — the image rows that share a text row, in ascending row order;
// (2) per text row and column chunk, grad_v summed over those members in that order (as the CPU
// kernel does), plus one block that sums the rows' grad_scale terms in slot order, in double.
// Pairwise loss: one block over b in a fixed order (block_sum); backward: one thread per b.
// No host synchronisation anywhere; the logit scale and the upstream loss gradient are read on the
// device, so every op is CUDA-graph capturable. No float atomics: bitwise reproducible. The ops
// around the kernels (argument checks, registration): csrc/ops/reward.h.
#include <torch/library.h>

#include "common.h"
#include "cuda/kernel_utils.cuh"
#include "ops/reward.h"

namespace rglcd_fast {
namespace {

using cuda::DeviceScalar;

constexpr int kWarp = 32;

// ---- reward head: row geometry ------------------------------------------------------------------

constexpr int kMaxRowDims = 8;

// The leading (row) dims of the image features, size-1 dims dropped and neighbours merged where
// both the image and the broadcast text strides allow: sizes, image strides (elements) and the text
// row strides (rows of the contiguous text features; 0 where the text is broadcast).
struct RowGeometry {
  int dims;
  int64_t size[kMaxRowDims];
  int64_t image_stride[kMaxRowDims];
  int64_t text_row_stride[kMaxRowDims];
  int64_t members;  // image rows per text row (the product of the broadcast sizes)
  bool narrow;      // every row index fits 32 bits: 32-bit divisions (a 64-bit one is a slow call)

  struct Place {
    int64_t image_offset, text_row, slot;  // slot = text_row · members + rank among its members
  };

  // Row r in row-major order: its image offset, its text row, and its slot. The members of a text
  // row, ranked by the row-major index over the broadcast dims, are in ascending r.
  __device__ __forceinline__ Place place(int64_t r) const {
    int64_t image = 0, text = 0, member = 0, weight = 1;
#pragma unroll
    for (int d = kMaxRowDims - 1; d >= 0; --d) {
      if (d < dims) {
        int64_t i;
        if (narrow) {
          const uint32_t r32 = static_cast<uint32_t>(r), s32 = static_cast<uint32_t>(size[d]);
          i = r32 % s32;
          r = r32 / s32;
        } else {
          i = r % size[d];
          r /= size[d];
        }
        image += i * image_stride[d];
        text += i * text_row_stride[d];
        if (text_row_stride[d] == 0) {
          member += i * weight;
          weight *= size[d];
        }
      }
    }
    return {image, text, text * members + member};
  }
};

// Builds the geometry of image rows against text rows (text contiguous, its own shape); false when
// more than kMaxRowDims dims remain after merging.
bool build_row_geometry(const at::Tensor& image, const at::Tensor& text, RowGeometry& g) {
  const int64_t leading = image.dim() - 1, lead = image.dim() - text.dim(), dim = image.size(-1);
  int n = 0;
  for (int64_t d = 0; d < leading; ++d) {
    const int64_t s = image.size(d);
    if (s == 1) continue;
    const int64_t td = d - lead;
    const int64_t t = (td < 0 || text.size(td) == 1) ? 0 : text.stride(td) / dim;
    if (n > 0 && g.image_stride[n - 1] == image.stride(d) * s && g.text_row_stride[n - 1] == t * s) {
      g.size[n - 1] *= s;
      g.image_stride[n - 1] = image.stride(d);
      g.text_row_stride[n - 1] = t;
      continue;
    }
    if (n == kMaxRowDims) return false;
    g.size[n] = s;
    g.image_stride[n] = image.stride(d);
    g.text_row_stride[n] = t;
    ++n;
  }
  g.dims = n;
  for (int d = n; d < kMaxRowDims; ++d) g.size[d] = 1, g.image_stride[d] = 0, g.text_row_stride[d] = 0;
  return true;
}

// The two feature tensors as the kernels read them (as the CPU's FeatureRows): the image with
// unit-stride features, the text contiguous in its own shape; rows, feature dim, text rows.
struct FeatureGeometry {
  at::Tensor image, text;
  RowGeometry geometry;
  int64_t rows, dim, text_rows;

  FeatureGeometry(const at::Tensor& image_features, const at::Tensor& text_features) {
    dim = image_features.size(-1);
    image = image_features.stride(-1) == 1 ? image_features : image_features.contiguous();
    text = text_features.contiguous();
    if (!build_row_geometry(image, text, geometry)) {
      image = image.contiguous();
      TORCH_CHECK_VALUE(build_row_geometry(image, text, geometry), "text_features: a broadcast of ",
                        text_features.sizes(), " to ", image_features.sizes(), " over more than ", kMaxRowDims,
                        " separate groups of dims is not supported on CUDA");
    }
    rows = image.numel() / dim;
    text_rows = text.numel() / dim;
    geometry.members = text_rows > 0 ? rows / text_rows : 0;
    geometry.narrow = rows <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max());
  }

  // 16-byte vectors when the feature dim, every row offset and the pointers allow.
  template <typename scalar_t>
  int vector_width(std::initializer_list<const void*> outputs) const {
    constexpr int wide = 16 / sizeof(scalar_t);
    if (cuda::vector_width<scalar_t>(dim, {image.const_data_ptr(), text.const_data_ptr()}) != wide ||
        cuda::vector_width<scalar_t>(dim, outputs) != wide)
      return 1;
    for (int d = 0; d < geometry.dims; ++d) {
      if (geometry.image_stride[d] % wide != 0) return 1;
    }
    return wide;
  }
};

template <typename scalar_t, typename Launch>
void with_row_vector_width(int width, const Launch& launch) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (width == wide) {
    launch(std::integral_constant<int, wide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// ---- reward head: kernels ------------------------------------------------------------------------

constexpr int kRowWarps = 4;  // image rows per block
constexpr int kRowThreads = kRowWarps * kWarp;
constexpr int kTextThreads = 128;

// ⟨u, v⟩, ‖u‖², ‖v‖² of one row, by one warp; every lane gets the sums.
template <typename scalar_t, int VEC>
__device__ __forceinline__ CosineSums<head_acc_t> warp_cosine_sums(const scalar_t* __restrict__ u,
                                                                   const scalar_t* __restrict__ v, int64_t dim,
                                                                   int lane) {
  using acc_t = head_acc_t;
  acc_t dot = 0, uu = 0, vv = 0;
#pragma unroll 4  // several loads in flight per lane: at these sizes the kernels are latency bound
  for (int64_t i = static_cast<int64_t>(lane) * VEC; i < dim; i += kWarp * VEC) {
    const auto x = load<scalar_t, VEC>(u + i), y = load<scalar_t, VEC>(v + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t a = static_cast<acc_t>(x.v[k]), b = static_cast<acc_t>(y.v[k]);
      dot += a * b;
      uu += a * a;
      vv += b * b;
    }
  }
  return {cuda::warp_all_sum(dot), cuda::warp_all_sum(uu), cuda::warp_all_sum(vv)};
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    reward_head_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ v, scalar_t* __restrict__ scores,
                       RowGeometry geometry, int64_t rows, int64_t dim, DeviceScalar logit_scale) {
  using acc_t = head_acc_t;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (r >= rows) return;  // the whole warp
  const int lane = threadIdx.x % kWarp;
  const auto place = geometry.place(r);
  const auto sums = warp_cosine_sums<scalar_t, VEC>(u + place.image_offset, v + place.text_row * dim, dim, lane);
  if (lane == 0) scores[r] = static_cast<scalar_t>(cosine_score(sums, logit_scale.load<acc_t>()));
}

// What the second backward pass needs of an image row, at its slot.
template <typename acc_t>
struct RowCoefficients {
  CosineGrad<acc_t> grad;
  int64_t image_offset;
};

// Per image row: grad_u (when asked), and the row's coefficients at its slot (when grad_v or grad_scale
// are asked).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    reward_head_backward_rows_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ u,
                                     const scalar_t* __restrict__ v, scalar_t* __restrict__ grad_u,
                                     RowCoefficients<head_acc_t>* __restrict__ coefficients, RowGeometry geometry,
                                     int64_t rows, int64_t dim, DeviceScalar logit_scale) {
  using acc_t = head_acc_t;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const auto place = geometry.place(r);
  const scalar_t* ur = u + place.image_offset;
  const scalar_t* vr = v + place.text_row * dim;
  const auto sums = warp_cosine_sums<scalar_t, VEC>(ur, vr, dim, lane);
  const CosineGrad<acc_t> c = cosine_score_grad(sums, logit_scale.load<acc_t>(), static_cast<acc_t>(grad[r]));
  if (grad_u != nullptr) {
    scalar_t* out = grad_u + r * dim;
#pragma unroll 4
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < dim; i += kWarp * VEC) {
      const auto x = load<scalar_t, VEC>(ur + i), y = load<scalar_t, VEC>(vr + i);
      Vec<scalar_t, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        o.v[k] = static_cast<scalar_t>(c.grad_u(static_cast<acc_t>(x.v[k]), static_cast<acc_t>(y.v[k])));
      store(out + i, o);
    }
  }
  if (coefficients != nullptr && lane == 0) coefficients[place.slot] = {c, place.image_offset};
}

// Blocks [0, text_blocks): text row j, a chunk of kTextThreads·VEC features: grad_v = Σ over the
// row's members, in ascending image row order, of their grad_v terms (zeros for no members). The
// block after them (when grad_scale is asked): grad_scale = Σ g·c over the rows, in double, slot order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kTextThreads)
    reward_head_backward_text_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ v,
                                     const RowCoefficients<head_acc_t>* __restrict__ coefficients,
                                     scalar_t* __restrict__ grad_v, int64_t text_blocks, int64_t chunks,
                                     int64_t members, int64_t rows, int64_t dim, DeviceScalar grad_scale) {
  using acc_t = head_acc_t;
  const unsigned block = blockIdx.x;  // < 2^31 (grid_size), so 32-bit division
  if (block < text_blocks) {
    const int64_t j = block / static_cast<unsigned>(chunks);
    const int64_t i = (static_cast<int64_t>(block % static_cast<unsigned>(chunks)) * kTextThreads + threadIdx.x) * VEC;
    if (i >= dim) return;
    const auto y = load<scalar_t, VEC>(v + j * dim + i);
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    const RowCoefficients<acc_t>* row = coefficients + j * members;
#pragma unroll 2  // a text row broadcast over many image rows is a serial loop here: keep loads in flight
    for (int64_t m = 0; m < members; ++m) {
      const RowCoefficients<acc_t> c = row[m];
      const auto x = load<scalar_t, VEC>(u + c.image_offset + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += c.grad.grad_v(static_cast<acc_t>(x.v[k]), static_cast<acc_t>(y.v[k]));
    }
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc[k]);
    store(grad_v + j * dim + i, o);
    return;
  }
  double total = 0.0;
  for (int64_t s = threadIdx.x; s < rows; s += kTextThreads)
    total += static_cast<double>(coefficients[s].grad.grad_scale);
  total = cuda::block_sum(total);
  if (threadIdx.x == 0) grad_scale.store(total);
}

// ---- pairwise preference loss ---------------------------------------------------------------------

constexpr int kLossThreads = 512;

// One block: Σ_b Σ_{i<j} loss (each b's sum in acc_t, the b's summed in double) and the hits, in a
// fixed order; loss = Σ / B, accuracy = hits / (pairs · B) (0/0 = NaN for an empty batch, as torch).
template <typename scalar_t>
__global__ void __launch_bounds__(kLossThreads)
    pairwise_loss_kernel(PairLogits<scalar_t> x, int K, int64_t B, PreferenceRule rule,
                         at::opmath_type<scalar_t>* __restrict__ loss,
                         at::opmath_type<scalar_t>* __restrict__ accuracy) {
  using acc_t = at::opmath_type<scalar_t>;
  double total = 0.0;
  long long hits = 0;
  for (int64_t b = threadIdx.x; b < B; b += kLossThreads) {
    acc_t loss_b = 0;
    for (int i = 0; i + 1 < K; ++i) {
      const acc_t si = x.template student<acc_t>(i, b), ei = x.template expert<acc_t>(i, b);
      for (int j = i + 1; j < K; ++j) {
        const acc_t sj = x.template student<acc_t>(j, b), ej = x.template expert<acc_t>(j, b);
        loss_b += pair_loss(pair_target(ei, ej, i, j, rule), pair_difference(si, sj));
        hits += pair_argmax(si, sj) == pair_label(ei, ej, i, j, rule);
      }
    }
    total += static_cast<double>(loss_b);
  }
  total = cuda::block_sum(total);
  hits = cuda::block_sum(hits);
  if (threadIdx.x == 0) {
    const double batch = static_cast<double>(B), pairs = static_cast<double>(K) * (K - 1) / 2;
    *loss = static_cast<acc_t>(total / batch);
    *accuracy = static_cast<acc_t>(static_cast<double>(hits) / (pairs * batch));
  }
}

// grad_S[k, b] = grad_loss / B · (Σ_{j>k} (q − p)_{kj} − Σ_{i<k} (q − p)_{ik}): one thread per b, each
// k's terms added in the CPU kernel's pair order (all (i, k) before all (k, j)).
template <typename scalar_t>
__global__ void __launch_bounds__(cuda::kThreads)
    pairwise_loss_backward_kernel(PairLogits<scalar_t> x, int K, int64_t B, PreferenceRule rule, DeviceScalar grad_loss,
                                  scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const acc_t scale = static_cast<acc_t>(grad_loss.load<double>() / static_cast<double>(B));
  for (int k = 0; k < K; ++k) {
    const acc_t sk = x.template student<acc_t>(k, b), ek = x.template expert<acc_t>(k, b);
    acc_t acc = 0;
    for (int i = 0; i < k; ++i) {
      const acc_t si = x.template student<acc_t>(i, b), ei = x.template expert<acc_t>(i, b);
      acc -= pair_loss_grad(pair_target_p0(ei, ek, i, k, rule), pair_difference(si, sk));
    }
    for (int j = k + 1; j < K; ++j) {
      const acc_t sj = x.template student<acc_t>(j, b), ej = x.template expert<acc_t>(j, b);
      acc += pair_loss_grad(pair_target_p0(ek, ej, k, j, rule), pair_difference(sk, sj));
    }
    out[k * B + b] = static_cast<scalar_t>(scale * acc);
  }
}

void check_candidate_count(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.size(0) <= std::numeric_limits<int>::max(), "logits: too many candidates");
}

// ---- host -----------------------------------------------------------------------------------------

unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "rglcd_fast: too many rows for one launch");
  return static_cast<unsigned>(std::max<int64_t>(1, blocks));
}

// The backend of ops/reward.h.
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;

  static void reward_head(const at::Tensor& image_features, const at::Tensor& text_features,
                          const at::Tensor& logit_scale, at::Tensor& scores) {
    const FeatureGeometry f(image_features, text_features);
    if (f.rows == 0) return;
    const DeviceScalar scale = DeviceScalar::of(logit_scale);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, f.image.scalar_type(), "rglcd_fast_reward_head_cuda", [&] {
          const scalar_t* up = f.image.const_data_ptr<scalar_t>();
          const scalar_t* vp = f.text.const_data_ptr<scalar_t>();
          scalar_t* out = scores.mutable_data_ptr<scalar_t>();
          with_row_vector_width<scalar_t>(f.vector_width<scalar_t>({}), [&](auto width) {
            constexpr int W = decltype(width)::value;
            reward_head_kernel<scalar_t, W>
                <<<grid_size((f.rows + kRowWarps - 1) / kRowWarps), kRowThreads, 0, cuda::current_stream()>>>(
                    up, vp, out, f.geometry, f.rows, f.dim, scale);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
  }

  static void reward_head_backward(const at::Tensor& grad, const at::Tensor& image_features,
                                   const at::Tensor& text_features, const at::Tensor& logit_scale,
                                   std::array<bool, 3> mask, at::Tensor& grad_u, at::Tensor& grad_v,
                                   at::Tensor& grad_s) {
    const FeatureGeometry f(image_features, text_features);
    const at::Tensor g = grad.contiguous();
    const bool second_pass = mask[1] || mask[2];
    const DeviceScalar scale = DeviceScalar::of(logit_scale);
    const DeviceScalar scale_out =
        mask[2] ? DeviceScalar::of(grad_s) : DeviceScalar{nullptr, DeviceScalar::Immediate, 0.0};
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, f.image.scalar_type(), "rglcd_fast_reward_head_bwd_cuda", [&] {
          using acc_t = head_acc_t;
          using Coefficients = RowCoefficients<acc_t>;
          const scalar_t* up = f.image.const_data_ptr<scalar_t>();
          const scalar_t* vp = f.text.const_data_ptr<scalar_t>();
          scalar_t* gu = mask[0] ? grad_u.mutable_data_ptr<scalar_t>() : nullptr;
          scalar_t* gv = mask[1] ? grad_v.mutable_data_ptr<scalar_t>() : nullptr;
          at::Tensor scratch;
          Coefficients* coefficients = nullptr;
          if (second_pass && f.rows > 0) {
            scratch =
                at::empty({f.rows * static_cast<int64_t>(sizeof(Coefficients))}, f.image.options().dtype(at::kByte));
            coefficients = reinterpret_cast<Coefficients*>(scratch.mutable_data_ptr());
          }
          const cudaStream_t stream = cuda::current_stream();
          with_row_vector_width<scalar_t>(f.vector_width<scalar_t>({gu, gv}), [&](auto width) {
            constexpr int W = decltype(width)::value;
            if (f.rows > 0) {
              reward_head_backward_rows_kernel<scalar_t, W>
                  <<<grid_size((f.rows + kRowWarps - 1) / kRowWarps), kRowThreads, 0, stream>>>(
                      g.const_data_ptr<scalar_t>(), up, vp, gu, coefficients, f.geometry, f.rows, f.dim, scale);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            if (second_pass) {
              const int64_t chunks = (f.dim + kTextThreads * W - 1) / (kTextThreads * W);
              const int64_t text_blocks = mask[1] ? f.text_rows * chunks : 0;
              const int64_t blocks = text_blocks + (mask[2] ? 1 : 0);
              if (blocks > 0) {
                reward_head_backward_text_kernel<scalar_t, W><<<grid_size(blocks), kTextThreads, 0, stream>>>(
                    up, vp, coefficients, gv, text_blocks, chunks, f.geometry.members, f.rows, f.dim, scale_out);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              }
            }
          });
        });
  }

  static void pairwise_preference_loss(const at::Tensor& logits, const at::Tensor& expert_logits, PreferenceRule rule,
                                       at::Tensor& loss, at::Tensor& accuracy) {
    check_candidate_count(logits);
    const int64_t K = logits.size(0), B = logits.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rglcd_fast_pairwise_loss_cuda",
                                    [&] {
                                      using acc_t = at::opmath_type<scalar_t>;
                                      pairwise_loss_kernel<scalar_t><<<1, kLossThreads, 0, cuda::current_stream()>>>(
                                          pair_logits<scalar_t>(logits, expert_logits), static_cast<int>(K), B, rule,
                                          loss.mutable_data_ptr<acc_t>(), accuracy.mutable_data_ptr<acc_t>());
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
  }

  static void pairwise_preference_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                const at::Tensor& expert_logits, PreferenceRule rule,
                                                at::Tensor& grad) {
    check_candidate_count(logits);
    const int64_t K = logits.size(0), B = logits.size(1);
    const DeviceScalar g = DeviceScalar::of(grad_loss);  // a CPU value is read on the host: no device sync
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, logits.scalar_type(), "rglcd_fast_pairwise_loss_bwd_cuda", [&] {
          pairwise_loss_backward_kernel<scalar_t><<<cuda::blocks_for(B), cuda::kThreads, 0, cuda::current_stream()>>>(
              pair_logits<scalar_t>(logits, expert_logits), static_cast<int>(K), B, rule, g,
              grad.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CUDA, m) { ops::register_reward<CudaBackend>(m); }

}  // namespace rglcd_fast
