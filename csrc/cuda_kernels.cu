// CUDA kernels of the adafisher ops (schemas and semantics: adafisher/ops.py).
//
// fused_step is multi-tensor-apply style: the addresses and per-parameter integers of up to
// kMaxTensors parameters and the block → (parameter, chunk) map travel as one kernel argument,
// so a step uploads no table. lr and the step counts are read on the device (1 − βᵗ computed
// there), so a captured CUDA graph replays with the current values.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "layout.h"

namespace adafisher {
namespace {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 256;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kStepThreads = 256;
constexpr int kFactorThreads = 256;

template <typename scalar_t>
struct StepArgs {  // 3.2 KB: under the 4 KB kernel-argument limit of every architecture
  scalar_t* p[kMaxTensors];
  const scalar_t* g[kMaxTensors];
  scalar_t* m[kMaxTensors];
  const float* step[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t layer[kMaxTensors];  // −1: F = 1
  int64_t cols[kMaxTensors];
  int64_t inner[kMaxTensors];
  int64_t h_offset[kMaxTensors];
  int64_t s_offset[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

template <typename scalar_t, typename factor_t>
__global__ void __launch_bounds__(kStepThreads)
fused_step_kernel(StepArgs<scalar_t> args, const factor_t* __restrict__ factors,
                  const bool* __restrict__ blended, const double* __restrict__ lr_ptr,
                  double beta, double damping, double weight_decay, bool decoupled,
                  bool maximize) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int t = args.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * kChunk;
  const int64_t numel = args.numel[t];
  const int64_t end = start + kChunk < numel ? start + kChunk : numel;

  const double lr = *lr_ptr;
  const double step = static_cast<double>(*args.step[t]);
  const opmath_t neg_step = static_cast<opmath_t>(-lr / (1.0 - pow(beta, step)));
  const opmath_t b = static_cast<opmath_t>(beta);
  const opmath_t one_minus_b = static_cast<opmath_t>(1.0 - beta);
  const bool use_l2 = weight_decay != 0 && !decoupled;
  const bool use_decay = weight_decay != 0 && decoupled;
  const opmath_t l2 = static_cast<opmath_t>(weight_decay);
  const opmath_t decay = static_cast<opmath_t>(1.0 - lr * weight_decay);

  const int64_t layer = args.layer[t];
  const bool has_f = layer >= 0 && blended[2 * layer] && blended[2 * layer + 1];
  const int64_t cols = args.cols[t];
  const int64_t inner = args.inner[t];
  const int64_t per_inner = inner > 0 ? cols / inner : 0;
  const factor_t* s = factors + args.s_offset[t];
  const factor_t* h = factors + args.h_offset[t];
  const factor_t damping_f = static_cast<factor_t>(damping);

  scalar_t* p = args.p[t];
  const scalar_t* g = args.g[t];
  scalar_t* m = args.m[t];
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    opmath_t pv = static_cast<opmath_t>(p[i]);
    opmath_t gv = static_cast<opmath_t>(g[i]);
    opmath_t mv = static_cast<opmath_t>(m[i]);
    if (maximize) gv = -gv;
    if (use_l2) gv = gv + l2 * pv;
    mv = mv * b + one_minus_b * gv;
    if (use_decay) pv = pv * decay;
    if (has_f) {
      const int64_t r = i / cols;
      const int64_t j = i - r * cols;
      const int64_t c = inner == cols ? j : (j % inner) * per_inner + j / inner;
      const factor_t f = s[r] * h[c] + damping_f;
      pv = pv + neg_step * mv / static_cast<opmath_t>(f);
    } else {
      pv = pv + neg_step * mv;
    }
    p[i] = static_cast<scalar_t>(pv);
    m[i] = static_cast<scalar_t>(mv);
  }
}

// One parameter as the kernel sees it (row-major copies for layouts it cannot walk).
struct StepItem {
  at::Tensor p, g, m, step;
  int64_t layer, cols, inner, h_offset, s_offset;
  at::Tensor p_orig, m_orig;  // defined when p / m are copies to write back
};

template <typename scalar_t, typename factor_t>
void launch_step(const std::vector<StepItem>& items, const factor_t* factors,
                 const bool* blended, const double* lr, double beta, double damping,
                 double weight_decay, bool decoupled, bool maximize) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  StepArgs<scalar_t> args;
  int n_tensors = 0, n_blocks = 0;
  auto flush = [&] {
    if (n_blocks > 0) {
      fused_step_kernel<scalar_t, factor_t><<<n_blocks, kStepThreads, 0, stream>>>(
          args, factors, blended, lr, beta, damping, weight_decay, decoupled, maximize);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    n_tensors = 0;
    n_blocks = 0;
  };
  for (const StepItem& item : items) {
    const int64_t numel = item.p.numel();
    if (numel == 0) continue;
    const int64_t n_chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      if (chunk == 0 || n_tensors == 0) {  // (re)enter this parameter's slot
        if (n_tensors == kMaxTensors) flush();
        const int t = n_tensors++;
        args.p[t] = item.p.mutable_data_ptr<scalar_t>();
        args.g[t] = item.g.const_data_ptr<scalar_t>();
        args.m[t] = item.m.mutable_data_ptr<scalar_t>();
        args.step[t] = item.step.const_data_ptr<float>();
        args.numel[t] = numel;
        args.layer[t] = item.layer;
        args.cols[t] = item.cols;
        args.inner[t] = item.inner;
        args.h_offset[t] = item.h_offset;
        args.s_offset[t] = item.s_offset;
      }
      args.block_tensor[n_blocks] = static_cast<unsigned char>(n_tensors - 1);
      args.block_chunk[n_blocks] = static_cast<int>(chunk);
      if (++n_blocks == kMaxBlocks) flush();
    }
  }
  flush();
}

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList steps, const at::Tensor& factors, const at::Tensor& blended,
                     at::IntArrayRef layers, at::IntArrayRef h_offsets, at::IntArrayRef s_offsets,
                     at::IntArrayRef rows, const at::Tensor& lr, double beta, double damping,
                     double weight_decay, bool decoupled, bool maximize) {
  check_step_arguments(params, grads, exp_avgs, steps, factors, blended, layers, h_offsets,
                       s_offsets, rows);
  if (params.empty()) return;
  const c10::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(factors.numel() == 0 || (factors.device() == device && factors.is_contiguous()),
              "adafisher::fused_step: factors must be a contiguous tensor on ", device);
  TORCH_CHECK(blended.numel() == 0 || (blended.device() == device && blended.is_contiguous()),
              "adafisher::fused_step: blended must be a contiguous tensor on ", device);
  const at::Tensor lr_device = lr.to(device, at::kDouble);  // no copy when it already is
  for (const at::Tensor& step : steps) {
    TORCH_CHECK(step.device() == device && step.scalar_type() == at::kFloat,
                "adafisher::fused_step: step counts must be float32 tensors on ", device);
  }
  at::_foreach_add_(steps, 1);  // one launch: the kernels read the new counts

  std::vector<std::vector<StepItem>> by_dtype(4);  // float, half, bfloat16, double
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.device() == device, "adafisher::fused_step: parameters on several devices");
    const bool tracked = layers[i] >= 0;
    const int64_t cols = tracked ? param.numel() / rows[i] : param.numel();
    StepItem item{param, grads[i], exp_avgs[i], steps[i], layers[i],
                  cols, 0, h_offsets[i], s_offsets[i], at::Tensor(), at::Tensor()};
    item.inner = fused_inner(param, grads[i], exp_avgs[i], tracked ? cols : -1);
    if (item.inner < 0) {
      item.p = param.contiguous();
      item.g = grads[i].to(param.scalar_type()).contiguous();
      item.m = exp_avgs[i].to(param.scalar_type()).contiguous();
      item.inner = cols;
      if (!item.p.is_same(param)) item.p_orig = param;
      if (!item.m.is_same(exp_avgs[i])) item.m_orig = exp_avgs[i];
    }
    switch (param.scalar_type()) {
      case at::kFloat: by_dtype[0].push_back(std::move(item)); break;
      case at::kHalf: by_dtype[1].push_back(std::move(item)); break;
      case at::kBFloat16: by_dtype[2].push_back(std::move(item)); break;
      case at::kDouble: by_dtype[3].push_back(std::move(item)); break;
      default: TORCH_CHECK(false, "adafisher::fused_step: unsupported dtype ", param.scalar_type());
    }
  }
  const bool* ready = blended.numel() ? blended.const_data_ptr<bool>() : nullptr;
  const double* lr_ptr = lr_device.const_data_ptr<double>();
  auto run = [&](auto factor_zero) {
    using factor_t = decltype(factor_zero);
    const factor_t* f = factors.numel() ? factors.const_data_ptr<factor_t>() : nullptr;
    launch_step<float, factor_t>(by_dtype[0], f, ready, lr_ptr, beta, damping, weight_decay,
                                 decoupled, maximize);
    launch_step<at::Half, factor_t>(by_dtype[1], f, ready, lr_ptr, beta, damping, weight_decay,
                                    decoupled, maximize);
    launch_step<at::BFloat16, factor_t>(by_dtype[2], f, ready, lr_ptr, beta, damping,
                                        weight_decay, decoupled, maximize);
    launch_step<double, factor_t>(by_dtype[3], f, ready, lr_ptr, beta, damping, weight_decay,
                                  decoupled, maximize);
  };
  if (factors.scalar_type() == at::kDouble) {
    run(double(0));
  } else {
    TORCH_CHECK(factors.numel() == 0 || factors.scalar_type() == at::kFloat,
                "adafisher::fused_step: factors must be float32 or float64");
    run(float(0));
  }
  for (const auto& items : by_dtype) {
    for (const StepItem& item : items) {
      if (item.p_orig.defined()) item.p_orig.copy_(item.p);
      if (item.m_orig.defined()) item.m_orig.copy_(item.m);
    }
  }
}

// One block per layer: its H segment, then its S segment (both read the layer's count, which
// the block clears last).
template <typename T>
__global__ void __launch_bounds__(kFactorThreads)
update_factors_kernel(T* __restrict__ factors, T* __restrict__ pending, T* __restrict__ count,
                      bool* __restrict__ blended, int64_t* __restrict__ nonfinite,
                      const int64_t* __restrict__ offsets, T keep, T fresh_weight, T eps) {
  __shared__ T shared_low[kFactorThreads];
  __shared__ T shared_high[kFactorThreads];
  __shared__ int shared_bad[kFactorThreads];
  const int64_t layer = blockIdx.x;
  const int tid = threadIdx.x;
  const T n = count[layer];
  for (int half = 0; half < 2; ++half) {
    const int64_t k = 2 * layer + half;
    const int64_t begin = offsets[k], end = offsets[k + 1];
    if (n > T(0)) {
      T low = INFINITY, high = -INFINITY;
      int bad = 0;
      for (int64_t i = begin + tid; i < end; i += kFactorThreads) {
        const T v = pending[i] / n;
        bad |= !isfinite(v);
        low = v < low ? v : low;
        high = v > high ? v : high;
      }
      shared_low[tid] = low;
      shared_high[tid] = high;
      shared_bad[tid] = bad;
      __syncthreads();
      for (int width = kFactorThreads / 2; width > 0; width /= 2) {
        if (tid < width) {
          const T other_low = shared_low[tid + width], other_high = shared_high[tid + width];
          shared_low[tid] = other_low < shared_low[tid] ? other_low : shared_low[tid];
          shared_high[tid] = other_high > shared_high[tid] ? other_high : shared_high[tid];
          shared_bad[tid] |= shared_bad[tid + width];
        }
        __syncthreads();
      }
      low = shared_low[0];
      high = shared_high[0];
      if (shared_bad[0]) {
        if (tid == 0) nonfinite[k] += 1;
      } else {
        const T range = high - low + eps;
        for (int64_t i = begin + tid; i < end; i += kFactorThreads) {
          factors[i] = factors[i] * keep + ((pending[i] / n - low) / range) * fresh_weight;
        }
        if (tid == 0) blended[k] = true;
      }
      __syncthreads();  // shared_* are reused by the S segment
    }
    for (int64_t i = begin + tid; i < end; i += kFactorThreads) pending[i] = T(0);
  }
  if (tid == 0) count[layer] = T(0);
}

void update_factors_cuda(const at::Tensor& factors, const at::Tensor& pending,
                         const at::Tensor& pending_count, const at::Tensor& blended,
                         const at::Tensor& nonfinite, const at::Tensor& segment_offsets,
                         double gamma_keep, double gamma_new, double eps) {
  check_factor_arguments(factors, pending, pending_count, blended, nonfinite, segment_offsets);
  const int64_t n_layers = pending_count.numel();
  if (n_layers == 0) return;
  const c10::cuda::CUDAGuard guard(factors.device());
  TORCH_CHECK(segment_offsets.device() == factors.device(),
              "adafisher::update_factors: segment_offsets must be on ", factors.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(factors.scalar_type(), "adafisher_update_factors", [&] {
    update_factors_kernel<scalar_t><<<n_layers, kFactorThreads, 0, stream>>>(
        factors.mutable_data_ptr<scalar_t>(), pending.mutable_data_ptr<scalar_t>(),
        pending_count.mutable_data_ptr<scalar_t>(), blended.mutable_data_ptr<bool>(),
        nonfinite.mutable_data_ptr<int64_t>(), segment_offsets.const_data_ptr<int64_t>(),
        static_cast<scalar_t>(gamma_keep), static_cast<scalar_t>(gamma_new),
        static_cast<scalar_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(adafisher, CUDA, m) {
  m.impl("fused_step", &fused_step_cuda);
  m.impl("update_factors", &update_factors_cuda);
}

}  // namespace adafisher
