// CUDA kernels of the solver family (docs/design.md §2): the teacher's guided DDIM solver step of LCD
// training (with backward), and the LCM and DDIM sampling steps with diffusers' step() semantics
// (clip / dynamic thresholding, final_alpha_cumprod, eta and noise), forward only. Same semantics as
// csrc/cpu/solver.cpp, except that an out-of-range timestep gives NaN for its sample instead of a
// ValueError (raising would need a host sync).
//
// One thread handles one 16-byte vector and computes its sample's step coefficients from
// timesteps[b], prev_timesteps[b] (and guidance_scale[b]) and the schedule: each step reads its
// inputs once and writes both outputs in the same pass. Dynamic thresholding needs the per-sample
// quantile of |x0| first, which stays on the device: one kernel writes |x0| (acc_t, in diffusers'
// operation order as the step kernel evaluates it) into a [B, per_sample] buffer, at::sort orders each
// row (asynchronous, and NaN sorts last, as torch.quantile relies on), a one-thread-per-sample kernel
// takes torch.quantile's rank / lerp and the clamp to [1, sample_max_value], and the step kernel reads
// the resulting s[b]. No op reads device memory on the host, so every op is CUDA-graph capturable.
// The LCM step can also draw its own noise in the same pass, bit for bit as torch.randn draws it (the
// generator's Philox state handles capture as torch's own draw does).
// The ops around the kernels (arguments, layouts, registration): csrc/ops/solver.h.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/native/cuda/DistributionTemplates.h>
#include <torch/library.h>

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <limits>
#include <mutex>

#include "common.h"
#include "cuda/kernel_utils.cuh"
#include "ops/solver.h"

namespace rglcd_fast {
namespace {

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> acc(scalar_t v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}

__device__ __forceinline__ int64_t flat_index(int vec) {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * vec;
}

// ᾱ_t, ᾱ_prev and t of one sample. A negative prev_timestep means the final step (ᾱ_prev =
// final_alpha_cumprod) where allowed; any other value outside the schedule gives NaN.
template <typename acc_t>
struct StepValues {
  acc_t alpha_bar, alpha_bar_prev, t;
};

template <typename acc_t>
struct StepSchedule {
  SampleSchedule<acc_t> current;  // timesteps and the ᾱ table
  const int64_t* prev_timesteps;
  int64_t prev_numel;
  acc_t final_alpha_cumprod;
  bool allow_final;

  __device__ __forceinline__ StepValues<acc_t> sample(int64_t b) const {
    const int64_t t = current.timestep(b);
    const int64_t p = prev_timesteps[per_sample_index(prev_numel, b)];
    const acc_t prev = (allow_final && p < 0) ? final_alpha_cumprod : current.alpha_bar(p);
    return {current.alpha_bar(t), prev, static_cast<acc_t>(t)};
  }
};

// Owns the index and schedule tensors behind a StepSchedule (checked for count and device only).
struct StepScheduleTensors {
  ScheduleTensors current;
  at::Tensor prev;

  StepScheduleTensors(const ops::ScheduleArgs& args, int64_t batch, at::ScalarType acc_type)
      : current(args.timesteps, args.alphas_cumprod, batch, acc_type),
        prev(per_sample_index_cuda(args.prev_timesteps, batch, "prev_timesteps")) {}

  template <typename acc_t>
  StepSchedule<acc_t> view(double final_alpha_cumprod, bool allow_final) const {
    return {current.view<acc_t>(), prev.const_data_ptr<int64_t>(), prev.numel(),
            static_cast<acc_t>(final_alpha_cumprod), allow_final};
  }
};

// A per-sample value ([B] or one) read in the kernel.
template <typename acc_t>
struct PerSample {
  const acc_t* values;
  int64_t numel;
  __device__ __forceinline__ acc_t operator[](int64_t b) const { return values[per_sample_index(numel, b)]; }
};

// ---- guided DDIM solver step (LCD training, the teacher's side) ---------------------------------

// The guided step's per-sample inputs on the device: the step schedule and the guidance scales.
struct GuidedTensors {
  StepScheduleTensors schedule;
  at::Tensor guidance_scale;

  GuidedTensors(const ops::GuidedArgs& args, int64_t batch, at::ScalarType acc_type)
      : schedule(args, batch, acc_type),
        guidance_scale(per_sample_values(args.guidance_scale, batch, acc_type, "guidance_scale")) {}

  template <typename acc_t>
  StepSchedule<acc_t> schedule_view() const {
    return schedule.view<acc_t>(1.0, false);
  }
  template <typename acc_t>
  PerSample<acc_t> guidance() const {
    return {guidance_scale.const_data_ptr<acc_t>(), guidance_scale.numel()};
  }
};

// As the LCD script: x0 = x0_c + w (x0_c - x0_u), ε = ε_c + w (ε_c - ε_u) (x0 and ε of the cond / uncond outputs);
// x_prev = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) ε in float64 (SolverStep).
template <typename scalar_t, int VEC, PredictionType kType>
__global__ void guided_ddim_step_kernel(const scalar_t* __restrict__ cond, const scalar_t* __restrict__ uncond,
                                        const scalar_t* __restrict__ x, scalar_t* __restrict__ x_prev,
                                        scalar_t* __restrict__ pred_x0, int64_t n, int64_t per_sample,
                                        StepSchedule<guided_acc_t<scalar_t>> schedule,
                                        PerSample<guided_acc_t<scalar_t>> guidance) {
  using acc_t = guided_acc_t<scalar_t>;
  const int64_t i = flat_index(VEC);
  if (i >= n) return;
  const int64_t b = i / per_sample;
  const StepValues<acc_t> s = schedule.sample(b);
  const DdimCoefficients<acc_t> c = ddim_coefficients(s.alpha_bar, s.alpha_bar_prev, acc_t(0));
  const SolverStep step(s.alpha_bar_prev);
  const acc_t w = guidance[b];
  const auto cv = load<scalar_t, VEC>(cond + i), uv = load<scalar_t, VEC>(uncond + i), xv = load<scalar_t, VEC>(x + i);
  Vec<scalar_t, VEC> pv, ov;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t mc = acc(cv.v[j]), mu = acc(uv.v[j]), xj = acc(xv.v[j]);
    const acc_t x0 = guided(x0_from(xj, mc, c.a, c.s, kType), x0_from(xj, mu, c.a, c.s, kType), w);
    const acc_t eps = guided(eps_from(xj, mc, c.a, c.s, kType), eps_from(xj, mu, c.a, c.s, kType), w);
    ov.v[j] = static_cast<scalar_t>(x0);
    pv.v[j] = static_cast<scalar_t>(step(x0, eps));
  }
  store(x_prev + i, pv);
  store(pred_x0 + i, ov);
}

// Linear backward: with g_m = (sqrt_prev·x0.cm + c_dir·ε.cm)·g_prev + x0.cm·g_x0,
// grad_cond = (1 + w)·g_m, grad_uncond = -w·g_m, grad_sample = (sqrt_prev·x0.cx + c_dir·ε.cx)·g_prev + x0.cx·g_x0.
// A missing upstream gradient counts as zero; an unrequested output pointer is null.
template <typename scalar_t, int VEC>
__global__ void guided_ddim_step_backward_kernel(const scalar_t* __restrict__ grad_prev,
                                                 const scalar_t* __restrict__ grad_x0, scalar_t* __restrict__ grad_c,
                                                 scalar_t* __restrict__ grad_u, scalar_t* __restrict__ grad_x,
                                                 int64_t n, int64_t per_sample,
                                                 StepSchedule<guided_acc_t<scalar_t>> schedule,
                                                 PerSample<guided_acc_t<scalar_t>> guidance, PredictionType type) {
  using acc_t = guided_acc_t<scalar_t>;
  const int64_t i = flat_index(VEC);
  if (i >= n) return;
  const int64_t b = i / per_sample;
  const StepValues<acc_t> s = schedule.sample(b);
  const DdimCoefficients<acc_t> c = ddim_coefficients(s.alpha_bar, s.alpha_bar_prev, acc_t(0));
  const Linear<acc_t> x0 = x0_coefficients(s.alpha_bar, type), eps = eps_coefficients(s.alpha_bar, type);
  // x_prev's derivatives in x and in the guided output m
  const acc_t prev_cx = c.sqrt_prev * x0.cx() + c.c_dir * eps.cx(),
              prev_cm = c.sqrt_prev * x0.cm() + c.c_dir * eps.cm();
  const acc_t w = guidance[b], wc = acc_t(1) + w, wu = -w;
  Vec<scalar_t, VEC> gpv, g0v;
  if (grad_prev) gpv = load<scalar_t, VEC>(grad_prev + i);
  if (grad_x0) g0v = load<scalar_t, VEC>(grad_x0 + i);
  Vec<scalar_t, VEC> gcv, guv, gxv;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t a = grad_prev ? acc(gpv.v[j]) : acc_t(0), z = grad_x0 ? acc(g0v.v[j]) : acc_t(0);
    const acc_t gm = prev_cm * a + x0.cm() * z;
    gcv.v[j] = static_cast<scalar_t>(wc * gm);
    guv.v[j] = static_cast<scalar_t>(wu * gm);
    gxv.v[j] = static_cast<scalar_t>(prev_cx * a + x0.cx() * z);
  }
  if (grad_c) store(grad_c + i, gcv);
  if (grad_u) store(grad_u + i, guv);
  if (grad_x) store(grad_x + i, gxv);
}

// ---- sampling steps (inference) -----------------------------------------------------------------

// The per-sample clamp of x0: the clip range, or the threshold s[b] computed on the device.
template <typename acc_t>
struct X0Limits {
  X0Limit kind;
  acc_t clip_sample_range;
  const acc_t* thresholds;  // [B] when thresholding, else null

  __device__ __forceinline__ X0Clamp<acc_t> clamp(int64_t b) const {
    return {kind, thresholds ? thresholds[b] : clip_sample_range};
  }
};

// |x0| of every element, as the step kernels evaluate x0 (x0_from: diffusers' operation order).
template <typename scalar_t, int VEC, PredictionType kType>
__global__ void abs_x0_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ x,
                              at::opmath_type<scalar_t>* __restrict__ out, int64_t n, int64_t per_sample,
                              SampleSchedule<at::opmath_type<scalar_t>> schedule) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = flat_index(VEC);
  if (i >= n) return;
  const acc_t alpha_bar = schedule.alpha_bar(schedule.timestep(i / per_sample));
  const acc_t a = std::sqrt(alpha_bar), s = std::sqrt(acc_t(1) - alpha_bar);
  const auto mv = load<scalar_t, VEC>(m + i), xv = load<scalar_t, VEC>(x + i);
  Vec<acc_t, VEC> ov;
#pragma unroll
  for (int j = 0; j < VEC; ++j) ov.v[j] = std::abs(x0_from(acc(xv.v[j]), acc(mv.v[j]), a, s, kType));
  store(out + i, ov);
}

// s[b] = clamp(quantile(|x0|, ratio), 1, sample_max_value) from each sample's sorted |x0| (NaN last:
// any NaN makes the quantile NaN, as torch.quantile).
template <typename acc_t>
__global__ void thresholds_kernel(const acc_t* __restrict__ sorted, acc_t* __restrict__ thresholds, int64_t batch,
                                  int64_t per_sample, QuantileRank<acc_t> rank, acc_t sample_max_value) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const acc_t* row = sorted + b * per_sample;
  const acc_t last = row[per_sample - 1];
  const acc_t q = last != last ? last : lerp(row[rank.below], row[rank.above], rank.weight);
  thresholds[b] = threshold_from_quantile(q, sample_max_value);
}

// The device-side thresholds s[b] of dynamic thresholding (an acc_t tensor [B]); undefined when the
// options do not threshold.
template <typename scalar_t, PredictionType kType>
at::Tensor device_thresholds(const StepInputs& in, const X0Options& options, const ScheduleTensors& schedule) {
  using acc_t = at::opmath_type<scalar_t>;
  if (options.kind != X0Limit::Threshold || in.n == 0) return at::Tensor();
  const auto acc_options = in.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor values = at::empty({in.batch, in.per_sample}, acc_options);
  const scalar_t *mp = in.m.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>();
  acc_t* vp = values.mutable_data_ptr<acc_t>();
  const cudaStream_t stream = cuda::current_stream();
  with_vector_width<scalar_t>(in.per_sample, {mp, xp, vp}, [&](auto width) {
    constexpr int W = decltype(width)::value;
    abs_x0_kernel<scalar_t, W, kType><<<cuda::blocks_for(in.n / W), cuda::kThreads, 0, stream>>>(
        mp, xp, vp, in.n, in.per_sample, schedule.view<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor sorted = std::get<0>(at::sort(values, /*dim=*/1));
  at::Tensor thresholds = at::empty({in.batch}, acc_options);
  thresholds_kernel<acc_t><<<cuda::blocks_for(in.batch), cuda::kThreads, 0, stream>>>(
      sorted.const_data_ptr<acc_t>(), thresholds.mutable_data_ptr<acc_t>(), in.batch, in.per_sample,
      quantile_rank<acc_t>(options.dynamic_thresholding_ratio, in.per_sample),
      static_cast<acc_t>(options.sample_max_value));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return thresholds;
}

template <typename acc_t>
X0Limits<acc_t> x0_limits(const X0Options& options, const at::Tensor& thresholds) {
  return {options.kind, static_cast<acc_t>(options.clip_sample_range),
          thresholds.defined() ? thresholds.const_data_ptr<acc_t>() : nullptr};
}

// One sample of an LCM step (diffusers LCMScheduler.step): its coefficients and x0 clamp.
template <typename acc_t>
struct alignas(16) LcmSample {
  LcmCoefficients<acc_t> c;
  X0Clamp<acc_t> limit;
};

template <typename acc_t>
__device__ __forceinline__ LcmSample<acc_t> lcm_sample(const StepSchedule<acc_t>& schedule,
                                                       const X0Limits<acc_t>& limits, acc_t timestep_scaling,
                                                       int64_t b) {
  const StepValues<acc_t> s = schedule.sample(b);
  return {lcm_coefficients(s.alpha_bar, s.alpha_bar_prev, s.t, timestep_scaling, acc_t(kLcmSigmaData)),
          limits.clamp(b)};
}

// One element: denoised = c_out·clamp(x0) + c_skip·x, and prev = sqrt(ᾱ_prev)·denoised + sqrt(1 - ᾱ_prev)·z.
template <PredictionType kType, typename acc_t>
__device__ __forceinline__ acc_t lcm_denoised(acc_t x, acc_t m, const LcmSample<acc_t>& s) {
  return s.c.c_out * s.limit(x0_from(x, m, s.c.a, s.c.s, kType)) + s.c.c_skip * x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t lcm_prev(acc_t denoised, acc_t z, const LcmSample<acc_t>& s) {
  return s.c.sqrt_prev * denoised + s.c.sigma_prev * z;
}

// diffusers LCMScheduler.step: x0, clip / threshold, denoised = c_out·x0 + c_skip·x, and
// prev = sqrt(ᾱ_prev)·denoised + sqrt(1 - ᾱ_prev)·noise, or prev = denoised without noise (last step).
template <typename scalar_t, int VEC, PredictionType kType>
__global__ void lcm_step_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ noise, scalar_t* __restrict__ prev,
                                scalar_t* __restrict__ denoised, int64_t n, int64_t per_sample,
                                StepSchedule<at::opmath_type<scalar_t>> schedule,
                                at::opmath_type<scalar_t> timestep_scaling,
                                X0Limits<at::opmath_type<scalar_t>> limits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = flat_index(VEC);
  if (i >= n) return;
  const LcmSample<acc_t> s = lcm_sample(schedule, limits, timestep_scaling, i / per_sample);
  const auto mv = load<scalar_t, VEC>(m + i), xv = load<scalar_t, VEC>(x + i);
  Vec<scalar_t, VEC> zv;
  if (noise) zv = load<scalar_t, VEC>(noise + i);
  Vec<scalar_t, VEC> pv, dv;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t d = lcm_denoised<kType>(acc(xv.v[j]), acc(mv.v[j]), s);
    dv.v[j] = static_cast<scalar_t>(d);
    pv.v[j] = static_cast<scalar_t>(noise ? lcm_prev(d, acc(zv.v[j]), s) : d);
  }
  store(prev + i, pv);
  store(denoised + i, dv);
}

// torch's CUDA normal draw (ATen/native/cuda/DistributionTemplates.h, normal_and_transform): one
// curand_normal4 (float, for float / half / bfloat16) or curand_normal2_double (double) call gives
// kUnroll values.
template <typename acc_t>
struct NormalDraw;
template <>
struct NormalDraw<float> {
  static constexpr int kUnroll = 4;
  static __device__ __forceinline__ float4 next(curandStatePhilox4_32_10_t* state) { return curand_normal4(state); }
};
template <>
struct NormalDraw<double> {
  static constexpr int kUnroll = 2;
  static __device__ __forceinline__ double2 next(curandStatePhilox4_32_10_t* state) {
    return curand_normal2_double(state);
  }
};

// lcm_step_kernel with the noise drawn in the same pass, bit for bit as torch.randn(sample.shape)
// draws it (distribution_elementwise_grid_stride_kernel with normal_kernel's transform, launched with
// calc_execution_policy's grid): thread idx seeds Philox with subsequence idx at the generator's
// offset, and its k-th call gives element idx + stride·(kUnroll·k + j) the j-th value, normal(v, 0, 1)
// rounded to scalar_t as the noise tensor would hold it. A thread's elements lie a grid apart (in
// different samples), so each block first writes every sample's coefficients into shared memory.
// calc_execution_policy sizes the grid for 2048 resident threads per SM: the launch bounds keep the
// float types to 32 registers so that it runs in one wave.
template <typename scalar_t, PredictionType kType>
C10_LAUNCH_BOUNDS_2(at::native::block_size_bound, sizeof(scalar_t) == 8 ? 4 : 8)
__global__ void lcm_step_draw_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ x,
                                     scalar_t* __restrict__ prev, scalar_t* __restrict__ denoised, int64_t n,
                                     at::cuda::detail::IntDivider<uint32_t> sample_of, int64_t batch,
                                     StepSchedule<at::opmath_type<scalar_t>> schedule,
                                     at::opmath_type<scalar_t> timestep_scaling,
                                     X0Limits<at::opmath_type<scalar_t>> limits, at::PhiloxCudaState philox) {
  using acc_t = at::opmath_type<scalar_t>;
  using Draw = NormalDraw<acc_t>;
  extern __shared__ __align__(16) unsigned char shared[];
  auto* samples = reinterpret_cast<LcmSample<acc_t>*>(shared);
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    samples[b] = lcm_sample(schedule, limits, timestep_scaling, b);
  }
  __syncthreads();

  const auto [seed, offset] = at::cuda::philox::unpack(philox);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  curandStatePhilox4_32_10_t state;
  curand_init(seed, idx, offset, &state);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t first = idx; first < n; first += stride * Draw::kUnroll) {
    const auto rand = Draw::next(&state);
#pragma unroll
    for (int j = 0; j < Draw::kUnroll; ++j) {
      const int64_t i = first + stride * j;
      if (i < n) {
        const scalar_t z = static_cast<scalar_t>(
            at::transformation::normal<acc_t>(static_cast<acc_t>((&rand.x)[j]), acc_t(0), acc_t(1)));
        const LcmSample<acc_t>& s = samples[sample_of.div(static_cast<uint32_t>(i))];
        const acc_t d = lcm_denoised<kType>(acc(x[i]), acc(m[i]), s);
        denoised[i] = static_cast<scalar_t>(d);
        prev[i] = static_cast<scalar_t>(lcm_prev(d, acc(z), s));
      }
    }
  }
}

// Where lcm_step_draw_kernel reproduces torch.randn: a non-empty step (an empty draw consumes nothing)
// in a contiguous working layout (the draw's element order), one launch of 32-bit indexing
// (TensorIterator::can_use_32bit_indexing of the noise tensor; else torch splits the draw), and every
// sample's coefficients within a block's default shared memory.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

template <typename scalar_t>
bool can_draw_in_step(const StepInputs& in) {
  constexpr int64_t max_index = std::numeric_limits<int32_t>::max();
  const int64_t shared_bytes = in.batch * static_cast<int64_t>(sizeof(LcmSample<at::opmath_type<scalar_t>>));
  return in.n > 0 && in.x.is_contiguous() && in.n <= max_index &&
         1 + (in.n - 1) * static_cast<int64_t>(sizeof(scalar_t)) <= max_index && shared_bytes <= kMaxSharedBytes;
}

// diffusers DDIMScheduler.step: x0 and ε, clip / threshold x0, ε re-derived from the clipped x0 when
// use_clipped_model_output, prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev - σ_t²)·ε (+ σ_t·noise when eta > 0;
// noise is null otherwise).
template <typename scalar_t, int VEC, PredictionType kType>
__global__ void ddim_step_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ noise, scalar_t* __restrict__ prev,
                                 scalar_t* __restrict__ pred_x0, int64_t n, int64_t per_sample,
                                 StepSchedule<at::opmath_type<scalar_t>> schedule, at::opmath_type<scalar_t> eta,
                                 X0Limits<at::opmath_type<scalar_t>> limits, bool use_clipped_model_output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = flat_index(VEC);
  if (i >= n) return;
  const int64_t b = i / per_sample;
  const StepValues<acc_t> s = schedule.sample(b);
  const DdimCoefficients<acc_t> c = ddim_coefficients(s.alpha_bar, s.alpha_bar_prev, eta);
  const X0Clamp<acc_t> limit = limits.clamp(b);
  const auto mv = load<scalar_t, VEC>(m + i), xv = load<scalar_t, VEC>(x + i);
  Vec<scalar_t, VEC> zv;
  if (noise) zv = load<scalar_t, VEC>(noise + i);
  Vec<scalar_t, VEC> pv, ov;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t xj = acc(xv.v[j]), mj = acc(mv.v[j]);
    const acc_t x0 = limit(x0_from(xj, mj, c.a, c.s, kType));
    // use_clipped_model_output: ε re-derived from the clipped x0, (x - a·x0) / s
    const acc_t eps = use_clipped_model_output ? eps_from(xj, x0, c.a, c.s, PredictionType::Sample)
                                               : eps_from(xj, mj, c.a, c.s, kType);
    const acc_t p = c.sqrt_prev * x0 + c.c_dir * eps;
    ov.v[j] = static_cast<scalar_t>(x0);
    pv.v[j] = static_cast<scalar_t>(noise ? p + c.std_dev * acc(zv.v[j]) : p);
  }
  store(prev + i, pv);
  store(pred_x0 + i, ov);
}

// The frame of a sampling step: the step schedule and, per prediction type, the x0 thresholds (when
// thresholding), then launch(kType tag, schedule, limits); an empty step launches nothing.
template <typename scalar_t, typename Launch>
void launch_sampling_step(const StepInputs& in, const ops::SamplingArgs& args, const Launch& launch) {
  using acc_t = at::opmath_type<scalar_t>;
  const StepScheduleTensors schedule(args, in.batch, c10::CppTypeToScalarType<acc_t>::value);
  if (in.n == 0) return;
  with_prediction_type(args.type, [&](auto tag) {
    constexpr PredictionType kType = decltype(tag)::value;
    const at::Tensor thresholds = device_thresholds<scalar_t, kType>(in, args.options, schedule.current);
    launch(tag, schedule.view<acc_t>(args.final_alpha_cumprod, true), x0_limits<acc_t>(args.options, thresholds));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The backend of ops/solver.h.
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;

  static void guided_ddim_step(const at::Tensor& mc, const at::Tensor& mu, const at::Tensor& x, at::Tensor& x_prev,
                               at::Tensor& pred_x0, const ops::GuidedArgs& args) {
    const int64_t n = x.numel(), batch = batch_size(x), per_sample = batch ? n / batch : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rglcd_fast_guided_ddim_step_cuda", [&] {
      using acc_t = guided_acc_t<scalar_t>;
      const GuidedTensors guided(args, batch, c10::CppTypeToScalarType<acc_t>::value);
      if (n == 0) return;
      const scalar_t *cp = mc.const_data_ptr<scalar_t>(), *up = mu.const_data_ptr<scalar_t>(),
                     *xp = x.const_data_ptr<scalar_t>();
      scalar_t *pp = x_prev.mutable_data_ptr<scalar_t>(), *op = pred_x0.mutable_data_ptr<scalar_t>();
      with_prediction_type(args.type, [&](auto tag) {
        constexpr PredictionType kType = decltype(tag)::value;
        with_vector_width<scalar_t>(per_sample, {cp, up, xp, pp, op}, [&](auto width) {
          constexpr int W = decltype(width)::value;
          guided_ddim_step_kernel<scalar_t, W, kType>
              <<<cuda::blocks_for(n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
                  cp, up, xp, pp, op, n, per_sample, guided.schedule_view<acc_t>(), guided.guidance<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }

  static void guided_ddim_step_backward(const at::Tensor& like, const at::Tensor& gprev, const at::Tensor& gx0,
                                        at::Tensor& grad_c, at::Tensor& grad_u, at::Tensor& grad_x,
                                        const ops::GuidedArgs& args, std::array<bool, 3> mask) {
    const int64_t n = like.numel(), batch = batch_size(like), per_sample = batch ? n / batch : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(),
                                    "rglcd_fast_guided_ddim_step_bwd_cuda", [&] {
                                      using acc_t = guided_acc_t<scalar_t>;
                                      const GuidedTensors guided(args, batch, c10::CppTypeToScalarType<acc_t>::value);
                                      if (n == 0 || !(mask[0] || mask[1] || mask[2])) return;
                                      const scalar_t* gp = gprev.defined() ? gprev.const_data_ptr<scalar_t>() : nullptr;
                                      const scalar_t* g0 = gx0.defined() ? gx0.const_data_ptr<scalar_t>() : nullptr;
                                      scalar_t* gc = pointer_or_null<scalar_t>(grad_c, mask[0]);
                                      scalar_t* gu = pointer_or_null<scalar_t>(grad_u, mask[1]);
                                      scalar_t* gx = pointer_or_null<scalar_t>(grad_x, mask[2]);
                                      with_vector_width<scalar_t>(per_sample, {gp, g0, gc, gu, gx}, [&](auto width) {
                                        constexpr int W = decltype(width)::value;
                                        guided_ddim_step_backward_kernel<scalar_t, W>
                                            <<<cuda::blocks_for(n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
                                                gp, g0, gc, gu, gx, n, per_sample, guided.schedule_view<acc_t>(),
                                                guided.guidance<acc_t>(), args.type);
                                        C10_CUDA_KERNEL_LAUNCH_CHECK();
                                      });
                                    });
  }

  static void lcm_step(const StepInputs& in, at::Tensor& prev, at::Tensor& denoised, const ops::SamplingArgs& args,
                       double timestep_scaling) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "rglcd_fast_lcm_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *mp = in.m.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>();
      const scalar_t* zp = in.z.defined() ? in.z.const_data_ptr<scalar_t>() : nullptr;
      scalar_t *pp = prev.mutable_data_ptr<scalar_t>(), *dp = denoised.mutable_data_ptr<scalar_t>();
      launch_sampling_step<scalar_t>(in, args, [&](auto tag, const auto& schedule, const auto& limits) {
        with_vector_width<scalar_t>(in.per_sample, {mp, xp, zp, pp, dp}, [&](auto width) {
          constexpr int W = decltype(width)::value;
          lcm_step_kernel<scalar_t, W, decltype(tag)::value>
              <<<cuda::blocks_for(in.n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
                  mp, xp, zp, pp, dp, in.n, in.per_sample, schedule, static_cast<acc_t>(timestep_scaling), limits);
        });
      });
    });
  }

  // The noise drawn in the step kernel where it can reproduce torch.randn's launch, else torch.randn's
  // own draw and the step. The Philox offset advances as torch.randn's (calc_execution_policy's
  // counter_offset through philox_cuda_state, which also handles graph capture).
  static void lcm_step_drawing_noise(const StepInputs& in, at::Tensor& prev, at::Tensor& denoised,
                                     const ops::SamplingArgs& args, double timestep_scaling,
                                     const std::optional<at::Generator>& generator) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "rglcd_fast_lcm_step_draw_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (!can_draw_in_step<scalar_t>(in)) {
        lcm_step(in.with_drawn_noise(generator), prev, denoised, args, timestep_scaling);
        return;
      }
      const scalar_t *mp = in.m.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>();
      scalar_t *pp = prev.mutable_data_ptr<scalar_t>(), *dp = denoised.mutable_data_ptr<scalar_t>();
      launch_sampling_step<scalar_t>(in, args, [&](auto tag, const auto& schedule, const auto& limits) {
        const auto [counter_offset, grid, block] = at::native::calc_execution_policy(in.n, NormalDraw<acc_t>::kUnroll);
        at::PhiloxCudaState philox;
        {  // as torch's distribution_nullary_kernel (Note [Acquire lock when using random generators])
          auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator,
                                                                          at::cuda::detail::getDefaultCUDAGenerator());
          std::lock_guard<std::mutex> lock(gen->mutex_);
          philox = gen->philox_cuda_state(counter_offset);
        }
        const size_t shared_bytes = in.batch * sizeof(LcmSample<acc_t>);
        lcm_step_draw_kernel<scalar_t, decltype(tag)::value><<<grid, block, shared_bytes, cuda::current_stream()>>>(
            mp, xp, pp, dp, in.n, at::cuda::detail::IntDivider<uint32_t>(static_cast<uint32_t>(in.per_sample)),
            in.batch, schedule, static_cast<acc_t>(timestep_scaling), limits, philox);
      });
    });
  }

  static void ddim_step(const StepInputs& in, at::Tensor& prev, at::Tensor& pred_x0, const ops::SamplingArgs& args,
                        double eta, bool use_clipped_model_output) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "rglcd_fast_ddim_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t *mp = in.m.const_data_ptr<scalar_t>(), *xp = in.x.const_data_ptr<scalar_t>();
      const scalar_t* zp = eta > 0 ? in.z.const_data_ptr<scalar_t>() : nullptr;  // noise is unused when eta <= 0
      scalar_t *pp = prev.mutable_data_ptr<scalar_t>(), *op = pred_x0.mutable_data_ptr<scalar_t>();
      launch_sampling_step<scalar_t>(in, args, [&](auto tag, const auto& schedule, const auto& limits) {
        with_vector_width<scalar_t>(in.per_sample, {mp, xp, zp, pp, op}, [&](auto width) {
          constexpr int W = decltype(width)::value;
          ddim_step_kernel<scalar_t, W, decltype(tag)::value>
              <<<cuda::blocks_for(in.n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
                  mp, xp, zp, pp, op, in.n, in.per_sample, schedule, static_cast<acc_t>(eta), limits,
                  use_clipped_model_output);
        });
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CUDA, m) { ops::register_solver<CudaBackend>(m); }

}  // namespace rglcd_fast
