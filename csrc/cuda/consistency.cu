// CUDA kernels of the consistency family (DESIGN.md §2): boundary scalings, x0 / ε from a model
// output, the consistency output f(m, x, t), and the fused distillation loss, with backwards.
// One thread handles one 16-byte vector; per-sample coefficients are computed in the thread from
// timesteps[b] and the schedule (no extra launch, no host sync). The loss reduction is
// deterministic: fixed grid, block partials, then one ordered final pass.
#include <torch/library.h>

#include "common.h"
#include "cuda/kernel_utils.cuh"

namespace rglcd_fast {
namespace {

template <typename scalar_t, int VEC, typename Map>
__global__ void linear_map_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ out, int64_t n, int64_t per_sample,
                                  SampleSchedule<at::opmath_type<scalar_t>> schedule, Map map) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const auto c = schedule.coefficients(map, i / per_sample);
  const auto mv = load<scalar_t, VEC>(m + i), xv = load<scalar_t, VEC>(x + i);
  Vec<scalar_t, VEC> ov;
#pragma unroll
  for (int j = 0; j < VEC; ++j) ov.v[j] = static_cast<scalar_t>(c(xv.v[j], mv.v[j]));
  store(out + i, ov);
}

template <typename scalar_t, int VEC, typename Map>
__global__ void linear_map_backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_m,
                                           scalar_t* __restrict__ grad_x, int64_t n, int64_t per_sample,
                                           SampleSchedule<at::opmath_type<scalar_t>> schedule, Map map) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const auto c = schedule.coefficients(map, i / per_sample);
  const auto gv = load<scalar_t, VEC>(grad + i);
  Vec<scalar_t, VEC> mv, xv;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t g = static_cast<acc_t>(gv.v[j]);
    mv.v[j] = static_cast<scalar_t>(c.cm * g);
    xv.v[j] = c.has_x ? static_cast<scalar_t>(c.cx * g) : scalar_t(0);
  }
  if (grad_m) store(grad_m + i, mv);
  if (grad_x) store(grad_x + i, xv);
}

template <typename scalar_t, int VEC, typename Map>
__global__ void loss_forward_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ y, scalar_t* __restrict__ pred,
                                    at::opmath_type<scalar_t>* __restrict__ partials, int64_t n, int64_t per_sample,
                                    SampleSchedule<at::opmath_type<scalar_t>> schedule, Map map, LossType kind,
                                    at::opmath_type<scalar_t> huber_c) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n; i += stride) {
    const auto k = schedule.coefficients(map, i / per_sample);
    const auto mv = load<scalar_t, VEC>(m + i), xv = load<scalar_t, VEC>(x + i), yv = load<scalar_t, VEC>(y + i);
    Vec<scalar_t, VEC> pv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = k(xv.v[j], mv.v[j]);
      pv.v[j] = static_cast<scalar_t>(v);
      sum += loss_value(v - static_cast<acc_t>(yv.v[j]), kind, huber_c);
    }
    store(pred + i, pv);
  }
  sum = cuda::block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// loss = (Σ partials) / n, summed in a fixed order by one block.
template <typename acc_t>
__global__ void mean_of_partials_kernel(const acc_t* __restrict__ partials, int count, int64_t n,
                                        acc_t* __restrict__ loss) {
  acc_t sum = 0;
  for (int k = threadIdx.x; k < count; k += blockDim.x) sum += partials[k];
  sum = cuda::block_sum(sum);
  if (threadIdx.x == 0) *loss = sum / static_cast<acc_t>(n);
}

// r = grad_loss·ρ'(pred − target)/N, h = r + grad_pred: grad_m = cm·h, grad_x = cx·h, grad_target = −r.
template <typename scalar_t, int VEC, typename Map>
__global__ void loss_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                     const scalar_t* __restrict__ grad_pred, const scalar_t* __restrict__ m,
                                     const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                     scalar_t* __restrict__ grad_m, scalar_t* __restrict__ grad_x,
                                     scalar_t* __restrict__ grad_y, int64_t n, int64_t per_sample,
                                     SampleSchedule<at::opmath_type<scalar_t>> schedule, Map map, LossType kind,
                                     at::opmath_type<scalar_t> huber_c) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const auto k = schedule.coefficients(map, i / per_sample);
  const acc_t scale = *grad_loss / static_cast<acc_t>(n);
  const auto mv = load<scalar_t, VEC>(m + i), xv = load<scalar_t, VEC>(x + i), yv = load<scalar_t, VEC>(y + i);
  Vec<scalar_t, VEC> gp;
  if (grad_pred) gp = load<scalar_t, VEC>(grad_pred + i);
  Vec<scalar_t, VEC> gm, gx, gy;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t r = scale * loss_derivative(k(xv.v[j], mv.v[j]) - static_cast<acc_t>(yv.v[j]), kind, huber_c);
    const acc_t h = grad_pred ? r + static_cast<acc_t>(gp.v[j]) : r;
    gm.v[j] = static_cast<scalar_t>(k.cm * h);
    gx.v[j] = static_cast<scalar_t>(k.cx * h);
    gy.v[j] = static_cast<scalar_t>(-r);
  }
  if (grad_m) store(grad_m + i, gm);
  if (grad_x) store(grad_x + i, gx);
  if (grad_y) store(grad_y + i, gy);
}

template <typename Map>
at::Tensor linear_map(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                      const at::Tensor& alphas_cumprod, const Map& map) {
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), "sample: expected shape ", model_output.sizes(),
                    ", got ", sample.sizes());
  const c10::cuda::CUDAGuard guard(model_output.device());
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample);
  at::Tensor out = layout.output();
  const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
  if (n == 0) return layout.deliver(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_linear_map_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ScheduleTensors schedule(timesteps, alphas_cumprod, batch, c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t *mp = m.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_vector_width<scalar_t>(per_sample, {mp, xp, op}, [&](auto width) {
      constexpr int W = decltype(width)::value;
      linear_map_kernel<scalar_t, W><<<cuda::blocks_for(n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
          mp, xp, op, n, per_sample, schedule.view<acc_t>(), map);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return layout.deliver(out);
}

template <typename Map>
std::tuple<at::Tensor, at::Tensor> linear_map_backward(const at::Tensor& grad, const at::Tensor& timesteps,
                                                       const at::Tensor& alphas_cumprod, const Map& map,
                                                       std::array<bool, 2> mask) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const Layout layout(grad);
  const at::Tensor g = layout.input(grad);
  at::Tensor grad_m = mask[0] ? layout.output() : unrequested(grad);
  at::Tensor grad_x = mask[1] ? layout.output() : unrequested(grad);
  const int64_t n = g.numel(), batch = batch_size(g), per_sample = batch ? n / batch : 1;
  if (n > 0 && (mask[0] || mask[1])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "rglcd_fast_linear_map_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ScheduleTensors schedule(timesteps, alphas_cumprod, batch, c10::CppTypeToScalarType<acc_t>::value);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t *gm = pointer_or_null<scalar_t>(grad_m, mask[0]), *gx = pointer_or_null<scalar_t>(grad_x, mask[1]);
      with_vector_width<scalar_t>(per_sample, {gp, gm, gx}, [&](auto width) {
        constexpr int W = decltype(width)::value;
        linear_map_backward_kernel<scalar_t, W><<<cuda::blocks_for(n / W), cuda::kThreads, 0,
                                                  cuda::current_stream()>>>(gp, gm, gx, n, per_sample,
                                                                            schedule.view<acc_t>(), map);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {mask[0] ? layout.deliver(grad_m) : grad_m, mask[1] ? layout.deliver(grad_x) : grad_x};
}

template <typename scalar_t>
__global__ void boundary_scalings_kernel(const scalar_t* __restrict__ t, scalar_t* __restrict__ c_skip,
                                         scalar_t* __restrict__ c_out, int64_t n, scalar_t timestep_scaling,
                                         scalar_t sigma_data) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) boundary_scalings<scalar_t>(t[i], timestep_scaling, sigma_data, c_skip[i], c_out[i]);
}

std::tuple<at::Tensor, at::Tensor> boundary_scalings_cuda(const at::Tensor& timesteps, double timestep_scaling,
                                                          double sigma_data) {
  const c10::cuda::CUDAGuard guard(timesteps.device());
  const auto dtype = timesteps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor t = timesteps.to(dtype).contiguous();
  at::Tensor c_skip = at::empty_like(t), c_out = at::empty_like(t);
  if (t.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "rglcd_fast_boundary_scalings_cuda", [&] {
      boundary_scalings_kernel<scalar_t><<<cuda::blocks_for(t.numel()), cuda::kThreads, 0, cuda::current_stream()>>>(
          t.const_data_ptr<scalar_t>(), c_skip.mutable_data_ptr<scalar_t>(), c_out.mutable_data_ptr<scalar_t>(),
          t.numel(), scalar_t(timestep_scaling), scalar_t(sigma_data));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {c_skip.view(timesteps.sizes()), c_out.view(timesteps.sizes())};
}

at::Tensor predicted_x0_cuda(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                             const at::Tensor& alphas_cumprod, c10::string_view prediction_type) {
  return linear_map(model_output, sample, timesteps, alphas_cumprod, X0Map{parse_prediction_type(prediction_type)});
}

std::tuple<at::Tensor, at::Tensor> predicted_x0_backward_cuda(const at::Tensor& grad, const at::Tensor& timesteps,
                                                              const at::Tensor& alphas_cumprod,
                                                              c10::string_view prediction_type,
                                                              std::array<bool, 2> mask) {
  return linear_map_backward(grad, timesteps, alphas_cumprod, X0Map{parse_prediction_type(prediction_type)}, mask);
}

at::Tensor predicted_eps_cuda(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& timesteps,
                              const at::Tensor& alphas_cumprod, c10::string_view prediction_type) {
  return linear_map(model_output, sample, timesteps, alphas_cumprod, EpsMap{parse_prediction_type(prediction_type)});
}

std::tuple<at::Tensor, at::Tensor> predicted_eps_backward_cuda(const at::Tensor& grad, const at::Tensor& timesteps,
                                                               const at::Tensor& alphas_cumprod,
                                                               c10::string_view prediction_type,
                                                               std::array<bool, 2> mask) {
  return linear_map_backward(grad, timesteps, alphas_cumprod, EpsMap{parse_prediction_type(prediction_type)}, mask);
}

at::Tensor consistency_output_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                   const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                                   c10::string_view prediction_type, double timestep_scaling, double sigma_data) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  return linear_map(model_output, sample, timesteps, alphas_cumprod, map);
}

std::tuple<at::Tensor, at::Tensor> consistency_output_backward_cuda(const at::Tensor& grad,
                                                                    const at::Tensor& timesteps,
                                                                    const at::Tensor& alphas_cumprod,
                                                                    c10::string_view prediction_type,
                                                                    double timestep_scaling, double sigma_data,
                                                                    std::array<bool, 2> mask) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  return linear_map_backward(grad, timesteps, alphas_cumprod, map, mask);
}

std::tuple<at::Tensor, at::Tensor> consistency_loss_cuda(const at::Tensor& model_output, const at::Tensor& sample,
                                                         const at::Tensor& timesteps, const at::Tensor& target,
                                                         const at::Tensor& alphas_cumprod,
                                                         c10::string_view prediction_type, c10::string_view loss_type,
                                                         double huber_c, double timestep_scaling, double sigma_data) {
  TORCH_CHECK_VALUE(model_output.sizes() == sample.sizes(), "sample: expected shape ", model_output.sizes(),
                    ", got ", sample.sizes());
  TORCH_CHECK_VALUE(model_output.sizes() == target.sizes(), "target: expected shape ", model_output.sizes(),
                    ", got ", target.sizes());
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  const LossType kind = parse_loss_type(loss_type);
  const c10::cuda::CUDAGuard guard(model_output.device());
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample), y = layout.input(target);
  at::Tensor pred = layout.output();
  const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
  const auto loss_dtype = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({}, m.options().dtype(loss_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ScheduleTensors schedule(timesteps, alphas_cumprod, batch, c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t *mp = m.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                   *yp = y.const_data_ptr<scalar_t>();
    scalar_t* pp = pred.mutable_data_ptr<scalar_t>();
    with_vector_width<scalar_t>(per_sample, {mp, xp, yp, pp}, [&](auto width) {
      constexpr int W = decltype(width)::value;
      const int blocks = static_cast<int>(std::min<int64_t>(cuda::kReduceBlocks, cuda::blocks_for(n / W)));
      at::Tensor partials = at::empty({blocks}, m.options().dtype(loss_dtype));
      const cudaStream_t stream = cuda::current_stream();
      loss_forward_kernel<scalar_t, W><<<blocks, cuda::kThreads, 0, stream>>>(
          mp, xp, yp, pp, partials.mutable_data_ptr<acc_t>(), n, per_sample, schedule.view<acc_t>(), map, kind,
          static_cast<acc_t>(huber_c));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mean_of_partials_kernel<acc_t><<<1, cuda::kThreads, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks, n,
                                                                       loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, layout.deliver(pred)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_loss_backward_cuda(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_model_pred, const at::Tensor& model_output,
    const at::Tensor& sample, const at::Tensor& timesteps, const at::Tensor& target, const at::Tensor& alphas_cumprod,
    c10::string_view prediction_type, c10::string_view loss_type, double huber_c, double timestep_scaling,
    double sigma_data, std::array<bool, 3> mask) {
  const ConsistencyMap map{parse_prediction_type(prediction_type), timestep_scaling, sigma_data};
  const LossType kind = parse_loss_type(loss_type);
  const c10::cuda::CUDAGuard guard(model_output.device());
  const Layout layout(model_output);
  const at::Tensor m = layout.input(model_output), x = layout.input(sample), y = layout.input(target);
  const bool has_gp = grad_model_pred.has_value() && grad_model_pred->defined();
  const at::Tensor gpred = has_gp ? layout.input(*grad_model_pred) : at::Tensor();
  at::Tensor grad_m = mask[0] ? layout.output() : unrequested(model_output);
  at::Tensor grad_x = mask[1] ? layout.output() : unrequested(model_output);
  at::Tensor grad_y = mask[2] ? layout.output() : unrequested(model_output);
  const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
  if (n > 0 && (mask[0] || mask[1] || mask[2])) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss_bwd_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ScheduleTensors schedule(timesteps, alphas_cumprod, batch, c10::CppTypeToScalarType<acc_t>::value);
      const at::Tensor g = grad_loss.to(c10::CppTypeToScalarType<acc_t>::value);
      const scalar_t *mp = m.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                     *yp = y.const_data_ptr<scalar_t>();
      const scalar_t* gpp = has_gp ? gpred.const_data_ptr<scalar_t>() : nullptr;
      scalar_t *gm = pointer_or_null<scalar_t>(grad_m, mask[0]), *gx = pointer_or_null<scalar_t>(grad_x, mask[1]),
               *gy = pointer_or_null<scalar_t>(grad_y, mask[2]);
      with_vector_width<scalar_t>(per_sample, {mp, xp, yp, gpp, gm, gx, gy}, [&](auto width) {
        constexpr int W = decltype(width)::value;
        loss_backward_kernel<scalar_t, W><<<cuda::blocks_for(n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
            g.const_data_ptr<acc_t>(), gpp, mp, xp, yp, gm, gx, gy, n, per_sample, schedule.view<acc_t>(), map, kind,
            static_cast<acc_t>(huber_c));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {mask[0] ? layout.deliver(grad_m) : grad_m, mask[1] ? layout.deliver(grad_x) : grad_x,
          mask[2] ? layout.deliver(grad_y) : grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CUDA, m) {
  m.impl("boundary_scalings", &boundary_scalings_cuda);
  m.impl("predicted_x0", &predicted_x0_cuda);
  m.impl("predicted_x0_backward", &predicted_x0_backward_cuda);
  m.impl("predicted_eps", &predicted_eps_cuda);
  m.impl("predicted_eps_backward", &predicted_eps_backward_cuda);
  m.impl("consistency_output", &consistency_output_cuda);
  m.impl("consistency_output_backward", &consistency_output_backward_cuda);
  m.impl("consistency_loss", &consistency_loss_cuda);
  m.impl("consistency_loss_backward", &consistency_loss_backward_cuda);
}

}  // namespace rglcd_fast
