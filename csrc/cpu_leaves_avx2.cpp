// The statistics leaves compiled for AVX2+FMA (x86-64, GCC/Clang). Only cpu_leaves.h (plain
// declarations) and cpu_leaves.inc (self-contained bodies with internal linkage) are compiled
// under the target pragma: no ATen/c10/std inline function gets an AVX2 copy here. Used only
// when the CPU reports AVX2 and FMA (cpu_leaves.cpp).
#include "cpu_leaves.h"

#if ADAFISHER_AVX2_LEAVES

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace adafisher {
namespace leaves_avx2 {
#include "cpu_leaves.inc"
}  // namespace leaves_avx2

StatisticLeaves avx2_statistic_leaves() { return leaves_avx2::make_leaves("avx2"); }
}  // namespace adafisher

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // ADAFISHER_AVX2_LEAVES
