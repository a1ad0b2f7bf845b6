// Autograd in C++ for the consistency ops (consistency_loss, consistency_output, predicted_x0/eps), without
// Python frames in the forward or the backward: a Python autograd.Function costs 15-35 µs more a call on the
// CPU, more than these fused kernels take on a GPU. Without this library, PyTorch's autograd runs through
// the references.
#include <torch/library.h>

#include <string>

#include "autograd/op_handles.h"

namespace rglcd_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&, c10::string_view,
                                                         c10::string_view, double, double, double);
using LossBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view, double, double, double,
    std::array<bool, 3>);
using MapSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                c10::string_view);
using MapBackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                c10::string_view, std::array<bool, 2>);
using OutputSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   c10::string_view, double, double);
using OutputBackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, c10::string_view, double, double,
                                                                   std::array<bool, 2>);

class ConsistencyLoss : public torch::autograd::Function<ConsistencyLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_output, const at::Tensor& sample,
                               const at::Tensor& timesteps, const at::Tensor& target, const at::Tensor& alphas_cumprod,
                               c10::string_view prediction_type, c10::string_view loss_type, double huber_c,
                               double timestep_scaling, double sigma_data) {
    static const auto op = find_op<LossSignature>("rglcd_fast::consistency_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, model_pred] = op.call(model_output, sample, timesteps, target, alphas_cumprod, prediction_type,
                                      loss_type, huber_c, timestep_scaling, sigma_data);
    ctx->save_for_backward({model_output, sample, timesteps, target, alphas_cumprod});
    ctx->saved_data["prediction_type"] = std::string(prediction_type);
    ctx->saved_data["loss_type"] = std::string(loss_type);
    ctx->saved_data["params"] = std::vector<double>{huber_c, timestep_scaling, sigma_data};
    ctx->set_materialize_grads(false);
    return {loss, model_pred};
  }

  // grads: (loss, model_pred); either may be undefined (unused). Gradients reach model_output,
  // sample and target; the timesteps, schedule and settings get none.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LossBackwardSignature>("rglcd_fast::consistency_loss_backward");
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(3)};
    variable_list out(10);
    if ((!grads[0].defined() && !grads[1].defined()) || !(mask[0] || mask[1] || mask[2])) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& model_output = saved[0];
    at::Tensor grad_loss = grads[0];
    if (!grad_loss.defined()) {  // only model_pred was used
      grad_loss = at::zeros(
          {}, model_output.options().dtype(model_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    }
    const std::optional<at::Tensor> grad_pred = optional_grad(grads[1]);
    const auto params = ctx->saved_data["params"].toDoubleVector();
    const std::string prediction_type = ctx->saved_data["prediction_type"].toStringRef();
    const std::string loss_type = ctx->saved_data["loss_type"].toStringRef();
    auto [grad_m, grad_x, grad_y] = op.call(grad_loss, grad_pred, model_output, saved[1], saved[2], saved[3], saved[4],
                                            prediction_type, loss_type, params[0], params[1], params[2], mask);
    if (mask[0]) out[0] = grad_m;
    if (mask[1]) out[1] = grad_x;
    if (mask[2]) out[3] = grad_y;
    return out;
  }
};

class ConsistencyOutput : public torch::autograd::Function<ConsistencyOutput> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& model_output, const at::Tensor& sample,
                            const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                            c10::string_view prediction_type, double timestep_scaling, double sigma_data) {
    static const auto op = find_op<OutputSignature>("rglcd_fast::consistency_output");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out =
        op.call(model_output, sample, timesteps, alphas_cumprod, prediction_type, timestep_scaling, sigma_data);
    ctx->save_for_backward({timesteps, alphas_cumprod});
    ctx->saved_data["prediction_type"] = std::string(prediction_type);
    ctx->saved_data["params"] = std::vector<double>{timestep_scaling, sigma_data};
    ctx->set_materialize_grads(false);
    return out;
  }

  // f is linear in (model_output, sample): grad_m = c_m·g, grad_x = c_x·g.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<OutputBackwardSignature>("rglcd_fast::consistency_output_backward");
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    variable_list out(7);
    if (!grads[0].defined() || !(mask[0] || mask[1])) return out;
    const auto saved = ctx->get_saved_variables();
    const auto params = ctx->saved_data["params"].toDoubleVector();
    auto [grad_m, grad_x] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["prediction_type"].toStringRef(),
                                    params[0], params[1], mask);
    if (mask[0]) out[0] = grad_m;
    if (mask[1]) out[1] = grad_x;
    return out;
  }
};

// predicted_x0 / predicted_eps: linear in (model_output, sample), so grad_m = c_m·g and grad_x = c_x·g
// come from the backward op alone. Name is the op, Name_backward its backward.
template <const char* kName, const char* kBackwardName>
class PredictedMap : public torch::autograd::Function<PredictedMap<kName, kBackwardName>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& model_output, const at::Tensor& sample,
                            const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                            c10::string_view prediction_type) {
    static const auto op = find_op<MapSignature>(kName);
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(model_output, sample, timesteps, alphas_cumprod, prediction_type);
    ctx->save_for_backward({timesteps, alphas_cumprod});
    ctx->saved_data["prediction_type"] = std::string(prediction_type);
    ctx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<MapBackwardSignature>(kBackwardName);
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    variable_list out(5);
    if (!grads[0].defined() || !(mask[0] || mask[1])) return out;
    const auto saved = ctx->get_saved_variables();
    auto [grad_m, grad_x] =
        op.call(grads[0], saved[0], saved[1], ctx->saved_data["prediction_type"].toStringRef(), mask);
    if (mask[0]) out[0] = grad_m;
    if (mask[1]) out[1] = grad_x;
    return out;
  }
};

constexpr char kPredictedX0[] = "rglcd_fast::predicted_x0";
constexpr char kPredictedX0Backward[] = "rglcd_fast::predicted_x0_backward";
constexpr char kPredictedEps[] = "rglcd_fast::predicted_eps";
constexpr char kPredictedEpsBackward[] = "rglcd_fast::predicted_eps_backward";

template <const char* kName, const char* kBackwardName>
at::Tensor predicted_map_autograd(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                                  const at::Tensor& alphas_cumprod, c10::string_view prediction_type) {
  return PredictedMap<kName, kBackwardName>::apply(model_output, sample, timesteps, alphas_cumprod, prediction_type);
}

std::tuple<at::Tensor, at::Tensor> consistency_loss_autograd(const at::Tensor& model_output, const at::Tensor& sample,
                                                             const at::Tensor& timesteps, const at::Tensor& target,
                                                             const at::Tensor& alphas_cumprod,
                                                             c10::string_view prediction_type,
                                                             c10::string_view loss_type, double huber_c,
                                                             double timestep_scaling, double sigma_data) {
  auto out = ConsistencyLoss::apply(model_output, sample, timesteps, target, alphas_cumprod, prediction_type, loss_type,
                                    huber_c, timestep_scaling, sigma_data);
  return {out[0], out[1]};
}

at::Tensor consistency_output_autograd(const at::Tensor& model_output, const at::Tensor& sample,
                                       const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                                       c10::string_view prediction_type, double timestep_scaling, double sigma_data) {
  return ConsistencyOutput::apply(model_output, sample, timesteps, alphas_cumprod, prediction_type, timestep_scaling,
                                  sigma_data);
}

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, Autograd, m) {
  m.impl("consistency_loss", &consistency_loss_autograd);
  m.impl("consistency_output", &consistency_output_autograd);
  m.impl("predicted_x0", &predicted_map_autograd<kPredictedX0, kPredictedX0Backward>);
  m.impl("predicted_eps", &predicted_map_autograd<kPredictedEps, kPredictedEpsBackward>);
}

}  // namespace rglcd_fast
