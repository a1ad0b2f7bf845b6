// The reward family's ops (schemas: rglcd_fast/ops/reward.py) written once for both backends: the
// argument and device checks they share, the device guard and the registration. A backend
// (csrc/cpu/reward.cpp, csrc/cuda/reward.cu) is a struct with DeviceGuard, reward_head,
// reward_head_backward, pairwise_preference_loss and pairwise_preference_loss_backward, taking the op's
// arguments (the pairwise ops' kind, real_index and smooth_gt_label as one validated PreferenceRule).
#pragma once

#include <torch/library.h>

#include "common.h"
#include "math/reward.h"

namespace rglcd_fast {
namespace ops {

// The reward head's tensors: one logit scale, everything on the image features' device.
inline void check_head_arguments(const at::Tensor& image_features, const at::Tensor& text_features,
                                 const at::Tensor& logit_scale) {
  TORCH_CHECK_VALUE(logit_scale.numel() == 1, "logit_scale: expected one value, got shape ", logit_scale.sizes());
  check_device(text_features, image_features.device(), "text_features");
  check_device(logit_scale, image_features.device(), "logit_scale");
}

// score = logit_scale · cos(image_features, text_features) over the last dim, text broadcast.
template <typename Backend>
at::Tensor reward_head(const at::Tensor& image_features, const at::Tensor& text_features,
                       const at::Tensor& logit_scale) {
  check_head_arguments(image_features, text_features, logit_scale);
  const typename Backend::DeviceGuard guard(image_features.device());
  return Backend::reward_head(image_features, text_features, logit_scale);
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reward_head_backward(const at::Tensor& grad,
                                                                    const at::Tensor& image_features,
                                                                    const at::Tensor& text_features,
                                                                    const at::Tensor& logit_scale,
                                                                    std::array<bool, 3> mask) {
  check_head_arguments(image_features, text_features, logit_scale);
  check_device(grad, image_features.device(), "grad");
  const typename Backend::DeviceGuard guard(image_features.device());
  return Backend::reward_head_backward(grad, image_features, text_features, logit_scale, mask);
}

// Pairwise preference loss of logits S against expert logits E, both [K, B]: (loss, accuracy).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> pairwise_preference_loss(const at::Tensor& logits, const at::Tensor& expert_logits,
                                                            c10::string_view kind, std::optional<int64_t> real_index,
                                                            bool smooth_gt_label) {
  check_pair_logits(logits, expert_logits);
  check_device(expert_logits, logits.device(), "expert_logits");
  const typename Backend::DeviceGuard guard(logits.device());
  return Backend::pairwise_preference_loss(logits, expert_logits,
                                           parse_preference_rule(kind, real_index, smooth_gt_label, logits.size(0)));
}

template <typename Backend>
at::Tensor pairwise_preference_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                             const at::Tensor& expert_logits, c10::string_view kind,
                                             std::optional<int64_t> real_index, bool smooth_gt_label) {
  check_pair_logits(logits, expert_logits);
  check_device(expert_logits, logits.device(), "expert_logits");
  const typename Backend::DeviceGuard guard(logits.device());
  return Backend::pairwise_preference_loss_backward(
      grad_loss, logits, expert_logits, parse_preference_rule(kind, real_index, smooth_gt_label, logits.size(0)));
}

template <typename Backend>
void register_reward(torch::Library& m) {
  m.impl("reward_head", &reward_head<Backend>);
  m.impl("reward_head_backward", &reward_head_backward<Backend>);
  m.impl("pairwise_preference_loss", &pairwise_preference_loss<Backend>);
  m.impl("pairwise_preference_loss_backward", &pairwise_preference_loss_backward<Backend>);
}

}  // namespace ops
}  // namespace rglcd_fast
