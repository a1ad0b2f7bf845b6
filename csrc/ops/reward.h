// The reward family's ops (schemas: rglcd_fast/ops/reward.py) written once for both backends: the
// argument and device checks they share, the device guard, the outputs and the registration. A backend
// (csrc/cpu/reward.cpp, csrc/cuda/reward.cu) is a struct with DeviceGuard, reward_head,
// reward_head_backward, pairwise_preference_loss and pairwise_preference_loss_backward, taking the op's
// arguments (the pairwise ops' kind, real_index and smooth_gt_label as one validated PreferenceRule) and
// computing into the outputs it is given.
#pragma once

#include <torch/library.h>

#include "common.h"
#include "math/reward.h"

namespace rglcd_fast {
namespace ops {

// The reward head's tensors: features that broadcast, one logit scale, everything on the image features' device.
inline void check_head_arguments(const at::Tensor& image_features, const at::Tensor& text_features,
                                 const at::Tensor& logit_scale) {
  check_reward_features(image_features, text_features);
  TORCH_CHECK_VALUE(logit_scale.numel() == 1, "logit_scale: expected one value, got shape ", logit_scale.sizes());
  check_device(text_features, image_features.device(), "text_features");
  check_device(logit_scale, image_features.device(), "logit_scale");
}

// The pairwise losses' tensors: logits S and expert logits E [K, B] on one device.
inline void check_pair_arguments(const at::Tensor& logits, const at::Tensor& expert_logits) {
  check_pair_logits(logits, expert_logits);
  check_device(expert_logits, logits.device(), "expert_logits");
}

// The loss and accuracy's dtype: float64 for float64 logits, else float32.
inline at::TensorOptions accumulation_options(const at::Tensor& logits) {
  return logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// score = logit_scale · cos(image_features, text_features) over the last dim, text broadcast: [...] (the image
// features' leading dims).
template <typename Backend>
at::Tensor reward_head(const at::Tensor& image_features, const at::Tensor& text_features,
                       const at::Tensor& logit_scale) {
  check_head_arguments(image_features, text_features, logit_scale);
  const typename Backend::DeviceGuard guard(image_features.device());
  at::Tensor scores = at::empty(image_features.sizes().slice(0, image_features.dim() - 1), image_features.options());
  Backend::reward_head(image_features, text_features, logit_scale, scores);
  return scores;
}

// Gradients of the scores' upstream grad (one value per image row) for the requested inputs (mask).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> reward_head_backward(const at::Tensor& grad,
                                                                    const at::Tensor& image_features,
                                                                    const at::Tensor& text_features,
                                                                    const at::Tensor& logit_scale,
                                                                    std::array<bool, 3> mask) {
  check_head_arguments(image_features, text_features, logit_scale);
  check_device(grad, image_features.device(), "grad");
  const int64_t rows = image_features.numel() / image_features.size(-1);
  TORCH_CHECK_VALUE(grad.numel() == rows, "grad: expected ", rows, " values, got ", grad.numel());
  const typename Backend::DeviceGuard guard(image_features.device());
  at::Tensor grad_u =
      mask[0] ? at::empty(image_features.sizes(), image_features.options()) : unrequested(image_features);
  at::Tensor grad_v = mask[1] ? at::empty(text_features.sizes(), text_features.options()) : unrequested(text_features);
  at::Tensor grad_s = mask[2] ? at::empty(logit_scale.sizes(), logit_scale.options()) : unrequested(logit_scale);
  if (mask[0] || mask[1] || mask[2]) {
    Backend::reward_head_backward(grad, image_features, text_features, logit_scale, mask, grad_u, grad_v, grad_s);
  }
  return {grad_u, grad_v, grad_s};
}

// Pairwise preference loss of logits S against expert logits E, both [K, B]: (loss, accuracy).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> pairwise_preference_loss(const at::Tensor& logits, const at::Tensor& expert_logits,
                                                            c10::string_view kind, std::optional<int64_t> real_index,
                                                            bool smooth_gt_label) {
  check_pair_arguments(logits, expert_logits);
  const PreferenceRule rule = parse_preference_rule(kind, real_index, smooth_gt_label, logits.size(0));
  const typename Backend::DeviceGuard guard(logits.device());
  at::Tensor loss = at::empty({}, accumulation_options(logits)), accuracy = at::empty({}, accumulation_options(logits));
  Backend::pairwise_preference_loss(logits, expert_logits, rule, loss, accuracy);
  return {loss, accuracy};
}

// grad_loss: one value, on the CPU (read on the host) or on the logits' device.
template <typename Backend>
at::Tensor pairwise_preference_loss_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                             const at::Tensor& expert_logits, c10::string_view kind,
                                             std::optional<int64_t> real_index, bool smooth_gt_label) {
  check_pair_arguments(logits, expert_logits);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss: expected one value, got shape ", grad_loss.sizes());
  TORCH_CHECK_VALUE(grad_loss.is_cpu() || grad_loss.device() == logits.device(), "grad_loss: expected device ",
                    logits.device(), " or the CPU, got ", grad_loss.device());
  const PreferenceRule rule = parse_preference_rule(kind, real_index, smooth_gt_label, logits.size(0));
  const typename Backend::DeviceGuard guard(logits.device());
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  if (logits.size(1) > 0) Backend::pairwise_preference_loss_backward(grad_loss, logits, expert_logits, rule, grad);
  return grad;
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
