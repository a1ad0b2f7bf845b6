// Autograd in C++ for the guided DDIM solver step (without this library, PyTorch's autograd runs through
// the reference). Differentiable in the cond / uncond outputs and the sample; the timesteps, guidance
// scale and schedule get no gradient.
#include <torch/library.h>

#include <string>

#include "autograd/op_handles.h"

namespace rglcd_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using GuidedSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, c10::string_view);
using GuidedBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const std::optional<at::Tensor>&,
                                                                               const std::optional<at::Tensor>&,
                                                                               const at::Tensor&, const at::Tensor&,
                                                                               const at::Tensor&, const at::Tensor&,
                                                                               c10::string_view, std::array<bool, 3>);

class GuidedDdimStep : public torch::autograd::Function<GuidedDdimStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& cond_output, const at::Tensor& uncond_output,
                               const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                               const at::Tensor& guidance_scale, const at::Tensor& alphas_cumprod,
                               c10::string_view prediction_type) {
    static const auto op = find_op<GuidedSignature>("rglcd_fast::guided_ddim_step");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [x_prev, pred_x0] = op.call(cond_output, uncond_output, sample, timesteps, prev_timesteps, guidance_scale,
                                     alphas_cumprod, prediction_type);
    ctx->save_for_backward({timesteps, prev_timesteps, guidance_scale, alphas_cumprod});
    ctx->saved_data["prediction_type"] = std::string(prediction_type);
    ctx->set_materialize_grads(false);
    return {x_prev, pred_x0};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<GuidedBackwardSignature>("rglcd_fast::guided_ddim_step_backward");
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    variable_list out(8);
    if ((!grads[0].defined() && !grads[1].defined()) || !(mask[0] || mask[1] || mask[2])) return out;
    const auto saved = ctx->get_saved_variables();
    auto [grad_c, grad_u, grad_x] = op.call(optional_grad(grads[0]), optional_grad(grads[1]), saved[0], saved[1],
                                            saved[2], saved[3], ctx->saved_data["prediction_type"].toStringRef(), mask);
    if (mask[0]) out[0] = grad_c;
    if (mask[1]) out[1] = grad_u;
    if (mask[2]) out[2] = grad_x;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> guided_ddim_step_autograd(
    const at::Tensor& cond_output, const at::Tensor& uncond_output, const at::Tensor& sample,
    const at::Tensor& timesteps, const at::Tensor& prev_timesteps, const at::Tensor& guidance_scale,
    const at::Tensor& alphas_cumprod, c10::string_view prediction_type) {
  auto out = GuidedDdimStep::apply(cond_output, uncond_output, sample, timesteps, prev_timesteps, guidance_scale,
                                   alphas_cumprod, prediction_type);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, Autograd, m) { m.impl("guided_ddim_step", &guided_ddim_step_autograd); }

}  // namespace rglcd_fast
