// The solver family's ops (schemas: rglcd_fast/ops/solver.py) written once for both backends:
// argument checks and parsing, inputs and outputs in the working layout, and the registration. A
// backend (csrc/cpu/solver.cpp, csrc/cuda/solver.cu) is a struct with
//   DeviceGuard                  held while an op runs (CUDA: the op's device)
//   guided_ddim_step, guided_ddim_step_backward, lcm_step, ddim_step
//   lcm_step_drawing_noise       lcm_step with the noise drawn as torch.randn draws it
// computing into the outputs it is given.
#pragma once

#include <torch/library.h>

#include "common.h"
#include "math/solver.h"

namespace rglcd_fast {
constexpr double kLcmSigmaData = 0.5;  // LCMScheduler's fixed sigma_data

// The x0 clip / threshold options shared by the LCM and DDIM steps.
struct X0Options {
  X0Limit kind;
  double clip_sample_range, dynamic_thresholding_ratio, sample_max_value;
};

inline X0Options x0_options(bool clip_sample, double clip_sample_range, bool thresholding,
                            double dynamic_thresholding_ratio, double sample_max_value) {
  // diffusers' domain: any clip range and maximum (torch.clamp's rule where bounds cross), q in [0, 1]
  TORCH_CHECK_VALUE(dynamic_thresholding_ratio >= 0 && dynamic_thresholding_ratio <= 1,
                    "dynamic_thresholding_ratio: expected a value in [0, 1] (torch.quantile's q), got ",
                    dynamic_thresholding_ratio);
  const X0Limit kind = thresholding ? X0Limit::Threshold : (clip_sample ? X0Limit::Clip : X0Limit::None);
  return {kind, clip_sample_range, dynamic_thresholding_ratio, sample_max_value};
}

// The inputs of a sampling step (model_output, sample, optional noise: same shape and dtype) in the
// working layout of `sample`.
struct StepInputs {
  Layout layout;
  at::Tensor m, x, z;  // z undefined without noise
  int64_t n, batch, per_sample;

  StepInputs(const at::Tensor& model_output, const at::Tensor& sample, const std::optional<at::Tensor>& noise)
      : layout(sample) {
    TORCH_CHECK_TYPE(at::isFloatingType(sample.scalar_type()),
                     "sample: expected float16, bfloat16, float32 or float64, got ", sample.scalar_type());
    check_same_shape(sample, model_output, "model_output", "sample");
    m = layout.input(model_output);
    x = layout.input(sample);
    if (noise.has_value() && noise->defined()) {
      check_same_shape(sample, *noise, "noise", "sample");
      TORCH_CHECK_TYPE(noise->scalar_type() == sample.scalar_type(), "noise: expected dtype ", sample.scalar_type(),
                       ", got ", noise->scalar_type());
      z = layout.input(*noise);
    }
    TORCH_CHECK_TYPE(model_output.scalar_type() == sample.scalar_type(), "model_output: expected dtype ",
                     sample.scalar_type(), ", got ", model_output.scalar_type());
    n = x.numel();
    batch = batch_size(x);
    per_sample = batch ? n / batch : 1;
  }

  // These inputs with the noise drawn as torch.randn(sample.shape, generator=generator,
  // dtype=sample.dtype, device=sample.device) draws it (a contiguous draw, in the working layout).
  StepInputs with_drawn_noise(const std::optional<at::Generator>& generator) const {
    StepInputs drawn = *this;
    drawn.z = layout.input(at::randn(layout.reference.sizes(), generator, layout.reference.options()));
    return drawn;
  }
};

namespace ops {

// The schedule arguments of every solver op: timesteps and prev_timesteps ([B] or one each), ᾱ.
struct ScheduleArgs {
  const at::Tensor& timesteps;
  const at::Tensor& prev_timesteps;
  const at::Tensor& alphas_cumprod;
};

inline void check_schedule_devices(const c10::Device& device, const ScheduleArgs& args) {
  rglcd_fast::check_schedule_devices(device, args.timesteps, args.alphas_cumprod);
  check_device(args.prev_timesteps, device, "prev_timesteps");
}

// ---- guided DDIM solver step (LCD training, the teacher's side) ---------------------------------

// The guided step's arguments besides its tensors in the working layout.
struct GuidedArgs : ScheduleArgs {
  const at::Tensor& guidance_scale;
  PredictionType type;
};

// x0 = x0_c + w (x0_c - x0_u), ε = ε_c + w (ε_c - ε_u); x_prev = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) ε.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> guided_ddim_step(const at::Tensor& cond_output, const at::Tensor& uncond_output,
                                                    const at::Tensor& sample, const at::Tensor& timesteps,
                                                    const at::Tensor& prev_timesteps, const at::Tensor& guidance_scale,
                                                    const at::Tensor& alphas_cumprod,
                                                    c10::string_view prediction_type) {
  check_same_shape(sample, cond_output, "cond_output", "sample");
  check_same_shape(sample, uncond_output, "uncond_output", "sample");
  const GuidedArgs args{
      {timesteps, prev_timesteps, alphas_cumprod}, guidance_scale, parse_prediction_type(prediction_type)};
  const c10::Device device = cond_output.device();  // the first argument's: the others are named when they differ
  check_device(uncond_output, device, "uncond_output");
  check_device(sample, device, "sample");
  check_device(guidance_scale, device, "guidance_scale");
  check_schedule_devices(device, args);
  const typename Backend::DeviceGuard guard(device);
  const Layout layout(sample);
  const at::Tensor mc = layout.input(cond_output), mu = layout.input(uncond_output), x = layout.input(sample);
  at::Tensor x_prev = layout.output(), pred_x0 = layout.output();
  Backend::guided_ddim_step(mc, mu, x, x_prev, pred_x0, args);
  return {layout.deliver(x_prev), layout.deliver(pred_x0)};
}

// Linear backward: with g_m = (sqrt_prev·x0.cm + c_dir·ε.cm)·g_prev + x0.cm·g_x0,
// grad_cond = (1 + w)·g_m, grad_uncond = -w·g_m, grad_sample = (sqrt_prev·x0.cx + c_dir·ε.cx)·g_prev + x0.cx·g_x0.
// A missing upstream gradient counts as zero (an undefined tensor for the backend).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> guided_ddim_step_backward(
    const std::optional<at::Tensor>& grad_x_prev, const std::optional<at::Tensor>& grad_pred_x0,
    const at::Tensor& timesteps, const at::Tensor& prev_timesteps, const at::Tensor& guidance_scale,
    const at::Tensor& alphas_cumprod, c10::string_view prediction_type, std::array<bool, 3> mask) {
  const bool has_gp = grad_x_prev.has_value() && grad_x_prev->defined();
  const bool has_g0 = grad_pred_x0.has_value() && grad_pred_x0->defined();
  TORCH_CHECK_VALUE(has_gp || has_g0, "guided_ddim_step_backward: expected grad_x_prev or grad_pred_x0");
  if (has_gp && has_g0) {
    check_same_shape(*grad_x_prev, *grad_pred_x0, "grad_pred_x0", "grad_x_prev");
    check_device(*grad_pred_x0, grad_x_prev->device(), "grad_pred_x0");
  }
  const GuidedArgs args{
      {timesteps, prev_timesteps, alphas_cumprod}, guidance_scale, parse_prediction_type(prediction_type)};
  const at::Tensor& like_input = has_gp ? *grad_x_prev : *grad_pred_x0;
  const c10::Device device = like_input.device();
  check_device(guidance_scale, device, "guidance_scale");
  check_schedule_devices(device, args);
  const typename Backend::DeviceGuard guard(device);
  const Layout layout(like_input);
  const at::Tensor gprev = has_gp ? layout.input(*grad_x_prev) : at::Tensor();
  const at::Tensor gx0 = has_g0 ? layout.input(*grad_pred_x0) : at::Tensor();
  const at::Tensor& like = layout.reference;
  at::Tensor grad_c = mask[0] ? layout.output() : unrequested(like);
  at::Tensor grad_u = mask[1] ? layout.output() : unrequested(like);
  at::Tensor grad_x = mask[2] ? layout.output() : unrequested(like);
  Backend::guided_ddim_step_backward(like, gprev, gx0, grad_c, grad_u, grad_x, args, mask);
  return {mask[0] ? layout.deliver(grad_c) : grad_c, mask[1] ? layout.deliver(grad_u) : grad_u,
          mask[2] ? layout.deliver(grad_x) : grad_x};
}

// ---- sampling steps (inference) -----------------------------------------------------------------

// A sampling step's arguments besides its tensors in the working layout.
struct SamplingArgs : ScheduleArgs {
  double final_alpha_cumprod;
  PredictionType type;
  X0Options options;
};

// Every tensor of a sampling step on the first argument's (model_output's) device.
template <typename Backend>
void check_sampling_devices(const at::Tensor& model_output, const at::Tensor& sample,
                            const std::optional<at::Tensor>& noise, const ScheduleArgs& schedule) {
  const c10::Device device = model_output.device();
  check_device(sample, device, "sample");
  if (noise.has_value() && noise->defined()) check_device(*noise, device, "noise");
  check_schedule_devices(device, schedule);
}

// Where the noise of a sampling step comes from: the noise argument, or (draw_noise) the op's own
// torch.randn(sample.shape, generator=generator, dtype=sample.dtype, device=sample.device).
inline void check_noise_source(const std::optional<at::Tensor>& noise, bool draw_noise,
                               const std::optional<at::Generator>& generator, const c10::Device& device) {
  const bool has_generator = generator.has_value() && generator->defined();
  TORCH_CHECK_VALUE(!draw_noise || !(noise.has_value() && noise->defined()),
                    "noise: expected None with draw_noise=True (the op draws the noise), got a tensor");
  TORCH_CHECK_VALUE(draw_noise || !has_generator, "generator: only used with draw_noise=True");
  // as torch.randn: the device type only (torch.Generator(device="cuda") has no index)
  TORCH_CHECK_VALUE(!has_generator || generator->device().type() == device.type(), "generator: expected a ",
                    device.type(), " generator (as sample), got one on ", generator->device());
}

// diffusers LCMScheduler.step: x0, clip / threshold, denoised = c_out·x0 + c_skip·x, and
// prev = sqrt(ᾱ_prev)·denoised + sqrt(1 - ᾱ_prev)·noise, or prev = denoised without noise (last step).
// draw_noise: the noise drawn from generator (the default one when None) exactly as torch.randn draws
// it, the generator's state advancing as torch.randn advances it.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> lcm_step(const at::Tensor& model_output, const at::Tensor& sample,
                                            const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                            const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                            double final_alpha_cumprod, c10::string_view prediction_type,
                                            double timestep_scaling, bool clip_sample, double clip_sample_range,
                                            bool thresholding, double dynamic_thresholding_ratio,
                                            double sample_max_value, bool draw_noise,
                                            const std::optional<at::Generator>& generator) {
  const SamplingArgs args{
      {timesteps, prev_timesteps, alphas_cumprod},
      final_alpha_cumprod,
      parse_prediction_type(prediction_type),
      x0_options(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)};
  check_sampling_devices<Backend>(model_output, sample, noise, args);
  check_noise_source(noise, draw_noise, generator, sample.device());
  const typename Backend::DeviceGuard guard(sample.device());
  const StepInputs in(model_output, sample, noise);
  at::Tensor prev = in.layout.output(), denoised = in.layout.output();
  if (draw_noise) {
    Backend::lcm_step_drawing_noise(in, prev, denoised, args, timestep_scaling, generator);
  } else {
    Backend::lcm_step(in, prev, denoised, args, timestep_scaling);
  }
  return {in.layout.deliver(prev), in.layout.deliver(denoised)};
}

// diffusers DDIMScheduler.step: x0 and ε, clip / threshold x0, ε re-derived from the clipped x0 when
// use_clipped_model_output, prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev - σ_t²)·ε (+ σ_t·noise when eta > 0).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> ddim_step(const at::Tensor& model_output, const at::Tensor& sample,
                                             const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                             const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                             double final_alpha_cumprod, double eta, c10::string_view prediction_type,
                                             bool clip_sample, double clip_sample_range, bool thresholding,
                                             double dynamic_thresholding_ratio, double sample_max_value,
                                             bool use_clipped_model_output) {
  const SamplingArgs args{
      {timesteps, prev_timesteps, alphas_cumprod},
      final_alpha_cumprod,
      parse_prediction_type(prediction_type),
      x0_options(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value)};
  check_sampling_devices<Backend>(model_output, sample, noise, args);
  const typename Backend::DeviceGuard guard(sample.device());
  const StepInputs in(model_output, sample, noise);
  // any eta, as diffusers: σ = η·sqrt(var) enters the direction squared, the noise only when η > 0
  TORCH_CHECK_VALUE(eta <= 0 || in.z.defined(), "noise: required when eta > 0 (got eta = ", eta, ")");
  at::Tensor prev = in.layout.output(), pred_x0 = in.layout.output();
  Backend::ddim_step(in, prev, pred_x0, args, eta, use_clipped_model_output);
  return {in.layout.deliver(prev), in.layout.deliver(pred_x0)};
}

template <typename Backend>
void register_solver(torch::Library& m) {
  m.impl("guided_ddim_step", &guided_ddim_step<Backend>);
  m.impl("guided_ddim_step_backward", &guided_ddim_step_backward<Backend>);
  m.impl("lcm_step", &lcm_step<Backend>);
  m.impl("ddim_step", &ddim_step<Backend>);
}

}  // namespace ops
}  // namespace rglcd_fast
