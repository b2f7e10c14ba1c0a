// Argument checks and layout rules shared by the CPU and CUDA kernels of the adafisher ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

namespace adafisher {

// How the fused kernels may walk a parameter: the length of the innermost memory run of one row
// of its (rows, cols) view (``cols`` when row-major, ``C_in`` for channels_last conv weights),
// 1 for an elementwise walk when ``cols < 0`` (no factors), or −1 when the kernels must work on
// row-major copies (other layouts, or gradient/momentum laid out or typed unlike the parameter).
inline int64_t fused_inner(const at::Tensor& param, const at::Tensor& grad,
                           const at::Tensor& exp_avg, int64_t cols) {
  if (grad.scalar_type() != param.scalar_type() || exp_avg.scalar_type() != param.scalar_type())
    return -1;
  if (grad.strides() != param.strides() || exp_avg.strides() != param.strides()) return -1;
  if (cols < 0) return param.is_non_overlapping_and_dense() ? 1 : -1;
  if (param.is_contiguous()) return cols;
  if (param.dim() == 4 && param.is_contiguous(at::MemoryFormat::ChannelsLast))
    return param.size(1);
  if (param.dim() == 5 && param.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return param.size(1);
  return -1;
}

inline void check_step_arguments(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList steps,
                                 const at::Tensor& factors, const at::Tensor& blended,
                                 at::IntArrayRef layers, at::IntArrayRef h_offsets,
                                 at::IntArrayRef s_offsets, at::IntArrayRef rows) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && steps.size() == n &&
                  layers.size() == n && h_offsets.size() == n && s_offsets.size() == n &&
                  rows.size() == n,
              "adafisher::fused_step: every per-parameter list must have ", n, " entries");
  TORCH_CHECK(blended.scalar_type() == at::kBool, "adafisher::fused_step: blended must be bool");
  const int64_t n_layers = blended.numel() / 2;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(grads[i].sizes() == p.sizes() && exp_avgs[i].sizes() == p.sizes(),
                "adafisher::fused_step: parameter ", i, " has shape ", p.sizes(),
                " but its gradient or momentum has another");
    TORCH_CHECK(p.is_floating_point(), "adafisher::fused_step: parameters must be floating");
    TORCH_CHECK(steps[i].numel() == 1, "adafisher::fused_step: steps[", i, "] must be a scalar");
    if (layers[i] < 0) continue;
    TORCH_CHECK(layers[i] < n_layers, "adafisher::fused_step: layers[", i, "] = ", layers[i],
                " but blended holds ", n_layers, " layers");
    TORCH_CHECK(rows[i] > 0 && p.numel() % rows[i] == 0, "adafisher::fused_step: rows[", i,
                "] = ", rows[i], " does not divide the parameter's ", p.numel(), " elements");
    const int64_t cols = p.numel() / rows[i];
    TORCH_CHECK(s_offsets[i] >= 0 && s_offsets[i] + rows[i] <= factors.numel() &&
                    h_offsets[i] >= 0 && h_offsets[i] + cols <= factors.numel(),
                "adafisher::fused_step: factor offsets of parameter ", i,
                " lie outside the factor buffer");
  }
}

inline void check_factor_arguments(const at::Tensor& factors, const at::Tensor& pending,
                                   const at::Tensor& pending_count, const at::Tensor& blended,
                                   const at::Tensor& nonfinite,
                                   const at::Tensor& segment_offsets) {
  TORCH_CHECK(factors.is_contiguous() && pending.is_contiguous() &&
                  pending_count.is_contiguous() && blended.is_contiguous() &&
                  nonfinite.is_contiguous() && segment_offsets.is_contiguous(),
              "adafisher::update_factors: all buffers must be contiguous");
  TORCH_CHECK(factors.scalar_type() == at::kFloat || factors.scalar_type() == at::kDouble,
              "adafisher::update_factors: factors must be float32 or float64");
  TORCH_CHECK(pending.scalar_type() == factors.scalar_type() &&
                  pending_count.scalar_type() == factors.scalar_type(),
              "adafisher::update_factors: pending and pending_count must have factors' dtype");
  TORCH_CHECK(blended.scalar_type() == at::kBool && nonfinite.scalar_type() == at::kLong &&
                  segment_offsets.scalar_type() == at::kLong,
              "adafisher::update_factors: blended must be bool, nonfinite and segment_offsets "
              "int64");
  const int64_t n_segments = segment_offsets.numel() - 1;
  TORCH_CHECK(pending.numel() == factors.numel() && blended.numel() == n_segments &&
                  nonfinite.numel() == n_segments && 2 * pending_count.numel() == n_segments,
              "adafisher::update_factors: buffer sizes do not match ", n_segments, " segments");
}

}  // namespace adafisher
