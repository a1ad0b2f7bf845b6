// CPU kernels of the solver family (docs/design.md §2): the teacher's guided DDIM solver step of LCD
// training (with backward), and the LCM and DDIM sampling steps with diffusers' step() semantics
// (clip / dynamic thresholding, final_alpha_cumprod, eta and noise), forward only. The ops around
// them (arguments, layouts, registration): csrc/ops/solver.h.
#include "ops/solver.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "cpu/loops.h"

namespace rglcd_fast {
namespace {

// Per-sample step coefficients make(ᾱ_t, ᾱ_prev, t) from timesteps and prev_timesteps ([B] or one
// each); a negative prev_timestep (where allowed) means the final step: ᾱ_prev = final_alpha_cumprod.
template <typename acc_t, typename Make>
auto step_coefficients(const ops::ScheduleArgs& args, int64_t batch, double final_alpha_cumprod, bool allow_final,
                       const Make& make) {
  const int64_t T = args.alphas_cumprod.numel();
  const at::Tensor ts = per_sample_index_cpu(args.timesteps, batch, T, "timesteps", false);
  const at::Tensor ps = per_sample_index_cpu(args.prev_timesteps, batch, T, "prev_timesteps", allow_final);
  const std::vector<acc_t> table = cpu::schedule_values<acc_t>(args.alphas_cumprod);
  const int64_t* t = ts.data_ptr<int64_t>();
  const int64_t* p = ps.data_ptr<int64_t>();
  std::vector<decltype(make(acc_t(), acc_t(), acc_t()))> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t tb = t[per_sample_index(ts.numel(), b)];
    const acc_t prev =
        alpha_bar_prev(table.data(), p[per_sample_index(ps.numel(), b)], static_cast<acc_t>(final_alpha_cumprod));
    out[b] = make(table[tb], prev, static_cast<acc_t>(tb));
  }
  return out;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// The per-sample clamp of x0, with x0 as the sampling steps evaluate it (x0_from with the step
// coefficients' a and s). Thresholding: s = clamp(quantile(|x0|, ratio), 1, sample_max_value) over
// the sample's elements, with torch.quantile's linear interpolation (rank = ratio·(n - 1) in acc_t,
// as torch computes it in the quantile's dtype) and its NaN rule (any NaN: s = NaN), one
// std::nth_element per sample, samples in parallel.
template <PredictionType kType, typename scalar_t, typename Coefficients, typename acc_t = at::opmath_type<scalar_t>>
std::vector<X0Clamp<acc_t>> x0_clamps(const X0Options& o, const StepInputs& in,
                                      const std::vector<Coefficients>& coeff) {
  const int64_t batch = in.batch, per_sample = in.per_sample;
  std::vector<X0Clamp<acc_t>> out(batch, X0Clamp<acc_t>{o.kind, static_cast<acc_t>(o.clip_sample_range)});
  if (o.kind != X0Limit::Threshold || per_sample == 0) return out;
  const QuantileRank<acc_t> rank = quantile_rank<acc_t>(o.dynamic_thresholding_ratio, per_sample);
  const int64_t below = rank.below, above = rank.above;
  const acc_t max_value = static_cast<acc_t>(o.sample_max_value);
  const scalar_t* mp = in.m.const_data_ptr<scalar_t>();
  const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> values(per_sample);
    for (int64_t b = b0; b < b1; ++b) {
      bool has_nan = false;
      for (int64_t i = 0; i < per_sample; ++i) {
        const int64_t k = b * per_sample + i;
        const acc_t v = std::abs(x0_from(acc(xp[k]), acc(mp[k]), coeff[b].a, coeff[b].s, kType));
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

// The guided step is a DDIM step with eta = 0 (its x_prev in float64: SolverStep); the backward also needs x0
// and ε as linear maps.
template <typename acc_t>
struct GuidedCoefficients {
  DdimCoefficients<acc_t> step;
  SolverStep prev;
  Linear<acc_t> x0, eps;
};

template <typename acc_t>
std::vector<GuidedCoefficients<acc_t>> guided_coefficients(const ops::GuidedArgs& args, int64_t batch) {
  const auto make = [&](acc_t alpha_bar, acc_t alpha_bar_prev, acc_t) {
    return GuidedCoefficients<acc_t>{ddim_coefficients(alpha_bar, alpha_bar_prev, acc_t(0)), SolverStep(alpha_bar_prev),
                                     x0_coefficients(alpha_bar, args.type), eps_coefficients(alpha_bar, args.type)};
  };
  return step_coefficients<acc_t>(args, batch, 1.0, false, make);
}

// The backend of ops/solver.h.
struct CpuBackend {
  struct DeviceGuard {  // CPU tensors need none
    explicit DeviceGuard(c10::Device) {}
  };

  static void guided_ddim_step(const at::Tensor& mc, const at::Tensor& mu, const at::Tensor& x, at::Tensor& x_prev,
                               at::Tensor& pred_x0, const ops::GuidedArgs& args) {
    const int64_t n = x.numel(), batch = batch_size(x), per_sample = batch ? n / batch : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rglcd_fast_guided_ddim_step", [&] {
      using acc_t = guided_acc_t<scalar_t>;
      const auto coeff = guided_coefficients<acc_t>(args, batch);
      const auto w = guidance_values<acc_t>(args.guidance_scale, batch);
      const scalar_t* cp = mc.const_data_ptr<scalar_t>();
      const scalar_t* up = mu.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* pp = x_prev.mutable_data_ptr<scalar_t>();
      scalar_t* op = pred_x0.mutable_data_ptr<scalar_t>();
      with_prediction_type(args.type, [&](auto tag) {
        constexpr PredictionType kType = decltype(tag)::value;
        cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
          const DdimCoefficients<acc_t> c = coeff[b].step;
          const SolverStep step = coeff[b].prev;
          const acc_t wb = w[b];
          for (int64_t i = i0; i < i1; ++i) {
            const acc_t mc = acc(cp[i]), mu = acc(up[i]), xi = acc(xp[i]);
            const acc_t x0 = guided(x0_from(xi, mc, c.a, c.s, kType), x0_from(xi, mu, c.a, c.s, kType), wb);
            const acc_t eps = guided(eps_from(xi, mc, c.a, c.s, kType), eps_from(xi, mu, c.a, c.s, kType), wb);
            op[i] = static_cast<scalar_t>(x0);
            pp[i] = static_cast<scalar_t>(step(x0, eps));
          }
        });
      });
    });
  }

  static void guided_ddim_step_backward(const at::Tensor& like, const at::Tensor& gprev, const at::Tensor& gx0,
                                        at::Tensor& grad_c, at::Tensor& grad_u, at::Tensor& grad_x,
                                        const ops::GuidedArgs& args, std::array<bool, 3> mask) {
    const int64_t n = like.numel(), batch = batch_size(like), per_sample = batch ? n / batch : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "rglcd_fast_guided_ddim_step_bwd",
                                    [&] {
                                      using acc_t = guided_acc_t<scalar_t>;
                                      const auto coeff = guided_coefficients<acc_t>(args, batch);
                                      const auto w = guidance_values<acc_t>(args.guidance_scale, batch);
                                      const scalar_t* gp = gprev.defined() ? gprev.const_data_ptr<scalar_t>() : nullptr;
                                      const scalar_t* g0 = gx0.defined() ? gx0.const_data_ptr<scalar_t>() : nullptr;
                                      scalar_t* gc = mask[0] ? grad_c.mutable_data_ptr<scalar_t>() : nullptr;
                                      scalar_t* gu = mask[1] ? grad_u.mutable_data_ptr<scalar_t>() : nullptr;
                                      scalar_t* gx = mask[2] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
                                      cpu::parallel_sample_runs(n, per_sample, [&](int64_t b, int64_t i0, int64_t i1) {
                                        const GuidedCoefficients<acc_t> c = coeff[b];
                                        // x_prev's derivatives in x and in the guided output m
                                        const acc_t prev_cx = c.step.sqrt_prev * c.x0.cx() + c.step.c_dir * c.eps.cx();
                                        const acc_t prev_cm = c.step.sqrt_prev * c.x0.cm() + c.step.c_dir * c.eps.cm();
                                        const acc_t wc = acc_t(1) + w[b], wu = -w[b];
                                        for (int64_t i = i0; i < i1; ++i) {
                                          const acc_t a = gp ? acc(gp[i]) : acc_t(0), z = g0 ? acc(g0[i]) : acc_t(0);
                                          const acc_t gm = prev_cm * a + c.x0.cm() * z;
                                          if (gc) gc[i] = static_cast<scalar_t>(wc * gm);
                                          if (gu) gu[i] = static_cast<scalar_t>(wu * gm);
                                          if (gx) gx[i] = static_cast<scalar_t>(prev_cx * a + c.x0.cx() * z);
                                        }
                                      });
                                    });
  }

  static void lcm_step(const StepInputs& in, at::Tensor& prev, at::Tensor& denoised, const ops::SamplingArgs& args,
                       double timestep_scaling) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "rglcd_fast_lcm_step", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto make = [&](acc_t alpha_bar, acc_t alpha_bar_prev, acc_t t) {
        return lcm_coefficients(alpha_bar, alpha_bar_prev, t, acc_t(timestep_scaling), acc_t(kLcmSigmaData));
      };
      const auto coeff = step_coefficients<acc_t>(args, in.batch, args.final_alpha_cumprod, true, make);
      const scalar_t* mp = in.m.const_data_ptr<scalar_t>();
      const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
      const scalar_t* zp = in.z.defined() ? in.z.const_data_ptr<scalar_t>() : nullptr;
      scalar_t *pp = prev.mutable_data_ptr<scalar_t>(), *dp = denoised.mutable_data_ptr<scalar_t>();
      with_prediction_type(args.type, [&](auto tag) {
        constexpr PredictionType kType = decltype(tag)::value;
        const auto clamps = x0_clamps<kType, scalar_t>(args.options, in, coeff);
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
            zp != nullptr, args.options.kind != X0Limit::None);
      });
    });
  }

  // at::randn, then the step: bitwise torch.randn's draw by construction.
  static void lcm_step_drawing_noise(const StepInputs& in, at::Tensor& prev, at::Tensor& denoised,
                                     const ops::SamplingArgs& args, double timestep_scaling,
                                     const std::optional<at::Generator>& generator) {
    lcm_step(in.with_drawn_noise(generator), prev, denoised, args, timestep_scaling);
  }

  static void ddim_step(const StepInputs& in, at::Tensor& prev, at::Tensor& pred_x0, const ops::SamplingArgs& args,
                        double eta, bool use_clipped_model_output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "rglcd_fast_ddim_step", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto make = [&](acc_t alpha_bar, acc_t alpha_bar_prev, acc_t) {
        return ddim_coefficients(alpha_bar, alpha_bar_prev, acc_t(eta));
      };
      const auto coeff = step_coefficients<acc_t>(args, in.batch, args.final_alpha_cumprod, true, make);
      const scalar_t* mp = in.m.const_data_ptr<scalar_t>();
      const scalar_t* xp = in.x.const_data_ptr<scalar_t>();
      const scalar_t* zp = eta > 0 ? in.z.const_data_ptr<scalar_t>() : nullptr;  // noise is unused when eta <= 0
      scalar_t *pp = prev.mutable_data_ptr<scalar_t>(), *op = pred_x0.mutable_data_ptr<scalar_t>();
      with_prediction_type(args.type, [&](auto tag) {
        constexpr PredictionType kType = decltype(tag)::value;
        const auto clamps = x0_clamps<kType, scalar_t>(args.options, in, coeff);
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
            zp != nullptr, args.options.kind != X0Limit::None, use_clipped_model_output);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CPU, m) { ops::register_solver<CpuBackend>(m); }

}  // namespace rglcd_fast
