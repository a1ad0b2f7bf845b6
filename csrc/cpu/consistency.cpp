// CPU kernels of the consistency family (DESIGN.md §2): boundary scalings, x0 / ε from a model
// output, the consistency output f(m, x, t), and the fused distillation loss, with backwards.
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


template <typename Map>
at::Tensor linear_map(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                      const at::Tensor& alphas_cumprod, const Map& map) {
  check_same_shape(model_output, sample, "sample");
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample);
  at::Tensor out = layout.output();
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
  return layout.deliver(out);
}

// Backward of a linear map: grad_m = cm·g, grad_x = cx·g (zero where the map does not read x).
template <typename Map>
std::tuple<at::Tensor, at::Tensor> linear_map_backward(const at::Tensor& grad, const at::Tensor& timesteps,
                                                       const at::Tensor& alphas_cumprod, const Map& map,
                                                       std::array<bool, 2> mask) {
  const Layout layout(grad);
  const at::Tensor g = layout.input(grad);
  at::Tensor grad_m = mask[0] ? layout.output() : unrequested(grad);
  at::Tensor grad_x = mask[1] ? layout.output() : unrequested(grad);
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
              if constexpr (decltype(with_gm)::value) gm[i] = static_cast<scalar_t>(c.cm * gi);
              if constexpr (decltype(with_gx)::value) gx[i] = c.has_x ? static_cast<scalar_t>(c.cx * gi) : scalar_t(0);
            }
          });
        },
        gm != nullptr, gx != nullptr);
  });
  return {mask[0] ? layout.deliver(grad_m) : grad_m, mask[1] ? layout.deliver(grad_x) : grad_x};
}

std::tuple<at::Tensor, at::Tensor> boundary_scalings_cpu(const at::Tensor& timesteps, double timestep_scaling,
                                                         double sigma_data) {
  const auto dtype = timesteps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t = timesteps.to(dtype).contiguous();
  at::Tensor c_skip = at::empty_like(t), c_out = at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES(dtype, "rglcd_fast_boundary_scalings", [&] {
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* sp = c_skip.mutable_data_ptr<scalar_t>();
    scalar_t* op = c_out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i)
      boundary_scalings<scalar_t>(tp[i], scalar_t(timestep_scaling), scalar_t(sigma_data), sp[i], op[i]);
  });
  return {c_skip.view(timesteps.sizes()), c_out.view(timesteps.sizes())};
}

at::Tensor predicted_x0_cpu(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                            const at::Tensor& alphas_cumprod, c10::string_view prediction_type) {
  return linear_map(model_output, sample, timesteps, alphas_cumprod, X0Map{parse_prediction_type(prediction_type)});
}

std::tuple<at::Tensor, at::Tensor> predicted_x0_backward_cpu(const at::Tensor& grad, const at::Tensor& timesteps,
                                                             const at::Tensor& alphas_cumprod,
                                                             c10::string_view prediction_type,
                                                             std::array<bool, 2> mask) {
  return linear_map_backward(grad, timesteps, alphas_cumprod, X0Map{parse_prediction_type(prediction_type)}, mask);
}

at::Tensor predicted_eps_cpu(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                             const at::Tensor& alphas_cumprod, c10::string_view prediction_type) {
  return linear_map(model_output, sample, timesteps, alphas_cumprod, EpsMap{parse_prediction_type(prediction_type)});
}

std::tuple<at::Tensor, at::Tensor> predicted_eps_backward_cpu(const at::Tensor& grad, const at::Tensor& timesteps,
                                                              const at::Tensor& alphas_cumprod,
                                                              c10::string_view prediction_type,
                                                              std::array<bool, 2> mask) {
  return linear_map_backward(grad, timesteps, alphas_cumprod, EpsMap{parse_prediction_type(prediction_type)}, mask);
}

at::Tensor consistency_output_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                  const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                                  c10::string_view prediction_type, double timestep_scaling, double sigma_data) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  return linear_map(model_output, sample, timesteps, alphas_cumprod, map);
}

std::tuple<at::Tensor, at::Tensor> consistency_output_backward_cpu(const at::Tensor& grad, const at::Tensor& timesteps,
                                                                   const at::Tensor& alphas_cumprod,
                                                                   c10::string_view prediction_type,
                                                                   double timestep_scaling, double sigma_data,
                                                                   std::array<bool, 2> mask) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  return linear_map_backward(grad, timesteps, alphas_cumprod, map, mask);
}

// Fused distillation loss (DESIGN.md §1 steps 4 and 7): model_pred = f(m, x, t) and
// loss = mean ρ(model_pred - target), in one pass; the loss is float32 (float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor> consistency_loss_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                        const at::Tensor& timesteps, const at::Tensor& target,
                                                        const at::Tensor& alphas_cumprod,
                                                        c10::string_view prediction_type, c10::string_view loss_type,
                                                        double huber_c, double timestep_scaling, double sigma_data) {
  check_same_shape(model_output, sample, "sample");
  check_same_shape(model_output, target, "target");
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  const LossType loss_kind = parse_loss_type(loss_type);
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample), y = layout.input(target);
  at::Tensor pred = layout.output();
  const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto coeff = batch_coefficients<acc_t>(timesteps, alphas_cumprod, batch, map);
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* pp = pred.mutable_data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(huber_c);
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
        loss_kind == LossType::Huber);
  });
  const auto loss_dtype = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::full({}, total / static_cast<double>(n), m.options().dtype(loss_dtype));
  return {loss, layout.deliver(pred)};
}

// Backward of the fused loss, recomputing model_pred in acc_t from (m, x): with
// r = grad_loss·ρ'(pred - target)/N and h = r + grad_pred: grad_m = cm·h, grad_x = cx·h, grad_target = -r.
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_loss_backward_cpu(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_model_pred, const at::Tensor& model_output,
    const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& target, const at::Tensor& alphas_cumprod,
    c10::string_view prediction_type, c10::string_view loss_type, double huber_c, double timestep_scaling,
    double sigma_data, std::array<bool, 3> mask) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  const LossType loss_kind = parse_loss_type(loss_type);
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample), y = layout.input(target);
  const bool has_gp = grad_model_pred.has_value() && grad_model_pred->defined();
  const at::Tensor gpred = has_gp ? layout.input(*grad_model_pred) : at::Tensor();
  at::Tensor grad_m = mask[0] ? layout.output() : unrequested(model_output);
  at::Tensor grad_x = mask[1] ? layout.output() : unrequested(model_output);
  at::Tensor grad_y = mask[2] ? layout.output() : unrequested(model_output);
  const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
  const double g_over_n = grad_loss.item<double>() / static_cast<double>(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto coeff = batch_coefficients<acc_t>(timesteps, alphas_cumprod, batch, map);
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gpp = has_gp ? gpred.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gm = mask[0] ? grad_m.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = mask[1] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gy = mask[2] ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t c = static_cast<acc_t>(huber_c), scale = static_cast<acc_t>(g_over_n);
    cpu::with_flags(
        [&](auto huber, auto with_gp, auto with_gm, auto with_gx, auto with_gy) {
          constexpr LossType kind = decltype(huber)::value ? LossType::Huber : LossType::L2;
          cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
            const Linear<acc_t> k = coeff[b];
            for (int64_t i = i0; i < i1; ++i) {
              const acc_t r = scale * loss_derivative(k(xp[i], mp[i]) - static_cast<acc_t>(yp[i]), kind, c);
              const acc_t h = with_gp ? r + static_cast<acc_t>(gpp[i]) : r;
              if constexpr (decltype(with_gm)::value) gm[i] = static_cast<scalar_t>(k.cm * h);
              if constexpr (decltype(with_gx)::value) gx[i] = static_cast<scalar_t>(k.cx * h);
              if constexpr (decltype(with_gy)::value) gy[i] = static_cast<scalar_t>(-r);
            }
          });
        },
        loss_kind == LossType::Huber, gpp != nullptr, gm != nullptr, gx != nullptr, gy != nullptr);
  });
  return {mask[0] ? layout.deliver(grad_m) : grad_m, mask[1] ? layout.deliver(grad_x) : grad_x,
          mask[2] ? layout.deliver(grad_y) : grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CPU, m) {
  m.impl("boundary_scalings", &boundary_scalings_cpu);
  m.impl("predicted_x0", &predicted_x0_cpu);
  m.impl("predicted_x0_backward", &predicted_x0_backward_cpu);
  m.impl("predicted_eps", &predicted_eps_cpu);
  m.impl("predicted_eps_backward", &predicted_eps_backward_cpu);
  m.impl("consistency_output", &consistency_output_cpu);
  m.impl("consistency_output_backward", &consistency_output_backward_cpu);
  m.impl("consistency_loss", &consistency_loss_cpu);
  m.impl("consistency_loss_backward", &consistency_loss_backward_cpu);
}

}  // namespace rglcd_fast
