// CPU kernels of the reward family (docs/design.md §2 "Latent reward head", §1 step 9): the CLIP-style
// reward head score = scale·cos(u, v) and the pairwise preference loss of the latent reward model,
// with backwards. The ops around them (argument checks, registration): csrc/ops/reward.h.
#include "ops/reward.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/loops.h"

namespace rglcd_fast {
namespace {

// ---- reward head -------------------------------------------------------------------------------

using at::vec::Vectorized;

// Loads 2·W consecutive elements as two acc_t vectors (W = Vectorized<acc_t>::size()).
template <typename scalar_t, typename acc_t>
inline void load_two(const scalar_t* p, Vectorized<acc_t>& a, Vectorized<acc_t>& b) {
  constexpr int W = Vectorized<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    a = Vectorized<acc_t>::loadu(p);
    b = Vectorized<acc_t>::loadu(p + W);
  } else {  // widened element by element (a loop the compiler vectorises)
    acc_t wide[2 * W];
    for (int k = 0; k < 2 * W; ++k) wide[k] = static_cast<acc_t>(p[k]);
    a = Vectorized<acc_t>::loadu(wide);
    b = Vectorized<acc_t>::loadu(wide + W);
  }
}

// Sum of a vector's lanes as a fixed pairwise tree.
template <typename acc_t>
inline acc_t lane_sum(const Vectorized<acc_t>& v) {
  constexpr int lanes = Vectorized<acc_t>::size();
  acc_t x[lanes];
  v.store(x);
  for (int width = lanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) x[l] += x[l + width];
  return x[0];
}

// ⟨u, v⟩, ‖u‖², ‖v‖² of one row of n unit-stride elements in acc_t: 2·W independent lanes, then the
// tail; a fixed order for a given build, whatever the thread count.
template <typename acc_t, typename scalar_t>
CosineSums<acc_t> cosine_sums(const scalar_t* u, const scalar_t* v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t step = 2 * Vec::size();
  Vec dot0(acc_t(0)), dot1(acc_t(0)), uu0(acc_t(0)), uu1(acc_t(0)), vv0(acc_t(0)), vv1(acc_t(0));
  int64_t i = 0;
  for (; i + step <= n; i += step) {
    Vec x0, x1, y0, y1;
    load_two(u + i, x0, x1);
    load_two(v + i, y0, y1);
    dot0 = at::vec::fmadd(x0, y0, dot0);
    dot1 = at::vec::fmadd(x1, y1, dot1);
    uu0 = at::vec::fmadd(x0, x0, uu0);
    uu1 = at::vec::fmadd(x1, x1, uu1);
    vv0 = at::vec::fmadd(y0, y0, vv0);
    vv1 = at::vec::fmadd(y1, y1, vv1);
  }
  CosineSums<acc_t> s{lane_sum(dot0 + dot1), lane_sum(uu0 + uu1), lane_sum(vv0 + vv1)};
  for (; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(u[i]), y = static_cast<acc_t>(v[i]);
    s.dot += x * y;
    s.uu += x * x;
    s.vv += y * y;
  }
  return s;
}

// The two feature tensors as the kernels read them: rows of D unit-stride elements, the text rows
// broadcast to the image's leading shape; offsets of each image row into both.
struct FeatureRows {
  at::Tensor image, text;  // text: contiguous, its own shape
  std::vector<int64_t> image_offsets, text_offsets;
  int64_t rows, dim;

  FeatureRows(const at::Tensor& image_features, const at::Tensor& text_features) {
    dim = image_features.size(-1);
    image = image_features.stride(-1) == 1 ? image_features : image_features.contiguous();
    text = text_features.contiguous();
    image_offsets = cpu::row_offsets(image);
    text_offsets = cpu::row_offsets(text.expand(image.sizes()));
    rows = static_cast<int64_t>(image_offsets.size());
  }
  int64_t grain() const { return std::max<int64_t>(1, cpu::kGrain / dim); }
};

// ---- pairwise preference loss --------------------------------------------------------------------

struct LossAndHits {
  double loss = 0.0;
  int64_t hits = 0;
  LossAndHits& operator+=(const LossAndHits& o) {
    loss += o.loss;
    hits += o.hits;
    return *this;
  }
};

// The backend of ops/reward.h.
struct CpuBackend {
  struct DeviceGuard {  // CPU tensors need none
    explicit DeviceGuard(c10::Device) {}
  };

  static void reward_head(const at::Tensor& image_features, const at::Tensor& text_features,
                          const at::Tensor& logit_scale, at::Tensor& scores) {
    const FeatureRows f(image_features, text_features);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.image.scalar_type(), "rglcd_fast_reward_head", [&] {
      using acc_t = head_acc_t;
      const acc_t scale = static_cast<acc_t>(logit_scale.item<double>());
      const scalar_t* up = f.image.const_data_ptr<scalar_t>();
      const scalar_t* vp = f.text.const_data_ptr<scalar_t>();
      scalar_t* out = scores.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, f.rows, f.grain(), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto sums = cosine_sums<acc_t>(up + f.image_offsets[r], vp + f.text_offsets[r], f.dim);
          out[r] = static_cast<scalar_t>(cosine_score(sums, scale));
        }
      });
    });
  }

  // Backward: grad_u row-wise; grad_v summed over the image rows that share a text row, in ascending
  // row order per text row (deterministic); grad_scale = Σ g·c in double, in row order.
  static void reward_head_backward(const at::Tensor& grad, const at::Tensor& image_features,
                                   const at::Tensor& text_features, const at::Tensor& logit_scale,
                                   std::array<bool, 3> mask, at::Tensor& grad_u, at::Tensor& grad_v,
                                   at::Tensor& grad_s) {
    const FeatureRows f(image_features, text_features);
    const at::Tensor g = grad.contiguous();
    const int64_t D = f.dim, N = f.rows;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.image.scalar_type(), "rglcd_fast_reward_head_bwd", [&] {
      using acc_t = head_acc_t;
      const acc_t scale = static_cast<acc_t>(logit_scale.item<double>());
      const scalar_t* up = f.image.const_data_ptr<scalar_t>();
      const scalar_t* vp = f.text.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      std::vector<CosineGrad<acc_t>> coeff(N);
      at::parallel_for(0, N, f.grain(), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto sums = cosine_sums<acc_t>(up + f.image_offsets[r], vp + f.text_offsets[r], D);
          coeff[r] = cosine_score_grad(sums, scale, static_cast<acc_t>(gp[r]));
        }
      });
      if (mask[0]) {
        scalar_t* gu = grad_u.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, N, f.grain(), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* u = up + f.image_offsets[r];
            const scalar_t* v = vp + f.text_offsets[r];
            const CosineGrad<acc_t> c = coeff[r];
            scalar_t* out = gu + r * D;
            for (int64_t i = 0; i < D; ++i)
              out[i] = static_cast<scalar_t>(c.grad_u(static_cast<acc_t>(u[i]), static_cast<acc_t>(v[i])));
          }
        });
      }
      if (mask[1]) {
        // The image rows of each text row (text is contiguous, so its row id is offset / D), ascending.
        const int64_t text_rows = f.text.numel() / D;
        std::vector<int64_t> start(text_rows + 1, 0), members(N);
        for (int64_t r = 0; r < N; ++r) ++start[f.text_offsets[r] / D + 1];
        for (int64_t j = 0; j < text_rows; ++j) start[j + 1] += start[j];
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t r = 0; r < N; ++r) members[fill[f.text_offsets[r] / D]++] = r;
        scalar_t* gv = grad_v.mutable_data_ptr<scalar_t>();
        const int64_t per_row = std::max<int64_t>(1, N / std::max<int64_t>(1, text_rows));
        at::parallel_for(0, text_rows, std::max<int64_t>(1, f.grain() / per_row), [&](int64_t j0, int64_t j1) {
          std::vector<acc_t> acc(D);
          for (int64_t j = j0; j < j1; ++j) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            const scalar_t* v = vp + j * D;
            for (int64_t k = start[j]; k < start[j + 1]; ++k) {
              const int64_t r = members[k];
              const scalar_t* u = up + f.image_offsets[r];
              const CosineGrad<acc_t> c = coeff[r];
              for (int64_t i = 0; i < D; ++i) acc[i] += c.grad_v(static_cast<acc_t>(u[i]), static_cast<acc_t>(v[i]));
            }
            for (int64_t i = 0; i < D; ++i) gv[j * D + i] = static_cast<scalar_t>(acc[i]);
          }
        });
      }
      if (mask[2]) {
        double total = 0.0;
        for (int64_t r = 0; r < N; ++r) total += static_cast<double>(coeff[r].grad_scale);
        grad_s.fill_(total);
      }
    });
  }

  static void pairwise_preference_loss(const at::Tensor& logits, const at::Tensor& expert_logits, PreferenceRule rule,
                                       at::Tensor& loss, at::Tensor& accuracy) {
    const int64_t K = logits.size(0), B = logits.size(1), pairs = K * (K - 1) / 2;
    LossAndHits total;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rglcd_fast_pairwise_loss", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto x = pair_logits<scalar_t>(logits, expert_logits);
      total = cpu::blocked_reduce<LossAndHits>(B, std::max<int64_t>(B, 1), [&](int64_t, int64_t b0, int64_t b1) {
        LossAndHits s;
        for (int64_t b = b0; b < b1; ++b) {
          acc_t loss_b = 0;
          for (int64_t i = 0; i + 1 < K; ++i) {
            for (int64_t j = i + 1; j < K; ++j) {
              const acc_t si = x.template student<acc_t>(i, b), sj = x.template student<acc_t>(j, b);
              const acc_t ei = x.template expert<acc_t>(i, b), ej = x.template expert<acc_t>(j, b);
              loss_b += pair_loss(pair_target(ei, ej, i, j, rule), pair_difference(si, sj));
              s.hits += pair_argmax(si, sj) == pair_label(ei, ej, i, j, rule);
            }
          }
          s.loss += static_cast<double>(loss_b);
        }
        return s;
      });
    });
    // Means over b (batchmean / mean) and over pairs × b: 0/0 = NaN for an empty batch, as torch.
    const double batch = static_cast<double>(B);
    loss.fill_(total.loss / batch);
    accuracy.fill_(static_cast<double>(total.hits) / (static_cast<double>(pairs) * batch));
  }

  // grad_S[k, b] = grad_loss / B · (Σ_{j>k} (q − p)_{kj} − Σ_{i<k} (q − p)_{ik}).
  static void pairwise_preference_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                const at::Tensor& expert_logits, PreferenceRule rule,
                                                at::Tensor& grad) {
    const int64_t K = logits.size(0), B = logits.size(1);
    const double g_over_b = grad_loss.item<double>() / static_cast<double>(B);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, logits.scalar_type(), "rglcd_fast_pairwise_loss_bwd", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const auto x = pair_logits<scalar_t>(logits, expert_logits);
          const acc_t scale = static_cast<acc_t>(g_over_b);
          scalar_t* out = grad.mutable_data_ptr<scalar_t>();
          const int64_t grain = std::max<int64_t>(1, cpu::kGrain / (K * K));
          at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
            std::vector<acc_t> acc(K);
            for (int64_t b = b0; b < b1; ++b) {
              std::fill(acc.begin(), acc.end(), acc_t(0));
              for (int64_t i = 0; i + 1 < K; ++i) {
                for (int64_t j = i + 1; j < K; ++j) {
                  const acc_t si = x.template student<acc_t>(i, b), sj = x.template student<acc_t>(j, b);
                  const acc_t ei = x.template expert<acc_t>(i, b), ej = x.template expert<acc_t>(j, b);
                  const acc_t t = pair_loss_grad(pair_target_p0(ei, ej, i, j, rule), pair_difference(si, sj));
                  acc[i] += t;
                  acc[j] -= t;
                }
              }
              for (int64_t i = 0; i < K; ++i) out[i * B + b] = static_cast<scalar_t>(scale * acc[i]);
            }
          });
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CPU, m) { ops::register_reward<CpuBackend>(m); }

}  // namespace rglcd_fast
