// The instruction-set cap of the CPU kernels from the environment, for the op adapters:
// TWOTOWER_CPU_ISA=scalar|avx2|avx512|avx512_bf16|amx makes every CPU kernel use its best path at or below that
// level (tests force each path in turn; benchmarks compare them); unset: the best this CPU runs.
#pragma once
#include "common/cpu_isa.h"

namespace tt::torch_glue {

// The cap (a bad or unsupported name raises a one-line error naming TWOTOWER_CPU_ISA).
tt::CpuIsa cpu_isa_cap();

}  // namespace tt::torch_glue
