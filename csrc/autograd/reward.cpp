// Autograd in C++ for the reward head and the pairwise preference loss (without this library, PyTorch's
// autograd runs through the references).
#include <torch/library.h>

#include <string>

#include "autograd/op_handles.h"

namespace rglcd_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using HeadSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using HeadBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                             const at::Tensor&, const at::Tensor&,
                                                                             std::array<bool, 3>);
using PairwiseSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, c10::string_view,
                                                             std::optional<int64_t>, bool);
using PairwiseBackwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
                                             std::optional<int64_t>, bool);

// score = scale·cos(u, v): differentiable in both features and the scale.
class RewardHead : public torch::autograd::Function<RewardHead> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& image_features, const at::Tensor& text_features,
                            const at::Tensor& logit_scale) {
    static const auto op = find_op<HeadSignature>("rglcd_fast::reward_head");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor scores = op.call(image_features, text_features, logit_scale);
    ctx->save_for_backward({image_features, text_features, logit_scale});
    ctx->set_materialize_grads(false);
    return scores;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<HeadBackwardSignature>("rglcd_fast::reward_head_backward");
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    variable_list out(3);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return out;
    const auto saved = ctx->get_saved_variables();
    auto [grad_u, grad_v, grad_scale] = op.call(grads[0], saved[0], saved[1], saved[2], mask);
    if (mask[0]) out[0] = grad_u;
    if (mask[1]) out[1] = grad_v;
    if (mask[2]) out[2] = grad_scale;
    return out;
  }
};

// (loss, accuracy): the loss is differentiable in the LRM's logits; the expert logits are a target and
// the accuracy is not differentiable.
class PairwisePreferenceLoss : public torch::autograd::Function<PairwisePreferenceLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& expert_logits,
                               c10::string_view kind, std::optional<int64_t> real_index, bool smooth_gt_label) {
    static const auto op = find_op<PairwiseSignature>("rglcd_fast::pairwise_preference_loss");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, accuracy] = op.call(logits, expert_logits, kind, real_index, smooth_gt_label);
    ctx->save_for_backward({logits, expert_logits});
    ctx->saved_data["kind"] = std::string(kind);
    ctx->saved_data["real_index"] = real_index;
    ctx->saved_data["smooth_gt_label"] = smooth_gt_label;
    ctx->mark_non_differentiable({accuracy});
    ctx->set_materialize_grads(false);
    return {loss, accuracy};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<PairwiseBackwardSignature>("rglcd_fast::pairwise_preference_loss_backward");
    variable_list out(5);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return out;
    const auto saved = ctx->get_saved_variables();
    out[0] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["kind"].toStringRef(),
                     ctx->saved_data["real_index"].toOptional<int64_t>(), ctx->saved_data["smooth_gt_label"].toBool());
    return out;
  }
};

at::Tensor reward_head_autograd(const at::Tensor& image_features, const at::Tensor& text_features,
                                const at::Tensor& logit_scale) {
  return RewardHead::apply(image_features, text_features, logit_scale);
}

std::tuple<at::Tensor, at::Tensor> pairwise_preference_loss_autograd(const at::Tensor& logits,
                                                                     const at::Tensor& expert_logits,
                                                                     c10::string_view kind,
                                                                     std::optional<int64_t> real_index,
                                                                     bool smooth_gt_label) {
  auto out = PairwisePreferenceLoss::apply(logits, expert_logits, kind, real_index, smooth_gt_label);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, Autograd, m) {
  m.impl("reward_head", &reward_head_autograd);
  m.impl("pairwise_preference_loss", &pairwise_preference_loss_autograd);
}

}  // namespace rglcd_fast
