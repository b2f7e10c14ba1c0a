// CPU kernels of the adafisher ops (schemas and semantics: adafisher/ops.py).
// fp32 math for fp16/bf16/fp32 parameters, float64 for float64 ones.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <set>
#include <type_traits>

#include "cpu_leaves.h"
#include "layout.h"

namespace adafisher {
namespace {

constexpr int64_t kStepGrain = 16384;  // elements per task: small tensors run inline

template <typename opmath_t>
struct StepCoefficients {
  opmath_t beta;
  opmath_t one_minus_beta;
  opmath_t sign;         // −1 when maximizing, else 1 (a product by ±1 is exact)
  opmath_t l2;           // wd when the decay is L2, else 0
  opmath_t decay;        // 1 − lr·wd when decoupled, else 1
  opmath_t neg_step;     // −lr / (1 − βᵗ)
};

// One element. The decay is a template argument, so the loops below hold no branch and
// vectorize (a runtime flag per element kept them scalar).
template <Decay kDecay, bool kHasF, typename scalar_t, typename opmath_t>
inline void update_element(scalar_t* p, const scalar_t* g, scalar_t* m, int64_t i,
                           const StepCoefficients<opmath_t>& c, opmath_t f) {
  opmath_t pv = static_cast<opmath_t>(p[i]);
  opmath_t gv = static_cast<opmath_t>(g[i]) * c.sign;
  opmath_t mv = static_cast<opmath_t>(m[i]);
  if constexpr (kDecay == Decay::kL2) gv = gv + c.l2 * pv;
  mv = mv * c.beta + c.one_minus_beta * gv;
  if constexpr (kDecay == Decay::kDecoupled) pv = pv * c.decay;
  if constexpr (kHasF) {
    pv = pv + c.neg_step * mv / f;
  } else {
    pv = pv + c.neg_step * mv;
  }
  p[i] = static_cast<scalar_t>(pv);
  m[i] = static_cast<scalar_t>(mv);
}

// Elements [begin, end) in memory order of one parameter viewed as (rows, cols); ``inner`` is
// the length of the innermost memory run of a row (cols when row-major, C_in for channels_last).
template <Decay kDecay, typename scalar_t, typename factor_t>
void update_range(scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                  scalar_t* __restrict__ m, int64_t begin, int64_t end,
                  const factor_t* __restrict__ s, const factor_t* __restrict__ h, int64_t cols,
                  int64_t inner, factor_t damping,
                  const StepCoefficients<at::opmath_type<scalar_t>>& c) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (s == nullptr) {
    for (int64_t i = begin; i < end; ++i)
      update_element<kDecay, false>(p, g, m, i, c, opmath_t(1));
    return;
  }
  const int64_t per_inner = inner > 0 ? cols / inner : 0;
  int64_t i = begin;
  while (i < end) {
    const int64_t r = i / cols;
    const int64_t j0 = i - r * cols;
    const int64_t j1 = std::min(cols, j0 + (end - i));
    const factor_t sr = s[r];
    const int64_t base = i - j0;
    if (inner == cols) {
      for (int64_t j = j0; j < j1; ++j) {
        const factor_t f = sr * h[j] + damping;
        update_element<kDecay, true>(p, g, m, base + j, c, static_cast<opmath_t>(f));
      }
    } else {
      for (int64_t j = j0; j < j1; ++j) {
        const factor_t f = sr * h[(j % inner) * per_inner + j / inner] + damping;
        update_element<kDecay, true>(p, g, m, base + j, c, static_cast<opmath_t>(f));
      }
    }
    i += j1 - j0;
  }
}

// steps[i] += 1, returning the new count (the hot case, a CPU float32 scalar, in place).
double advance_step(const at::Tensor& t) {
  if (t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == at::kFloat) {
    float* count = t.mutable_data_ptr<float>();
    *count += 1.0f;
    return *count;
  }
  t.add_(1);
  return t.item<double>();
}

double read_scalar(const at::Tensor& t) {
  if (t.device().is_cpu() && t.numel() == 1) {
    if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>();
    if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  }
  return t.item<double>();
}

template <typename factor_t>
void step_one(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
              double step, const factor_t* s, const factor_t* h, int64_t rows, double lr,
              double beta, double damping, double weight_decay, bool decoupled, bool maximize) {
  const int64_t numel = param.numel();
  if (numel == 0) return;
  const int64_t cols = s != nullptr ? numel / rows : numel;
  int64_t inner = fused_inner(param, grad, exp_avg, s != nullptr ? cols : -1);
  at::Tensor p = param, g = grad, m = exp_avg;
  if (inner < 0) {  // any other layout: work on row-major copies, write back below
    p = param.contiguous();
    g = grad.to(param.scalar_type()).contiguous();
    m = exp_avg.to(param.scalar_type()).contiguous();
    inner = cols;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adafisher_step", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    StepCoefficients<opmath_t> c;
    c.beta = static_cast<opmath_t>(beta);
    c.one_minus_beta = static_cast<opmath_t>(1.0 - beta);
    c.sign = maximize ? opmath_t(-1) : opmath_t(1);
    c.l2 = static_cast<opmath_t>(weight_decay);
    c.decay = static_cast<opmath_t>(1.0 - lr * weight_decay);
    c.neg_step = static_cast<opmath_t>(-lr / (1.0 - std::pow(beta, step)));
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* mp = m.mutable_data_ptr<scalar_t>();
    const factor_t damping_f = static_cast<factor_t>(damping);
    const Decay decay = weight_decay == 0 ? Decay::kNone
                        : decoupled      ? Decay::kDecoupled
                                         : Decay::kL2;
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<factor_t, float>) {
      if (s == nullptr || inner == cols) {  // the common case: the leaf of the CPU's ISA
        StepScalars leaf_c{c.beta, c.one_minus_beta, c.sign, c.l2, c.decay, c.neg_step,
                           damping_f, decay};
        const StepLeafF32 leaf = active_statistic_leaves().step_f32;
        at::parallel_for(0, numel, kStepGrain, [&](int64_t begin, int64_t end) {
          leaf(pp, gp, mp, begin, end, s, h, cols, leaf_c);
        });
        return;
      }
    }
    at::parallel_for(0, numel, kStepGrain, [&](int64_t begin, int64_t end) {
      if (decay == Decay::kNone) {
        update_range<Decay::kNone, scalar_t, factor_t>(pp, gp, mp, begin, end, s, h, cols,
                                                       inner, damping_f, c);
      } else if (decay == Decay::kL2) {
        update_range<Decay::kL2, scalar_t, factor_t>(pp, gp, mp, begin, end, s, h, cols, inner,
                                                     damping_f, c);
      } else {
        update_range<Decay::kDecoupled, scalar_t, factor_t>(pp, gp, mp, begin, end, s, h,
                                                            cols, inner, damping_f, c);
      }
    });
  });
  if (!p.is_same(param)) param.copy_(p);
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
}

template <typename factor_t>
void fused_step_typed(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList steps, const at::Tensor& factors, const at::Tensor& blended,
                      at::IntArrayRef layers, at::IntArrayRef h_offsets,
                      at::IntArrayRef s_offsets, at::IntArrayRef rows, double lr, double beta,
                      double damping, double weight_decay, bool decoupled, bool maximize) {
  const factor_t* f = factors.numel() ? factors.const_data_ptr<factor_t>() : nullptr;
  const bool* ready = blended.numel() ? blended.const_data_ptr<bool>() : nullptr;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t layer = layers[i];
    const bool has_f = layer >= 0 && ready[2 * layer] && ready[2 * layer + 1];
    step_one<factor_t>(params[i], grads[i], exp_avgs[i], advance_step(steps[i]),
                       has_f ? f + s_offsets[i] : nullptr, has_f ? f + h_offsets[i] : nullptr,
                       rows[i], lr, beta, damping, weight_decay, decoupled, maximize);
  }
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList steps, const at::Tensor& factors, const at::Tensor& blended,
                    at::IntArrayRef layers, at::IntArrayRef h_offsets, at::IntArrayRef s_offsets,
                    at::IntArrayRef rows, const at::Tensor& lr, double beta, double damping,
                    double weight_decay, bool decoupled, bool maximize) {
  check_step_arguments(params, grads, exp_avgs, steps, factors, blended, layers, h_offsets,
                       s_offsets, rows);
  TORCH_CHECK(blended.is_contiguous() && factors.is_contiguous(),
              "adafisher::fused_step: factors and blended must be contiguous");
  const double lr_value = read_scalar(lr);
  if (factors.scalar_type() == at::kDouble) {
    fused_step_typed<double>(params, grads, exp_avgs, steps, factors, blended, layers,
                             h_offsets, s_offsets, rows, lr_value, beta, damping, weight_decay,
                             decoupled, maximize);
  } else {
    TORCH_CHECK(factors.scalar_type() == at::kFloat,
                "adafisher::fused_step: factors must be float32 or float64");
    fused_step_typed<float>(params, grads, exp_avgs, steps, factors, blended, layers, h_offsets,
                            s_offsets, rows, lr_value, beta, damping, weight_decay, decoupled,
                            maximize);
  }
}

template <typename factor_t>
void update_factors_typed(const at::Tensor& factors, const at::Tensor& pending,
                          const at::Tensor& pending_count, const at::Tensor& blended,
                          const at::Tensor& nonfinite, const at::Tensor& segment_offsets,
                          double gamma_keep, double gamma_new, double eps) {
  const int64_t n_segments = segment_offsets.numel() - 1;
  factor_t* f = factors.mutable_data_ptr<factor_t>();
  factor_t* pend = pending.mutable_data_ptr<factor_t>();
  factor_t* count = pending_count.mutable_data_ptr<factor_t>();
  bool* done = blended.mutable_data_ptr<bool>();
  int64_t* bad_count = nonfinite.mutable_data_ptr<int64_t>();
  const int64_t* offsets = segment_offsets.const_data_ptr<int64_t>();
  const factor_t keep = static_cast<factor_t>(gamma_keep);
  const factor_t fresh_weight = static_cast<factor_t>(gamma_new);
  const factor_t eps_f = static_cast<factor_t>(eps);
  at::parallel_for(0, n_segments, 64, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const factor_t n = count[k / 2];
      if (!(n > 0)) continue;
      const int64_t begin = offsets[k], end = offsets[k + 1];
      factor_t low = std::numeric_limits<factor_t>::infinity();
      factor_t high = -std::numeric_limits<factor_t>::infinity();
      bool finite = true;
      for (int64_t i = begin; i < end; ++i) {
        const factor_t v = pend[i] / n;
        finite = finite && std::isfinite(v);
        low = std::min(low, v);
        high = std::max(high, v);
      }
      if (!finite) {
        bad_count[k] += 1;
        continue;
      }
      const factor_t range = high - low + eps_f;
      for (int64_t i = begin; i < end; ++i) {
        const factor_t normalized = (pend[i] / n - low) / range;
        f[i] = f[i] * keep + normalized * fresh_weight;
      }
      done[k] = true;
    }
  });
  std::fill(pend, pend + pending.numel(), factor_t(0));
  std::fill(count, count + pending_count.numel(), factor_t(0));
}

void update_factors_cpu(const at::Tensor& factors, const at::Tensor& pending,
                        const at::Tensor& pending_count, const at::Tensor& blended,
                        const at::Tensor& nonfinite, const at::Tensor& segment_offsets,
                        double gamma_keep, double gamma_new, double eps) {
  check_factor_arguments(factors, pending, pending_count, blended, nonfinite, segment_offsets);
  if (factors.scalar_type() == at::kDouble) {
    update_factors_typed<double>(factors, pending, pending_count, blended, nonfinite,
                                 segment_offsets, gamma_keep, gamma_new, eps);
  } else {
    update_factors_typed<float>(factors, pending, pending_count, blended, nonfinite,
                                segment_offsets, gamma_keep, gamma_new, eps);
  }
}

}  // namespace

// The distinct threads one at::parallel_for runs its chunks on (module.cpp: parallel_threads).
// ATen's parallel_for is a header template: built without OpenMP it runs inline, on one.
int parallel_region_threads() {
  std::mutex mutex;
  std::set<int> threads;
  at::parallel_for(0, 1 << 16, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    threads.insert(at::get_thread_num());
  });
  return static_cast<int>(threads.size());
}

TORCH_LIBRARY_IMPL(adafisher, CPU, m) {
  m.impl("fused_step", &fused_step_cpu);
  m.impl("update_factors", &update_factors_cpu);
}

}  // namespace adafisher
