// The innermost loops of the CPU statistics and step kernels ("leaves"), compiled twice: for the
// baseline ISA of the build (cpu_leaves.cpp) and, on x86-64 with GCC/Clang, for AVX2+FMA
// (cpu_leaves_avx2.cpp). One variant is picked at runtime from what the CPU supports.
//
// The leaves see raw pointers and integers only, and this header declares plain structs and
// functions only (no inline code, no ATen/c10): an AVX2-compiled copy of an inline function
// shared with other translation units could be the one the linker keeps (ODR), and would then
// run on CPUs without AVX2.
#pragma once

#include <cstdint>

#if defined(_MSC_VER)  // only ever compiled for the baseline ISA
#include <cstring>
#define ADAFISHER_RESTRICT __restrict
#define ADAFISHER_BIT_COPY std::memcpy
#else
#define ADAFISHER_RESTRICT __restrict__
#define ADAFISHER_BIT_COPY __builtin_memcpy
#endif

namespace adafisher {

// fp16 / bf16 elements as their bits (c10::Half / c10::BFloat16 have the same layout); the
// leaves convert them to fp32 exactly, without c10 headers.
struct F16Bits {
  uint16_t bits;
};
struct Bf16Bits {
  uint16_t bits;
};

// One spatial dim of a conv as patch_sums reads it: for kernel offset k, the positions
// start[k] + j·stride for j < count[k] (zero padding excluded), input_stride apart in memory.
struct PatchDim {
  int64_t length, kernel, stride, input_stride;
  const int64_t* start;
  const int64_t* count;
};

// f(v) = v² or v (index [1] / [0] of the tables below), summed in acc_t.
template <typename scalar_t, typename acc_t>
struct ReduceLeaves {
  // acc[c] += Σ_{a ∈ [a_begin, a_end)} Σ_{i < len} f(x[a·sa + c·sc + i]) for c ∈ [c_begin, c_end),
  // each run summed in independent lanes (a fixed order; cpu_leaves.inc: run_sum).
  void (*runs)(acc_t* acc, const scalar_t* x, int64_t a_begin, int64_t a_end, int64_t sa,
               int64_t c_begin, int64_t c_end, int64_t sc, int64_t len);
  // For rows ∈ [row_begin, row_end), (a, r) = divmod(row, n_r):
  // acc[c] += f(x[a·sa + r·sr + c·sc]) for c ∈ [c_begin, c_end), row after row.
  void (*rows)(acc_t* acc, const scalar_t* x, int64_t row_begin, int64_t row_end, int64_t n_r,
               int64_t sa, int64_t sr, int64_t c_begin, int64_t c_end, int64_t sc);
};

// out[k0][k1][k2] = Σ of x2 over kernel offset (k0, k1, k2)'s positions (dims[0..3)), contracting
// the innermost dim first; t3 holds dims[0].length·dims[1].length·dims[2].kernel values and t2
// dims[0].length·dims[1].kernel·dims[2].kernel (scratch).
template <typename acc_t>
using PatchSumsLeaf = void (*)(const acc_t* x2, const PatchDim* dims, acc_t* out, acc_t* t3,
                               acc_t* t2);

// The weight decay of a step: none, L2 (added to the gradient) or decoupled (scales p).
enum class Decay { kNone, kL2, kDecoupled };

// The coefficients of one fp32 parameter's step (cpu_kernels.cpp: step_one), fp32 math.
struct StepScalars {
  float beta, one_minus_beta;
  float sign;      // −1 when maximizing, else 1 (a product by ±1 is exact)
  float l2;        // the L2 weight decay added to the gradient (Decay::kL2)
  float decay;     // 1 − lr·wd, scaling p (Decay::kDecoupled)
  float neg_step;  // −lr / (1 − βᵗ)
  float damping;   // λ
  Decay decay_kind;
};

// The fused step on elements [begin, end) of a row-major fp32 parameter seen as (rows, cols)
// with fp32 factors: m ← β·m + (1 − β)·g', p ← p − step·m / (s[r]·h[c] + λ) (no division when
// s is null: the layer has no factors yet). p and m are updated in place.
using StepLeafF32 = void (*)(float* p, const float* g, float* m, int64_t begin, int64_t end,
                             const float* s, const float* h, int64_t cols, const StepScalars& c);

struct StatisticLeaves {  // (and the step leaf: one table per ISA)
  const char* isa;
  StepLeafF32 step_f32;
  ReduceLeaves<float, float> f32[2];
  ReduceLeaves<double, double> f64[2];
  ReduceLeaves<Bf16Bits, float> bf16[2];
  ReduceLeaves<F16Bits, float> f16[2];
  PatchSumsLeaf<float> patch_sums_f32;
  PatchSumsLeaf<double> patch_sums_f64;
};

// The variants built into this extension.
StatisticLeaves baseline_statistic_leaves();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_MSC_VER)
#define ADAFISHER_AVX2_LEAVES 1
StatisticLeaves avx2_statistic_leaves();
#else
#define ADAFISHER_AVX2_LEAVES 0
#endif

// The leaves the kernels use now: the best variant the CPU supports, unless set_cpu_isa chose
// another.
const StatisticLeaves& active_statistic_leaves();

// ISA names ("baseline", "avx2") for tests and benchmarks (adafisher._C.cpu_isa /
// set_cpu_isa / cpu_isas): the active one; the ones this CPU and build support, comma-separated;
// and a switch that returns the previous name, or nullptr when `isa` is unknown or unsupported
// here (nothing changes then).
const char* active_cpu_isa();
const char* supported_cpu_isas();
const char* set_cpu_isa(const char* isa);

}  // namespace adafisher
