// See cpu_isa_torch.h.
#include "common/cpu_isa_torch.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace tt::torch_glue {

tt::CpuIsa cpu_isa_cap() {
  const char* env = std::getenv("TWOTOWER_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return tt::cpu_best_isa();
  tt::CpuIsa isa;
  TORCH_CHECK_VALUE(tt::cpu_isa_from_name(env, &isa), "twotower: TWOTOWER_CPU_ISA must be scalar, avx2, avx512, "
                    "avx512_bf16 or amx, got '", env, "'");
  TORCH_CHECK_VALUE(tt::cpu_isa_supported(isa), "twotower: TWOTOWER_CPU_ISA=", env, " but this CPU does not run it "
                    "(best: ", tt::cpu_isa_name(tt::cpu_best_isa()), ")");
  return isa;
}

}  // namespace tt::torch_glue

namespace {

std::vector<std::string> cpu_isas_op() {
  std::vector<std::string> out;
  for (int i = 0; i <= int(tt::CpuIsa::kAmx); ++i)
    if (tt::cpu_isa_supported(tt::CpuIsa(i))) out.push_back(tt::cpu_isa_name(tt::CpuIsa(i)));
  return out;
}

}  // namespace

// No tensor arguments: dispatches on no backend (any build).
TORCH_LIBRARY_IMPL(twotower, CompositeExplicitAutograd, m) { m.impl("cpu_isas", &cpu_isas_op); }
