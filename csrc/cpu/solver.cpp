// CPU kernels of the solver family (DESIGN.md §2): the teacher's guided DDIM solver step of LCD
// training (with backward), and the LCM and DDIM sampling steps with diffusers' step() semantics
// (clip / dynamic thresholding, final_alpha_cumprod, eta and noise), forward only.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "cpu/loops.h"

namespace rglcd_fast {
namespace {

// Per-sample (ᾱ_t, ᾱ_prev, t) from timesteps and prev_timesteps ([B] or one each); a negative
// prev_timestep (where allowed) means the final step: ᾱ_prev = final_alpha_cumprod.
template <typename acc_t>
struct StepSchedule {
  std::vector<acc_t> alpha_bar, alpha_bar_prev, t;
};

template <typename acc_t>
StepSchedule<acc_t> step_schedule(const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                  const at::Tensor& alphas_cumprod, int64_t batch, double final_alpha_cumprod,
                                  bool allow_final) {
  const int64_t T = alphas_cumprod.numel();
  const at::Tensor ts = per_sample_index_cpu(timesteps, batch, T, "timesteps", false);
  const at::Tensor ps = per_sample_index_cpu(prev_timesteps, batch, T, "prev_timesteps", allow_final);
  const std::vector<acc_t> table = cpu::schedule_values<acc_t>(alphas_cumprod);
  const int64_t* t = ts.data_ptr<int64_t>();
  const int64_t* p = ps.data_ptr<int64_t>();
  StepSchedule<acc_t> out{std::vector<acc_t>(batch), std::vector<acc_t>(batch), std::vector<acc_t>(batch)};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t tb = t[per_sample_index(ts.numel(), b)];
    out.t[b] = static_cast<acc_t>(tb);
    out.alpha_bar[b] = table[tb];
    out.alpha_bar_prev[b] =
        alpha_bar_prev(table.data(), p[per_sample_index(ps.numel(), b)], static_cast<acc_t>(final_alpha_cumprod));
  }
  return out;
}

// The per-sample clamp of x0. Thresholding: s = clamp(quantile(|x0|, ratio), 1, sample_max_value) over
// the sample's elements, with torch.quantile's linear interpolation (rank = ratio·(n - 1) in acc_t,
// as torch computes it in the quantile's dtype) and its NaN rule (any NaN: s = NaN), one
// std::nth_element per sample, samples in parallel. x0_at(b, i) is x0 of flat element i of sample b.
template <typename acc_t, typename X0At>
std::vector<X0Clamp<acc_t>> x0_clamps(const X0Options& o, int64_t batch, int64_t per_sample, const X0At& x0_at) {
  std::vector<X0Clamp<acc_t>> out(batch, X0Clamp<acc_t>{o.kind, static_cast<acc_t>(o.clip_sample_range)});
  if (o.kind != X0Limit::Threshold || per_sample == 0) return out;
  const QuantileRank<acc_t> rank = quantile_rank<acc_t>(o.dynamic_thresholding_ratio, per_sample);
  const int64_t below = rank.below, above = rank.above;
  const acc_t max_value = static_cast<acc_t>(o.sample_max_value);
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> values(per_sample);
    for (int64_t b = b0; b < b1; ++b) {
      bool has_nan = false;
      for (int64_t i = 0; i < per_sample; ++i) {
        const acc_t v = std::abs(x0_at(b, b * per_sample + i));
        has_nan |= std::isnan(v);
        values[i] = v;
      }
      acc_t q = std::numeric_limits<acc_t>::quiet_NaN();
      if (!has_nan) {
        std::nth_element(values.begin(), values.begin() + below, values.end());
        const acc_t v_below = values[below];
        const acc_t v_above = above == below ? v_below : *std::min_element(values.begin() + below + 1, values.end());
        q = lerp(v_below, v_above, rank.weight);
      }
      out[b].bound = threshold_from_quantile(q, max_value);
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// ---- guided DDIM solver step (LCD training, the teacher's side) ---------------------------------

template <typename acc_t>
std::vector<acc_t> guidance_values(const at::Tensor& guidance_scale, int64_t batch) {
  const at::Tensor w =
      per_sample_values(guidance_scale, batch, c10::CppTypeToScalarType<acc_t>::value, "guidance_scale");
  const acc_t* p = w.const_data_ptr<acc_t>();
  std::vector<acc_t> out(batch);
  for (int64_t b = 0; b < batch; ++b) out[b] = p[per_sample_index(w.numel(), b)];
  return out;
}

// The guided step is a DDIM step with eta = 0; the backward also needs x0 and ε as linear maps.
template <typename acc_t>
struct GuidedCoefficients {
  DdimCoefficients<acc_t> step;
  Linear<acc_t> x0, eps;
};

template <typename acc_t>
std::vector<GuidedCoefficients<acc_t>> guided_coefficients(const at::Tensor& timesteps,
                                                           const at::Tensor& prev_timesteps,
                                                           const at::Tensor& alphas_cumprod, int64_t batch,
                                                           PredictionType type) {
  const auto sched = step_schedule<acc_t>(timesteps, prev_timesteps, alphas_cumprod, batch, 1.0, false);
  std::vector<GuidedCoefficients<acc_t>> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const acc_t alpha_bar = sched.alpha_bar[b];
    out[b] = {ddim_coefficients(alpha_bar, sched.alpha_bar_prev[b], acc_t(0)), x0_coefficients(alpha_bar, type),
              eps_coefficients(alpha_bar, type)};
  }
  return out;
}

// m = m_c + w (m_c - m_u); x0 = x0(m, x); ε = ε(m, x); x_prev = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) ε.
std::tuple<at::Tensor, at::Tensor> guided_ddim_step_cpu(const at::Tensor& cond_output, const at::Tensor& uncond_output,
                                                        const at::Tensor& sample, const at::Tensor& timesteps,
                                                        const at::Tensor& prev_timesteps,
                                                        const at::Tensor& guidance_scale,
                                                        const at::Tensor& alphas_cumprod,
                                                        c10::string_view prediction_type) {
  check_same_shape(sample, cond_output, "cond_output");
  check_same_shape(sample, uncond_output, "uncond_output");
  const PredictionType type = parse_prediction_type(prediction_type);
  const Layout layout(sample);
  const at::Tensor mc = layout.input(cond_output), mu = layout.input(uncond_output), x = layout.input(sample);
  at::Tensor x_prev = layout.output(), pred_x0 = layout.output();
  const int64_t n = x.numel(), batch = batch_size(x), per_sample = batch ? n / batch : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rglcd_fast_guided_ddim_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto coeff = guided_coefficients<acc_t>(timesteps, prev_timesteps, alphas_cumprod, batch, type);
    const auto w = guidance_values<acc_t>(guidance_scale, batch);
    const scalar_t* cp = mc.const_data_ptr<scalar_t>();
    const scalar_t* up = mu.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* pp = x_prev.mutable_data_ptr<scalar_t>();
    scalar_t* op = pred_x0.mutable_data_ptr<scalar_t>();
    with_prediction_type(type, [&](auto tag) {
      constexpr PredictionType kType = decltype(tag)::value;
      cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
        const DdimCoefficients<acc_t> c = coeff[b].step;
        const acc_t wb = w[b];
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t m = guided(acc(cp[i]), acc(up[i]), wb), xi = acc(xp[i]);
          const acc_t x0 = x0_from(xi, m, c.a, c.s, kType);
          op[i] = static_cast<scalar_t>(x0);
          pp[i] = static_cast<scalar_t>(c.sqrt_prev * x0 + c.c_dir * eps_from(xi, m, c.a, c.s, kType));
        }
      });
    });
  });
  return {layout.deliver(x_prev), layout.deliver(pred_x0)};
}

// Linear backward: with g_m = (sqrt_prev·x0.cm + c_dir·ε.cm)·g_prev + x0.cm·g_x0,
// grad_cond = (1 + w)·g_m, grad_uncond = -w·g_m, grad_sample = (sqrt_prev·x0.cx + c_dir·ε.cx)·g_prev + x0.cx·g_x0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> guided_ddim_step_backward_cpu(
    const std::optional<at::Tensor>& grad_x_prev, const std::optional<at::Tensor>& grad_pred_x0,
    const at::Tensor& timesteps, const at::Tensor& prev_timesteps, const at::Tensor& guidance_scale,
    const at::Tensor& alphas_cumprod, c10::string_view prediction_type, std::array<bool, 3> mask) {
  const bool has_gp = grad_x_prev.has_value() && grad_x_prev->defined();
  const bool has_g0 = grad_pred_x0.has_value() && grad_pred_x0->defined();
  TORCH_CHECK_VALUE(has_gp || has_g0, "guided_ddim_step_backward: expected grad_x_prev or grad_pred_x0");
  if (has_gp && has_g0) check_same_shape(*grad_x_prev, *grad_pred_x0, "grad_pred_x0");
  const PredictionType type = parse_prediction_type(prediction_type);
  const Layout layout(has_gp ? *grad_x_prev : *grad_pred_x0);
  const at::Tensor gprev = has_gp ? layout.input(*grad_x_prev) : at::Tensor();
  const at::Tensor gx0 = has_g0 ? layout.input(*grad_pred_x0) : at::Tensor();
  const at::Tensor& like = layout.reference;
  at::Tensor grad_c = mask[0] ? layout.output() : unrequested(like);
  at::Tensor grad_u = mask[1] ? layout.output() : unrequested(like);
  at::Tensor grad_x = mask[2] ? layout.output() : unrequested(like);
  const int64_t n = like.numel(), batch = batch_size(like), per_sample = batch ? n / batch : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "rglcd_fast_guided_ddim_step_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto coeff = guided_coefficients<acc_t>(timesteps, prev_timesteps, alphas_cumprod, batch, type);
    const auto w = guidance_values<acc_t>(guidance_scale, batch);
    const scalar_t* gp = has_gp ? gprev.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g0 = has_g0 ? gx0.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gc = mask[0] ? grad_c.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gu = mask[1] ? grad_u.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = mask[2] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
      const GuidedCoefficients<acc_t> c = coeff[b];
      // x_prev as one linear map of (x, m); has_x = false maps carry cx = 0.
      const Linear<acc_t> prev{c.step.sqrt_prev * c.x0.cx + c.step.c_dir * c.eps.cx,
                               c.step.sqrt_prev * c.x0.cm + c.step.c_dir * c.eps.cm};
      const acc_t wc = acc_t(1) + w[b], wu = -w[b];
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t a = gp ? acc(gp[i]) : acc_t(0), z = g0 ? acc(g0[i]) : acc_t(0);
        const acc_t gm = prev.cm * a + c.x0.cm * z;
        if (gc) gc[i] = static_cast<scalar_t>(wc * gm);
        if (gu) gu[i] = static_cast<scalar_t>(wu * gm);
        if (gx) gx[i] = static_cast<scalar_t>(prev.cx * a + c.x0.cx * z);
      }
    });
  });
  return {mask[0] ? layout.deliver(grad_c) : grad_c, mask[1] ? layout.deliver(grad_u) : grad_u,
          mask[2] ? layout.deliver(grad_x) : grad_x};
}

// ---- sampling steps (inference) -----------------------------------------------------------------

// diffusers LCMScheduler.step: x0, clip / threshold, denoised = c_out·x0 + c_skip·x, and
// prev = sqrt(ᾱ_prev)·denoised + sqrt(1 - ᾱ_prev)·noise, or prev = denoised without noise (last step).
std::tuple<at::Tensor, at::Tensor> lcm_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                                const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                                double final_alpha_cumprod, c10::string_view prediction_type,
                                                double timestep_scaling, bool clip_sample, double clip_sample_range,
                                                bool thresholding, double dynamic_thresholding_ratio,
                                                double sample_max_value) {
  const PredictionType type = parse_prediction_type(prediction_type);
  const X0Options options =
      x0_options(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value);
  const StepInputs in(model_output, sample, noise);
  at::Tensor prev = in.layout.output(), denoised = in.layout.output();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "rglcd_fast_lcm_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sched = step_schedule<acc_t>(timesteps, prev_timesteps, alphas_cumprod, in.batch, final_alpha_cumprod,
                                            true);
    std::vector<LcmCoefficients<acc_t>> coeff(in.batch);
    for (int64_t b = 0; b < in.batch; ++b)
      coeff[b] = lcm_coefficients(sched.alpha_bar[b], sched.alpha_bar_prev[b], sched.t[b], acc_t(timestep_scaling),
                                  acc_t(kLcmSigmaData));
    const scalar_t* mp = in.m.const_data_ptr<scalar_t>();
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* zp = in.z.defined() ? in.z.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pp = prev.mutable_data_ptr<scalar_t>();
    scalar_t* dp = denoised.mutable_data_ptr<scalar_t>();
    with_prediction_type(type, [&](auto tag) {
      constexpr PredictionType kType = decltype(tag)::value;
      const auto x0_at = [&](int64_t b, int64_t i) {
        return x0_from(acc(xp[i]), acc(mp[i]), coeff[b].a, coeff[b].s, kType);
      };
      const auto clamps = x0_clamps<acc_t>(options, in.batch, in.per_sample, x0_at);
      // noise and limit as compile-time flags: branch-free inner loops that vectorise
      cpu::with_flags(
          [&](auto with_noise, auto limited) {
            cpu::parallel_sample_runs(in.n, in.per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
              const LcmCoefficients<acc_t> c = coeff[b];
              const X0Clamp<acc_t> limit = clamps[b];
              for (int64_t i = i0; i < i1; ++i) {
                const acc_t xi = acc(xp[i]), x0 = x0_from(xi, acc(mp[i]), c.a, c.s, kType);
                const acc_t d = c.c_out * (limited ? limit(x0) : x0) + c.c_skip * xi;
                dp[i] = static_cast<scalar_t>(d);
                pp[i] = static_cast<scalar_t>(with_noise ? c.sqrt_prev * d + c.sigma_prev * acc(zp[i]) : d);
              }
            });
          },
          zp != nullptr, options.kind != X0Limit::None);
    });
  });
  return {in.layout.deliver(prev), in.layout.deliver(denoised)};
}

// diffusers DDIMScheduler.step: x0 and ε, clip / threshold x0, ε re-derived from the clipped x0 when
// use_clipped_model_output, prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev - σ_t²)·ε (+ σ_t·noise when eta > 0).
std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                 const at::Tensor& timesteps, const at::Tensor& prev_timesteps,
                                                 const at::Tensor& alphas_cumprod,
                                                 const std::optional<at::Tensor>& noise, double final_alpha_cumprod,
                                                 double eta, c10::string_view prediction_type, bool clip_sample,
                                                 double clip_sample_range, bool thresholding,
                                                 double dynamic_thresholding_ratio, double sample_max_value,
                                                 bool use_clipped_model_output) {
  const PredictionType type = parse_prediction_type(prediction_type);
  const X0Options options =
      x0_options(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value);
  TORCH_CHECK_VALUE(eta >= 0, "eta: expected a non-negative value, got ", eta);
  const StepInputs in(model_output, sample, noise);
  TORCH_CHECK_VALUE(eta == 0 || in.z.defined(), "noise: required when eta > 0 (got eta = ", eta, ")");
  at::Tensor prev = in.layout.output(), pred_x0 = in.layout.output();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "rglcd_fast_ddim_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto sched = step_schedule<acc_t>(timesteps, prev_timesteps, alphas_cumprod, in.batch, final_alpha_cumprod,
                                            true);
    std::vector<DdimCoefficients<acc_t>> coeff(in.batch);
    for (int64_t b = 0; b < in.batch; ++b)
      coeff[b] = ddim_coefficients(sched.alpha_bar[b], sched.alpha_bar_prev[b], acc_t(eta));
    const scalar_t* mp = in.m.const_data_ptr<scalar_t>();
    const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
    const scalar_t* zp = eta > 0 ? in.z.const_data_ptr<scalar_t>() : nullptr;  // noise is unused when eta = 0
    scalar_t* pp = prev.mutable_data_ptr<scalar_t>();
    scalar_t* op = pred_x0.mutable_data_ptr<scalar_t>();
    with_prediction_type(type, [&](auto tag) {
      constexpr PredictionType kType = decltype(tag)::value;
      const auto x0_at = [&](int64_t b, int64_t i) {
        return x0_from(acc(xp[i]), acc(mp[i]), coeff[b].a, coeff[b].s, kType);
      };
      const auto clamps = x0_clamps<acc_t>(options, in.batch, in.per_sample, x0_at);
      cpu::with_flags(
          [&](auto with_noise, auto limited, auto clipped_eps) {
            cpu::parallel_sample_runs(in.n, in.per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
              const DdimCoefficients<acc_t> c = coeff[b];
              const X0Clamp<acc_t> limit = clamps[b];
              for (int64_t i = i0; i < i1; ++i) {
                const acc_t xi = acc(xp[i]), mi = acc(mp[i]), raw = x0_from(xi, mi, c.a, c.s, kType);
                const acc_t x0 = limited ? limit(raw) : raw;
                // use_clipped_model_output: ε re-derived from the clipped x0, (x - a·x0) / s
                const acc_t eps = clipped_eps ? eps_from(xi, x0, c.a, c.s, PredictionType::Sample)
                                              : eps_from(xi, mi, c.a, c.s, kType);
                const acc_t p = c.sqrt_prev * x0 + c.c_dir * eps;
                op[i] = static_cast<scalar_t>(x0);
                pp[i] = static_cast<scalar_t>(with_noise ? p + c.std_dev * acc(zp[i]) : p);
              }
            });
          },
          zp != nullptr, options.kind != X0Limit::None, use_clipped_model_output);
    });
  });
  return {in.layout.deliver(prev), in.layout.deliver(pred_x0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CPU, m) {
  m.impl("guided_ddim_step", &guided_ddim_step_cpu);
  m.impl("guided_ddim_step_backward", &guided_ddim_step_backward_cpu);
  m.impl("lcm_step", &lcm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
}

}  // namespace rglcd_fast
