// The op cpu_isas() (schema in csrc/registry.cpp): the instruction-set levels this CPU runs, for tests and benchmarks
// that force each kernel path in turn (common/cpu_isa_torch.h's TWOTOWER_*_CPU_ISA variables).
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/cpu_isa.h"

namespace {

std::vector<std::string> cpu_isas_op() {
  std::vector<std::string> out;
  for (int32_t i = 0; i <= int32_t(tt::CpuIsa::kAmx); ++i)
    if (tt::cpu_isa_supported(tt::CpuIsa(i))) out.push_back(tt::cpu_isa_name(tt::CpuIsa(i)));
  return out;
}

}  // namespace

// No tensor arguments: dispatches on no backend (any build).
TORCH_LIBRARY_IMPL(twotower, CompositeExplicitAutograd, m) { m.impl("cpu_isas", &cpu_isas_op); }
