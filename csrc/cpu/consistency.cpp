// CPU kernels of the consistency family (docs/design.md §2): boundary scalings, x0 / ε from a model
// output, the consistency output f(m, x, t), and the fused distillation loss, with backwards. The ops
// around them (arguments, layouts, registration): csrc/ops/consistency.h.
#include "ops/consistency.h"

#include <torch/library.h>

#include "common.h"
#include "cpu/loops.h"

namespace rglcd_fast {
namespace {

// Per-sample linear coefficients for the whole batch from timesteps [B] (or one) and the schedule.
template <typename acc_t, typename CoeffFn>
std::vector<Linear<acc_t>> batch_coefficients(const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                                              int64_t batch, const CoeffFn& coefficients_at) {
  const at::Tensor ts = per_sample_index_cpu(timesteps, batch, alphas_cumprod.numel(), "timesteps", false);
  const std::vector<acc_t> table = cpu::schedule_values<acc_t>(alphas_cumprod);
  const int64_t* t = ts.data_ptr<int64_t>();
  std::vector<Linear<acc_t>> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t tb = t[per_sample_index(ts.numel(), b)];
    out[b] = coefficients_at(table[tb], static_cast<acc_t>(tb));
  }
  return out;
}

// The backend of ops/consistency.h.
struct CpuBackend {
  struct DeviceGuard {  // CPU tensors need none
    explicit DeviceGuard(c10::Device) {}
  };

  static void boundary_scalings(const at::Tensor& t, at::Tensor& c_skip, at::Tensor& c_out, double timestep_scaling,
                                double sigma_data) {
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "rglcd_fast_boundary_scalings", [&] {
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      scalar_t* sp = c_skip.mutable_data_ptr<scalar_t>();
      scalar_t* op = c_out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < t.numel(); ++i)
        rglcd_fast::boundary_scalings<scalar_t>(tp[i], scalar_t(timestep_scaling), scalar_t(sigma_data), sp[i], op[i]);
    });
  }

  template <typename Map>
  static void linear_map(const at::Tensor& m, const at::Tensor& x, at::Tensor& out, const at::Tensor& timesteps,
                         const at::Tensor& alphas_cumprod, const Map& map) {
    const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_linear_map", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto coeff = batch_coefficients<acc_t>(timesteps, alphas_cumprod, batch, map);
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
        const Linear<acc_t> c = coeff[b];
        for (int64_t i = i0; i < i1; ++i) op[i] = static_cast<scalar_t>(c(xp[i], mp[i]));
      });
    });
  }

  template <typename Map>
  static void linear_map_backward(const at::Tensor& g, at::Tensor& grad_m, at::Tensor& grad_x,
                                  const at::Tensor& timesteps, const at::Tensor& alphas_cumprod, const Map& map,
                                  std::array<bool, 2> mask) {
    const int64_t n = g.numel(), batch = batch_size(g), per_sample = batch ? n / batch : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "rglcd_fast_linear_map_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto coeff = batch_coefficients<acc_t>(timesteps, alphas_cumprod, batch, map);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t* gm = mask[0] ? grad_m.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gx = mask[1] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      cpu::with_flags(
          [&](auto with_gm, auto with_gx) {
            cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
              const Linear<acc_t> c = coeff[b];
              for (int64_t i = i0; i < i1; ++i) {
                const acc_t gi = static_cast<acc_t>(gp[i]);
                if constexpr (decltype(with_gm)::value) gm[i] = static_cast<scalar_t>(c.grad_m(gi));
                if constexpr (decltype(with_gx)::value) gx[i] = static_cast<scalar_t>(c.grad_x(gi));
              }
            });
          },
          gm != nullptr, gx != nullptr);
    });
  }

  static at::Tensor consistency_loss(const at::Tensor& m, const at::Tensor& x, const at::Tensor& y, at::Tensor& pred,
                                     const ops::LossArgs& args) {
    const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
    double total = 0.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto coeff = batch_coefficients<acc_t>(args.timesteps, args.alphas_cumprod, batch, args.map);
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      scalar_t* pp = pred.mutable_data_ptr<scalar_t>();
      const acc_t c = static_cast<acc_t>(args.huber_c);
      cpu::with_flags(
          [&](auto huber) {
            constexpr LossType kind = decltype(huber)::value ? LossType::Huber : LossType::L2;
            total = cpu::blocked_sum(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
              const Linear<acc_t> k = coeff[b];
              // double sums keep a long run as accurate as PyTorch's cascade summation
              return cpu::lane_sum(i0, i1, [&](int64_t i) {
                const acc_t v = k(xp[i], mp[i]);
                pp[i] = static_cast<scalar_t>(v);
                return loss_value(v - static_cast<acc_t>(yp[i]), kind, c);
              });
            });
          },
          args.kind == LossType::Huber);
    });
    const auto loss_dtype = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return at::full({}, total / static_cast<double>(n), m.options().dtype(loss_dtype));
  }

  static void consistency_loss_backward(const at::Tensor& grad_loss, const at::Tensor& gpred, const at::Tensor& m,
                                        const at::Tensor& x, const at::Tensor& y, at::Tensor& grad_m,
                                        at::Tensor& grad_x, at::Tensor& grad_y, const ops::LossArgs& args,
                                        std::array<bool, 3> mask) {
    const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
    const double g_over_n = grad_loss.item<double>() / static_cast<double>(n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto coeff = batch_coefficients<acc_t>(args.timesteps, args.alphas_cumprod, batch, args.map);
      const scalar_t* mp = m.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* gpp = gpred.defined() ? gpred.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* gm = mask[0] ? grad_m.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gx = mask[1] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gy = mask[2] ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
      const acc_t c = static_cast<acc_t>(args.huber_c), scale = static_cast<acc_t>(g_over_n);
      cpu::with_flags(
          [&](auto huber, auto with_gp, auto with_gm, auto with_gx, auto with_gy) {
            constexpr LossType kind = decltype(huber)::value ? LossType::Huber : LossType::L2;
            cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
              const Linear<acc_t> k = coeff[b];
              for (int64_t i = i0; i < i1; ++i) {
                const acc_t r = scale * loss_derivative(k(xp[i], mp[i]) - static_cast<acc_t>(yp[i]), kind, c);
                const acc_t h = with_gp ? r + static_cast<acc_t>(gpp[i]) : r;
                if constexpr (decltype(with_gm)::value) gm[i] = static_cast<scalar_t>(k.grad_m(h));
                if constexpr (decltype(with_gx)::value) gx[i] = static_cast<scalar_t>(k.grad_x(h));
                if constexpr (decltype(with_gy)::value) gy[i] = static_cast<scalar_t>(-r);
              }
            });
          },
          args.kind == LossType::Huber, gpp != nullptr, gm != nullptr, gx != nullptr, gy != nullptr);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CPU, m) { ops::register_consistency<CpuBackend>(m); }

}  // namespace rglcd_fast
