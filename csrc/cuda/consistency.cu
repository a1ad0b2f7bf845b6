// CUDA kernels of the consistency family (docs/design.md §2): boundary scalings, x0 / ε from a model
// output, the consistency output f(m, x, t), and the fused distillation loss, with backwards.
// One thread handles one 16-byte vector; per-sample coefficients are computed in the thread from
// timesteps[b] and the schedule (no extra launch, no host sync). The loss reduction is
// deterministic: fixed grid, block partials, then one ordered final pass. The ops around them
// (arguments, layouts, registration): csrc/ops/consistency.h.
#include <torch/library.h>

#include "common.h"
#include "cuda/kernel_utils.cuh"
#include "ops/consistency.h"

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
    mv.v[j] = static_cast<scalar_t>(c.grad_m(g));
    xv.v[j] = static_cast<scalar_t>(c.grad_x(g));
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

// r = grad_loss·ρ'(pred − target)/N, h = r + grad_pred: grad_m, grad_x of h through the map, grad_target = −r.
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
    gm.v[j] = static_cast<scalar_t>(k.grad_m(h));
    gx.v[j] = static_cast<scalar_t>(k.grad_x(h));
    gy.v[j] = static_cast<scalar_t>(-r);
  }
  if (grad_m) store(grad_m + i, gm);
  if (grad_x) store(grad_x + i, gx);
  if (grad_y) store(grad_y + i, gy);
}

template <typename scalar_t>
__global__ void boundary_scalings_kernel(const scalar_t* __restrict__ t, scalar_t* __restrict__ c_skip,
                                         scalar_t* __restrict__ c_out, int64_t n, scalar_t timestep_scaling,
                                         scalar_t sigma_data) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) boundary_scalings<scalar_t>(t[i], timestep_scaling, sigma_data, c_skip[i], c_out[i]);
}

// The backend of ops/consistency.h.
struct CudaBackend {
  using DeviceGuard = c10::cuda::CUDAGuard;

  static void boundary_scalings(const at::Tensor& t, at::Tensor& c_skip, at::Tensor& c_out, double timestep_scaling,
                                double sigma_data) {
    if (t.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "rglcd_fast_boundary_scalings_cuda", [&] {
      boundary_scalings_kernel<scalar_t><<<cuda::blocks_for(t.numel()), cuda::kThreads, 0, cuda::current_stream()>>>(
          t.const_data_ptr<scalar_t>(), c_skip.mutable_data_ptr<scalar_t>(), c_out.mutable_data_ptr<scalar_t>(),
          t.numel(), scalar_t(timestep_scaling), scalar_t(sigma_data));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  template <typename Map>
  static void linear_map(const at::Tensor& m, const at::Tensor& x, at::Tensor& out, const at::Tensor& timesteps,
                         const at::Tensor& alphas_cumprod, const Map& map) {
    const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
    if (n == 0) return;
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
  }

  template <typename Map>
  static void linear_map_backward(const at::Tensor& g, at::Tensor& grad_m, at::Tensor& grad_x,
                                  const at::Tensor& timesteps, const at::Tensor& alphas_cumprod, const Map& map,
                                  std::array<bool, 2> mask) {
    const int64_t n = g.numel(), batch = batch_size(g), per_sample = batch ? n / batch : 1;
    if (n == 0 || !(mask[0] || mask[1])) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "rglcd_fast_linear_map_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ScheduleTensors schedule(timesteps, alphas_cumprod, batch, c10::CppTypeToScalarType<acc_t>::value);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t *gm = pointer_or_null<scalar_t>(grad_m, mask[0]), *gx = pointer_or_null<scalar_t>(grad_x, mask[1]);
      with_vector_width<scalar_t>(per_sample, {gp, gm, gx}, [&](auto width) {
        constexpr int W = decltype(width)::value;
        linear_map_backward_kernel<scalar_t, W><<<cuda::blocks_for(n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
            gp, gm, gx, n, per_sample, schedule.view<acc_t>(), map);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static at::Tensor consistency_loss(const at::Tensor& m, const at::Tensor& x, const at::Tensor& y, at::Tensor& pred,
                                     const ops::LossArgs& args) {
    const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
    const auto loss_dtype = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor loss = at::empty({}, m.options().dtype(loss_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ScheduleTensors schedule(args.timesteps, args.alphas_cumprod, batch,
                                     c10::CppTypeToScalarType<acc_t>::value);
      const scalar_t *mp = m.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                     *yp = y.const_data_ptr<scalar_t>();
      scalar_t* pp = pred.mutable_data_ptr<scalar_t>();
      with_vector_width<scalar_t>(per_sample, {mp, xp, yp, pp}, [&](auto width) {
        constexpr int W = decltype(width)::value;
        const int blocks = static_cast<int>(std::min<int64_t>(cuda::kReduceBlocks, cuda::blocks_for(n / W)));
        at::Tensor partials = at::empty({blocks}, m.options().dtype(loss_dtype));
        const cudaStream_t stream = cuda::current_stream();
        loss_forward_kernel<scalar_t, W><<<blocks, cuda::kThreads, 0, stream>>>(
            mp, xp, yp, pp, partials.mutable_data_ptr<acc_t>(), n, per_sample, schedule.view<acc_t>(), args.map,
            args.kind, static_cast<acc_t>(args.huber_c));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        mean_of_partials_kernel<acc_t><<<1, cuda::kThreads, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks, n,
                                                                         loss.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return loss;
  }

  static void consistency_loss_backward(const at::Tensor& grad_loss, const at::Tensor& gpred, const at::Tensor& m,
                                        const at::Tensor& x, const at::Tensor& y, at::Tensor& grad_m,
                                        at::Tensor& grad_x, at::Tensor& grad_y, const ops::LossArgs& args,
                                        std::array<bool, 3> mask) {
    const int64_t n = m.numel(), batch = batch_size(m), per_sample = batch ? n / batch : 1;
    if (n == 0 || !(mask[0] || mask[1] || mask[2])) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, m.scalar_type(), "rglcd_fast_consistency_loss_bwd_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const ScheduleTensors schedule(args.timesteps, args.alphas_cumprod, batch,
                                         c10::CppTypeToScalarType<acc_t>::value);
          const at::Tensor g = grad_loss.to(c10::CppTypeToScalarType<acc_t>::value);
          const scalar_t *mp = m.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                         *yp = y.const_data_ptr<scalar_t>();
          const scalar_t* gpp = gpred.defined() ? gpred.const_data_ptr<scalar_t>() : nullptr;
          scalar_t *gm = pointer_or_null<scalar_t>(grad_m, mask[0]), *gx = pointer_or_null<scalar_t>(grad_x, mask[1]),
                   *gy = pointer_or_null<scalar_t>(grad_y, mask[2]);
          with_vector_width<scalar_t>(per_sample, {mp, xp, yp, gpp, gm, gx, gy}, [&](auto width) {
            constexpr int W = decltype(width)::value;
            loss_backward_kernel<scalar_t, W><<<cuda::blocks_for(n / W), cuda::kThreads, 0, cuda::current_stream()>>>(
                g.const_data_ptr<acc_t>(), gpp, mp, xp, yp, gm, gx, gy, n, per_sample, schedule.view<acc_t>(), args.map,
                args.kind, static_cast<acc_t>(args.huber_c));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rglcd_fast, CUDA, m) { ops::register_consistency<CudaBackend>(m); }

}  // namespace rglcd_fast
