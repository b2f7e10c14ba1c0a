// CPU kernels of the adafisher statistics ops (schemas and semantics: adafisher/statistic_ops.py).
// One read of each activation / output gradient, no squared temporaries, at::parallel_for.
// Sums in fp32 for fp16/bf16/fp32 inputs and in float64 for float64 ones.
// The innermost loops are the leaves of cpu_leaves.h (baseline and AVX2+FMA variants, one
// picked at runtime); this file plans the work (views, tasks, partial sums) around them.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_leaves.h"

namespace adafisher {
namespace {

constexpr int64_t kSerialElements = 1 << 15;  // below this a reduction runs on one thread
constexpr int64_t kColumnChunk = 2048;        // accumulators of one task stay in L1
constexpr int64_t kRowBlock = 1024;           // rows summed into one partial (bounds fp32 error)
constexpr int64_t kMinTasks = 8;              // tasks a large reduction is split into at least
constexpr int64_t kFoldLimit = 1 << 20;       // per-sample sums a channels_last reduction keeps

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// v · scale rounded once (the product in double): as close to v / n as a division.
template <typename acc_t>
inline acc_t scaled(acc_t v, double scale) {
  return static_cast<acc_t>(static_cast<double>(v) * scale);
}

at::ScalarType acc_scalar_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The element type the leaves (cpu_leaves.h) read for scalar_t: fp16/bf16 as their bits.
template <typename scalar_t>
struct LeafElement {
  using type = scalar_t;
};
template <>
struct LeafElement<c10::Half> {
  using type = F16Bits;
};
template <>
struct LeafElement<c10::BFloat16> {
  using type = Bf16Bits;
};
static_assert(sizeof(c10::Half) == sizeof(F16Bits) && sizeof(c10::BFloat16) == sizeof(Bf16Bits));

// The reduction leaves of the active ISA for f = square (kSquare) or identity.
template <bool kSquare, typename scalar_t>
const ReduceLeaves<typename LeafElement<scalar_t>::type, acc_type<scalar_t>>& reduce_leaves() {
  const StatisticLeaves& leaves = active_statistic_leaves();
  if constexpr (std::is_same_v<scalar_t, float>) {
    return leaves.f32[kSquare];
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return leaves.f64[kSquare];
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return leaves.bf16[kSquare];
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>);
    return leaves.f16[kSquare];
  }
}

// The patch_sums leaf of the active ISA.
template <typename acc_t>
PatchSumsLeaf<acc_t> patch_sums_leaf() {
  if constexpr (std::is_same_v<acc_t, double>) {
    return active_statistic_leaves().patch_sums_f64;
  } else {
    return active_statistic_leaves().patch_sums_f32;
  }
}

// A tensor seen as (A, C, R) with strides (sa, sc, sr): the reductions sum over a and r.
struct ChannelView {
  int64_t a, c, r, sa, sc, sr;
};

// Dims [begin, end) merged into one (size, stride); false when their strides do not allow it.
bool merge_dims(const at::Tensor& x, int64_t begin, int64_t end, int64_t& size,
                int64_t& stride) {
  size = 1;
  stride = 1;
  int64_t next = -1;  // the stride the next outer dim must have
  for (int64_t d = end - 1; d >= begin; --d) {
    const int64_t n = x.size(d);
    if (n == 1) continue;
    if (next < 0) {
      stride = x.stride(d);
    } else if (x.stride(d) != next && n != 0) {
      return false;
    }
    next = x.stride(d) * n;
    size *= n;
  }
  return true;
}

bool channel_view(const at::Tensor& x, int64_t c0, int64_t c1, ChannelView& v) {
  return merge_dims(x, 0, c0, v.a, v.sa) && merge_dims(x, c0, c1, v.c, v.sc) &&
         merge_dims(x, c1, x.dim(), v.r, v.sr);
}

// out[c] = Σ_{a,r} f(x[a·sa + c·sc + r·sr]), f = square or identity; out has v.c entries.
// Rows of C contiguous values (sc == 1: channels_last, Linear rows) are added column-wise;
// runs of R contiguous values (sr == 1: NCHW) are reduced run by run. Work is split into
// (row block, column chunk) tasks whose partial sums are added in a fixed order: the result
// does not depend on the thread count.
template <bool kSquare, typename scalar_t, typename acc_t>
void channel_reduce(const scalar_t* x, const ChannelView& v, acc_t* out) {
  std::fill(out, out + v.c, acc_t(0));
  const int64_t total = v.a * v.c * v.r;
  if (total == 0) return;
  if (v.sc == 1 && v.r > 1 && v.sr == v.c && v.c * v.r <= kFoldLimit) {
    // (R, C) blocks contiguous (channels_last): short rows of C cost a loop each; sum whole
    // blocks column-wise instead (long vectorized rows), then fold the R positions.
    std::vector<acc_t> blocks(v.c * v.r);
    channel_reduce<kSquare, scalar_t, acc_t>(x, ChannelView{v.a, v.c * v.r, 1, v.sa, 1, 1},
                                             blocks.data());
    for (int64_t r = 0; r < v.r; ++r) {
      const acc_t* block = blocks.data() + r * v.c;
      for (int64_t c = 0; c < v.c; ++c) out[c] += block[c];
    }
    return;
  }
  const auto& leaves = reduce_leaves<kSquare, scalar_t>();
  const auto* leaf_x = reinterpret_cast<const typename LeafElement<scalar_t>::type*>(x);
  const bool runs = v.sr == 1 && v.r > 1;
  // rows: (a, r) pairs for column-wise sums, a for run sums
  const int64_t n_rows = runs ? v.a : v.a * v.r;
  const int64_t row_len = runs ? v.r : 1;
  const int64_t chunk = runs ? std::max<int64_t>(1, kColumnChunk / std::max<int64_t>(1, v.r))
                             : kColumnChunk;
  const int64_t n_chunks = (v.c + chunk - 1) / chunk;
  int64_t n_blocks = (n_rows + kRowBlock - 1) / kRowBlock;
  if (total >= kSerialElements && n_chunks * n_blocks < kMinTasks) {
    // too few tasks to share among threads: split the rows further (a fixed split, not one
    // per thread, so the summation order does not change with the thread count)
    const int64_t wanted = (kMinTasks + n_chunks - 1) / n_chunks;
    n_blocks = std::min(n_rows, std::max(n_blocks, wanted));
  }
  const int64_t rows_per_block = (n_rows + n_blocks - 1) / n_blocks;
  n_blocks = (n_rows + rows_per_block - 1) / rows_per_block;
  std::vector<acc_t> partial(n_blocks > 1 ? n_blocks * v.c : 0, acc_t(0));
  auto task = [&](int64_t t) {
    const int64_t block = t / n_chunks, chunk_index = t % n_chunks;
    const int64_t c_begin = chunk_index * chunk, c_end = std::min(v.c, c_begin + chunk);
    const int64_t row_begin = block * rows_per_block;
    const int64_t row_end = std::min(n_rows, row_begin + rows_per_block);
    acc_t* acc = n_blocks > 1 ? partial.data() + block * v.c : out;
    if (runs) {
      leaves.runs(acc, leaf_x, row_begin, row_end, v.sa, c_begin, c_end, v.sc, row_len);
    } else {
      leaves.rows(acc, leaf_x, row_begin, row_end, v.r, v.sa, v.sr, c_begin, c_end, v.sc);
    }
  };
  const int64_t n_tasks = n_blocks * n_chunks;
  if (total < kSerialElements || n_tasks == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) task(t);
  } else {
    at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) task(t);
    });
  }
  if (n_blocks > 1) {
    for (int64_t b = 0; b < n_blocks; ++b) {
      const acc_t* p = partial.data() + b * v.c;
      for (int64_t c = 0; c < v.c; ++c) out[c] += p[c];
    }
  }
}

// x as (A, C, R) over the channel dims [c0, c1), copied to row-major first when its strides
// allow no such view or neither the channels nor the rest is contiguous.
at::Tensor viewable(const at::Tensor& x, int64_t c0, int64_t c1, ChannelView& v) {
  if (channel_view(x, c0, c1, v) && (v.sc == 1 || v.c == 1 || v.sr == 1 || v.r == 1))
    return x;
  at::Tensor copy = x.contiguous();
  TORCH_INTERNAL_ASSERT(channel_view(copy, c0, c1, v));
  return copy;
}

void check_channel_dims(const char* op, const at::Tensor& x, int64_t c0, int64_t c1) {
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= x.dim(), "adafisher::", op,
              ": channel dims [", c0, ", ", c1, ") must lie within the input's ", x.dim(),
              " dims");
  TORCH_CHECK(x.is_floating_point(), "adafisher::", op, ": the input must be floating, got ",
              x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "adafisher::", op, ": CPU kernel got a tensor on ",
              x.device());
}

// Per channel Σ x² (square) or Σ x, in the accumulation dtype of x.
at::Tensor channel_sums(const char* op, const at::Tensor& input, int64_t c0, int64_t c1,
                        bool square) {
  check_channel_dims(op, input, c0, c1);
  ChannelView v;
  at::Tensor x = viewable(input, c0, c1, v);
  at::Tensor out = at::empty({v.c}, input.options().dtype(acc_scalar_type(input)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_sums", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    if (square) {
      channel_reduce<true, scalar_t, acc_t>(data, v, out.mutable_data_ptr<acc_t>());
    } else {
      channel_reduce<false, scalar_t, acc_t>(data, v, out.mutable_data_ptr<acc_t>());
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------ ops
at::Tensor channel_sum_of_squares_cpu(const at::Tensor& x, int64_t channel_start,
                                      int64_t channel_end, double scale, bool append_one) {
  at::Tensor sums = channel_sums("channel_sum_of_squares", x, channel_start, channel_end, true);
  const int64_t n = sums.numel();
  at::Tensor out = at::empty({n + (append_one ? 1 : 0)}, sums.options());
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "channel_sum_of_squares", [&] {
    const scalar_t* s = sums.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) o[i] = scaled<scalar_t>(s[i], scale);
    if (append_one) o[n] = scalar_t(1);
  });
  return out;
}

at::Tensor norm_input_statistic_cpu(const at::Tensor& x, int64_t channel_start,
                                    int64_t channel_end, double scale, double second) {
  at::Tensor sums = channel_sums("norm_input_statistic", x, channel_start, channel_end, false);
  at::Tensor out = at::empty({2}, sums.options());
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "norm_input_statistic", [&] {
    const scalar_t* s = sums.const_data_ptr<scalar_t>();
    scalar_t dot = 0;
    for (int64_t i = 0; i < sums.numel(); ++i) dot += s[i] * s[i];
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    o[0] = scaled<scalar_t>(dot, scale);
    o[1] = static_cast<scalar_t>(second);
  });
  return out;
}

// One spatial dim of a conv: for kernel offset k, the input positions it reads (zero padding
// excluded) are start[k] + j·stride for j < count[k].
struct ConvDim {
  int64_t length, kernel, stride, dilation, pad_before, pad_after, n_out, input_stride;
  std::vector<int64_t> start, count;

  void plan() {
    start.assign(kernel, 0);
    count.assign(kernel, 0);
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t shift = k * dilation - pad_before;  // position read by output 0
      // first output o with o·stride + shift >= 0, last with o·stride + shift < length
      int64_t lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
      int64_t hi = length - 1 - shift;
      hi = hi < 0 ? -1 : std::min(n_out - 1, hi / stride);
      if (hi >= lo) {
        start[k] = lo * stride + shift;
        count[k] = hi - lo + 1;
      }
    }
  }
};

at::Tensor conv_input_statistic_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef dilation,
                                    at::IntArrayRef pad_before, at::IntArrayRef pad_after,
                                    int64_t groups, bool bias) {
  const int64_t n_spatial = static_cast<int64_t>(kernel_size.size());
  TORCH_CHECK(n_spatial >= 1 && n_spatial <= 3,
              "adafisher::conv_input_statistic: 1 to 3 spatial dims, got ", n_spatial);
  TORCH_CHECK(input.dim() == n_spatial + 2, "adafisher::conv_input_statistic: input must be "
              "batched (N, C, *spatial) with ", n_spatial, " spatial dims, got shape ",
              input.sizes());
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == n_spatial &&
                  static_cast<int64_t>(dilation.size()) == n_spatial &&
                  static_cast<int64_t>(pad_before.size()) == n_spatial &&
                  static_cast<int64_t>(pad_after.size()) == n_spatial,
              "adafisher::conv_input_statistic: stride, dilation and paddings need one entry "
              "per spatial dim (", n_spatial, ")");
  check_channel_dims("conv_input_statistic", input, 1, 2);
  const int64_t batch = input.size(0), channels = input.size(1);
  TORCH_CHECK(groups >= 1 && channels % groups == 0,
              "adafisher::conv_input_statistic: groups = ", groups,
              " must be >= 1 and divide the input's ", channels, " channels");
  const int64_t per_group = channels / groups;
  std::array<ConvDim, 3> dims;
  int64_t n_positions = 1, patch = 1;
  for (int64_t d = 0; d < 3; ++d) {
    ConvDim& dim = dims[d];
    const int64_t src = d - (3 - n_spatial);  // leading dims pad a 1-D/2-D conv to 3-D
    if (src < 0) {
      dim = ConvDim{1, 1, 1, 1, 0, 0, 1, 0, {}, {}};
    } else {
      dim = ConvDim{input.size(2 + src), kernel_size[src], stride[src], dilation[src],
                    pad_before[src], pad_after[src], 0, 0, {}, {}};
      TORCH_CHECK(dim.kernel >= 1 && dim.stride >= 1 && dim.dilation >= 1 &&
                      dim.pad_before >= 0 && dim.pad_after >= 0,
                  "adafisher::conv_input_statistic: kernel sizes, strides and dilations must "
                  "be >= 1 and paddings >= 0");
      const int64_t span = dim.length + dim.pad_before + dim.pad_after -
                           dim.dilation * (dim.kernel - 1) - 1;
      TORCH_CHECK(span >= 0, "adafisher::conv_input_statistic: the conv output would be empty "
                  "(input length ", dim.length, ", kernel ", dim.kernel, ")");
      dim.n_out = span / dim.stride + 1;
    }
    n_positions *= dim.n_out;
    patch *= dim.kernel;
  }
  TORCH_CHECK(batch > 0, "adafisher::conv_input_statistic: the batch is empty (a pass with no "
              "samples has no statistic)");
  // X2 = Σ_b x[b]², in the memory order of one sample (channels_last stays channels_last).
  at::Tensor x = input;
  if (!x.select(0, 0).is_non_overlapping_and_dense()) x = x.contiguous();
  const int64_t per_sample = x.numel() / batch;
  const at::ScalarType acc_dtype = acc_scalar_type(x);
  at::Tensor out = at::empty({per_group * patch + (bias ? 1 : 0)}, x.options().dtype(acc_dtype));
  std::array<int64_t, 3> spatial_strides{0, 0, 0};
  for (int64_t d = 0; d < n_spatial; ++d) spatial_strides[3 - n_spatial + d] = x.stride(2 + d);
  for (int64_t d = 0; d < 3; ++d) {
    dims[d].input_stride = spatial_strides[d];
    dims[d].plan();
  }
  const int64_t channel_stride = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "conv_input_statistic", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> x2(per_sample);
    const ChannelView rows{batch, per_sample, 1, x.stride(0), 1, 1};
    channel_reduce<true, scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), rows, x2.data());
    std::vector<acc_t> per_channel(channels * patch);
    const int64_t per_channel_work = per_sample / std::max<int64_t>(1, channels) * patch;
    const int64_t grain = std::max<int64_t>(
        1, kSerialElements / std::max<int64_t>(1, per_channel_work));
    const PatchSumsLeaf<acc_t> patch_sums = patch_sums_leaf<acc_t>();
    std::array<PatchDim, 3> patch_dims;
    for (int64_t d = 0; d < 3; ++d)
      patch_dims[d] = PatchDim{dims[d].length, dims[d].kernel, dims[d].stride,
                               dims[d].input_stride, dims[d].start.data(),
                               dims[d].count.data()};
    const int64_t t3_size = dims[0].length * dims[1].length * dims[2].kernel;
    const int64_t t2_size = dims[0].length * dims[1].kernel * dims[2].kernel;
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> t3(t3_size), t2(t2_size);
      for (int64_t c = begin; c < end; ++c)
        patch_sums(x2.data() + c * channel_stride, patch_dims.data(),
                   per_channel.data() + c * patch, t3.data(), t2.data());
    });
    acc_t* h = out.mutable_data_ptr<acc_t>();
    const double scale = 1.0 / (static_cast<double>(batch) * static_cast<double>(n_positions) *
                                static_cast<double>(groups));
    for (int64_t i = 0; i < per_group * patch; ++i) {
      acc_t s = 0;
      for (int64_t g = 0; g < groups; ++g) s += per_channel[g * per_group * patch + i];
      h[i] = scaled<acc_t>(s, scale);
    }
    if (bias) h[per_group * patch] = acc_t(1);
  });
  return out;
}

void commit_statistics_cpu(const at::Tensor& pending, const at::Tensor& pending_count,
                           const at::Tensor& h_hat, const at::Tensor& grad, int64_t layer,
                           int64_t h_offset, int64_t s_offset, int64_t channel_start,
                           int64_t channel_end, bool sum_then_square, double scale) {
  TORCH_CHECK(pending.is_contiguous() && pending_count.is_contiguous() &&
                  pending.scalar_type() == pending_count.scalar_type() &&
                  (pending.scalar_type() == at::kFloat || pending.scalar_type() == at::kDouble),
              "adafisher::commit_statistics: pending and pending_count must be contiguous "
              "float32 or float64 of one dtype");
  TORCH_CHECK(pending.device().is_cpu() && pending_count.device().is_cpu() &&
                  h_hat.device().is_cpu(),
              "adafisher::commit_statistics: CPU kernel got tensors on another device");
  TORCH_CHECK(h_hat.dim() == 1, "adafisher::commit_statistics: h_hat must be a vector");
  TORCH_CHECK(0 <= layer && layer < pending_count.numel(), "adafisher::commit_statistics: "
              "layer ", layer, " outside pending_count's ", pending_count.numel(), " layers");
  at::Tensor s_hat = channel_sums("commit_statistics", grad, channel_start, channel_end,
                                  !sum_then_square);
  const int64_t h_len = h_hat.numel(), s_len = s_hat.numel();
  TORCH_CHECK(h_offset >= 0 && h_offset + h_len <= pending.numel() && s_offset >= 0 &&
                  s_offset + s_len <= pending.numel(),
              "adafisher::commit_statistics: H [", h_offset, ", ", h_offset + h_len, ") or S [",
              s_offset, ", ", s_offset + s_len, ") lies outside the pending buffer of ",
              pending.numel());
  at::Tensor h = h_hat.to(pending.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(pending.scalar_type(), "commit_statistics", [&] {
    scalar_t* p = pending.mutable_data_ptr<scalar_t>();
    const scalar_t* hv = h.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < h_len; ++i) p[h_offset + i] += hv[i];
    AT_DISPATCH_FLOATING_TYPES(s_hat.scalar_type(), "commit_statistics", [&] {
      using sum_t = scalar_t;
      const sum_t* s = s_hat.const_data_ptr<sum_t>();
      using pending_t = std::remove_pointer_t<decltype(p)>;
      for (int64_t i = 0; i < s_len; ++i) {
        const sum_t v = sum_then_square ? s[i] * s[i] : s[i];
        p[s_offset + i] += static_cast<pending_t>(scaled<sum_t>(v, scale));
      }
    });
    pending_count.mutable_data_ptr<scalar_t>()[layer] += scalar_t(1);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(adafisher, CPU, m) {
  m.impl("channel_sum_of_squares", &channel_sum_of_squares_cpu);
  m.impl("norm_input_statistic", &norm_input_statistic_cpu);
  m.impl("conv_input_statistic", &conv_input_statistic_cpu);
  m.impl("commit_statistics", &commit_statistics_cpu);
}

}  // namespace adafisher
