// The statistics leaves at the build's baseline ISA, and the runtime choice between them and
// the AVX2+FMA ones (cpu_leaves_avx2.cpp): AVX2 when the CPU (and OS) support AVX2 and FMA and
// the extension was built for x86-64 with GCC/Clang; the baseline everywhere else.
// set_cpu_isa lets tests and benchmarks force one variant (adafisher._C.set_cpu_isa; tests
// restore the previous one).
#include "cpu_leaves.h"

#include <atomic>
#include <cstring>

namespace adafisher {
namespace leaves_baseline {
#include "cpu_leaves.inc"
}  // namespace leaves_baseline

StatisticLeaves baseline_statistic_leaves() { return leaves_baseline::make_leaves("baseline"); }

namespace {

const StatisticLeaves* baseline_table() {
  static const StatisticLeaves table = baseline_statistic_leaves();
  return &table;
}

const StatisticLeaves* avx2_table() {
#if ADAFISHER_AVX2_LEAVES
  // avx2_statistic_leaves() is AVX2 code itself: called only once the CPU says it may run.
  // (libgcc's CPU model reports AVX2 and FMA only when the OS also saves the AVX state.)
  static const StatisticLeaves* const table = []() -> const StatisticLeaves* {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return nullptr;
    static const StatisticLeaves leaves = avx2_statistic_leaves();
    return &leaves;
  }();
  return table;
#else
  return nullptr;
#endif
}

const StatisticLeaves* best_table() {
  const StatisticLeaves* avx2 = avx2_table();
  return avx2 != nullptr ? avx2 : baseline_table();
}

std::atomic<const StatisticLeaves*>& active() {
  static std::atomic<const StatisticLeaves*> table{best_table()};
  return table;
}

}  // namespace

const StatisticLeaves& active_statistic_leaves() {
  return *active().load(std::memory_order_relaxed);
}

const char* active_cpu_isa() { return active_statistic_leaves().isa; }

const char* supported_cpu_isas() { return avx2_table() != nullptr ? "baseline,avx2" : "baseline"; }

const char* set_cpu_isa(const char* isa) {
  const StatisticLeaves* table = nullptr;
  if (std::strcmp(isa, "baseline") == 0) table = baseline_table();
  if (std::strcmp(isa, "avx2") == 0) table = avx2_table();
  if (table == nullptr) return nullptr;
  return active().exchange(table)->isa;
}

}  // namespace adafisher
