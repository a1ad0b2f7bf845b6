// The consistency family's ops (schemas: rglcd_fast/ops/consistency.py) written once for both
// backends: argument checks and parsing, inputs and outputs in the working layout, and the
// registration. A backend (csrc/cpu/consistency.cpp, csrc/cuda/consistency.cu) is a struct with
//   DeviceGuard                                   held while an op runs (CUDA: the inputs' device)
//   boundary_scalings                             c_skip, c_out of t
//   linear_map, linear_map_backward               a per-sample linear map of (x, m) and its gradients
//   consistency_loss, consistency_loss_backward   the fused distillation loss and its gradients
// computing into the outputs it is given.
#pragma once

#include <torch/library.h>

#include "common.h"
#include "math/consistency.h"

namespace rglcd_fast {
namespace ops {

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> boundary_scalings(const at::Tensor& timesteps, double timestep_scaling,
                                                     double sigma_data) {
  const typename Backend::DeviceGuard guard(timesteps.device());
  const auto dtype = timesteps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t = timesteps.to(dtype).contiguous();
  at::Tensor c_skip = at::empty_like(t), c_out = at::empty_like(t);
  Backend::boundary_scalings(t, c_skip, c_out, timestep_scaling, sigma_data);
  return {c_skip.view(timesteps.sizes()), c_out.view(timesteps.sizes())};
}

// x0, ε and f(m, x, t) are per-sample linear maps of (x, m) (math/consistency.h: X0Map, EpsMap, ConsistencyMap).
template <typename Backend, typename Map>
at::Tensor linear_map(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                      const at::Tensor& alphas_cumprod, const Map& map) {
  check_same_shape(model_output, sample, "sample", "model_output");
  const c10::Device device = model_output.device();
  check_device(sample, device, "sample");
  rglcd_fast::check_schedule_devices(device, timesteps, alphas_cumprod);
  const typename Backend::DeviceGuard guard(device);
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample);
  at::Tensor out = layout.output();
  Backend::linear_map(m, x, out, timesteps, alphas_cumprod, map);
  return layout.deliver(out);
}

// Backward of a linear map: grad_m, grad_x of g through it (Linear::grad_m, grad_x; zero where it does not read x).
template <typename Backend, typename Map>
std::tuple<at::Tensor, at::Tensor> linear_map_backward(const at::Tensor& grad, const at::Tensor& timesteps,
                                                       const at::Tensor& alphas_cumprod, const Map& map,
                                                       std::array<bool, 2> mask) {
  rglcd_fast::check_schedule_devices(grad.device(), timesteps, alphas_cumprod);
  const typename Backend::DeviceGuard guard(grad.device());
  const Layout layout(grad);
  const at::Tensor g = layout.input(grad);
  at::Tensor grad_m = mask[0] ? layout.output() : unrequested(grad);
  at::Tensor grad_x = mask[1] ? layout.output() : unrequested(grad);
  Backend::linear_map_backward(g, grad_m, grad_x, timesteps, alphas_cumprod, map, mask);
  return {mask[0] ? layout.deliver(grad_m) : grad_m, mask[1] ? layout.deliver(grad_x) : grad_x};
}

// predicted_x0 (Map = X0Map) and predicted_eps (EpsMap), with backwards.
template <typename Backend, typename Map>
at::Tensor predicted(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                     const at::Tensor& alphas_cumprod, c10::string_view prediction_type) {
  return linear_map<Backend>(model_output, sample, timesteps, alphas_cumprod,
                             Map{parse_prediction_type(prediction_type)});
}

template <typename Backend, typename Map>
std::tuple<at::Tensor, at::Tensor> predicted_backward(const at::Tensor& grad, const at::Tensor& timesteps,
                                                      const at::Tensor& alphas_cumprod,
                                                      c10::string_view prediction_type, std::array<bool, 2> mask) {
  return linear_map_backward<Backend>(grad, timesteps, alphas_cumprod, Map{parse_prediction_type(prediction_type)},
                                      mask);
}

template <typename Backend>
at::Tensor consistency_output(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                              const at::Tensor& alphas_cumprod, c10::string_view prediction_type,
                              double timestep_scaling, double sigma_data) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  return linear_map<Backend>(model_output, sample, timesteps, alphas_cumprod, map);
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> consistency_output_backward(const at::Tensor& grad, const at::Tensor& timesteps,
                                                               const at::Tensor& alphas_cumprod,
                                                               c10::string_view prediction_type,
                                                               double timestep_scaling, double sigma_data,
                                                               std::array<bool, 2> mask) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  return linear_map_backward<Backend>(grad, timesteps, alphas_cumprod, map, mask);
}

// The fused loss's arguments besides its tensors in the working layout: the per-sample map
// model_pred = f(m, x, t) and ρ.
struct LossArgs {
  const at::Tensor& timesteps;
  const at::Tensor& alphas_cumprod;
  ConsistencyMap map;
  LossType kind;
  double huber_c;
};

// Fused distillation loss (docs/design.md §1 steps 4 and 7): model_pred = f(m, x, t) and
// loss = mean ρ(model_pred - target), in one pass; the loss is float32 (float64 for float64 inputs).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> consistency_loss(const at::Tensor& model_output, const at::Tensor& sample,
                                                    const at::Tensor& timesteps, const at::Tensor& target,
                                                    const at::Tensor& alphas_cumprod, c10::string_view prediction_type,
                                                    c10::string_view loss_type, double huber_c, double timestep_scaling,
                                                    double sigma_data) {
  check_same_shape(model_output, sample, "sample", "model_output");
  check_same_shape(model_output, target, "target", "model_output");
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  const LossArgs args{timesteps, alphas_cumprod, map, parse_loss_type(loss_type), huber_c};
  const c10::Device device = model_output.device();
  check_device(sample, device, "sample");
  check_device(target, device, "target");
  rglcd_fast::check_schedule_devices(device, timesteps, alphas_cumprod);
  const typename Backend::DeviceGuard guard(device);
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample), y = layout.input(target);
  at::Tensor pred = layout.output();
  at::Tensor loss = Backend::consistency_loss(m, x, y, pred, args);
  return {loss, layout.deliver(pred)};
}

// Backward of the fused loss, recomputing model_pred in acc_t from (m, x): with
// r = grad_loss·ρ'(pred - target)/N and h = r + grad_pred: grad_m, grad_x of h through the map, grad_target = -r.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_loss_backward(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_model_pred, const at::Tensor& model_output,
    const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& target, const at::Tensor& alphas_cumprod,
    c10::string_view prediction_type, c10::string_view loss_type, double huber_c, double timestep_scaling,
    double sigma_data, std::array<bool, 3> mask) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  const LossArgs args{timesteps, alphas_cumprod, map, parse_loss_type(loss_type), huber_c};
  const c10::Device device = model_output.device();
  check_device(grad_loss, device, "grad_loss");
  if (grad_model_pred.has_value() && grad_model_pred->defined())
    check_device(*grad_model_pred, device, "grad_model_pred");
  check_device(sample, device, "sample");
  check_device(target, device, "target");
  rglcd_fast::check_schedule_devices(device, timesteps, alphas_cumprod);
  const typename Backend::DeviceGuard guard(device);
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample), y = layout.input(target);
  const bool has_gp = grad_model_pred.has_value() && grad_model_pred->defined();
  const at::Tensor gpred = has_gp ? layout.input(*grad_model_pred) : at::Tensor();  // undefined: counts as zero
  at::Tensor grad_m = mask[0] ? layout.output() : unrequested(model_output);
  at::Tensor grad_x = mask[1] ? layout.output() : unrequested(model_output);
  at::Tensor grad_y = mask[2] ? layout.output() : unrequested(model_output);
  Backend::consistency_loss_backward(grad_loss, gpred, m, x, y, grad_m, grad_x, grad_y, args, mask);
  return {mask[0] ? layout.deliver(grad_m) : grad_m, mask[1] ? layout.deliver(grad_x) : grad_x,
          mask[2] ? layout.deliver(grad_y) : grad_y};
}

template <typename Backend>
void register_consistency(torch::Library& m) {
  m.impl("boundary_scalings", &boundary_scalings<Backend>);
  m.impl("predicted_x0", &predicted<Backend, X0Map>);
  m.impl("predicted_x0_backward", &predicted_backward<Backend, X0Map>);
  m.impl("predicted_eps", &predicted<Backend, EpsMap>);
  m.impl("predicted_eps_backward", &predicted_backward<Backend, EpsMap>);
  m.impl("consistency_output", &consistency_output<Backend>);
  m.impl("consistency_output_backward", &consistency_output_backward<Backend>);
  m.impl("consistency_loss", &consistency_loss<Backend>);
  m.impl("consistency_loss_backward", &consistency_loss_backward<Backend>);
}

}  // namespace ops
}  // namespace rglcd_fast
