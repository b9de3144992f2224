// The instruction set a CPU kernel family runs, for its torch adapter: the best this CPU has, or the one a
// TWOTOWER_<OP>_CPU_ISA variable forces (tests run every path; benchmarks compare them).
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "common/cpu_isa.h"

namespace tt::torch_glue {

// `var` unset or empty: cpu_best_isa(cap). Else the named instruction set, which must be at most `cap` (the
// best the family has code for) and run on this CPU.
inline tt::CpuIsa cpu_isa_from_env(const char* var, tt::CpuIsa cap) {
  const char* env = std::getenv(var);
  if (env == nullptr || env[0] == '\0') return tt::cpu_best_isa(cap);
  tt::CpuIsa isa{};
  if (!tt::cpu_isa_from_name(env, &isa) || int32_t(isa) > int32_t(cap)) {
    std::string names;
    for (int32_t i = 0; i <= int32_t(cap); ++i)
      names += std::string(i == 0 ? "" : i == int32_t(cap) ? " or " : ", ") + tt::cpu_isa_name(tt::CpuIsa(i));
    TORCH_CHECK_VALUE(false, "twotower: ", var, " must be ", names, ", got '", env, "'");
  }
  TORCH_CHECK_VALUE(tt::cpu_isa_supported(isa), "twotower: ", var, "=", env, " but this CPU does not run it");
  return isa;
}

}  // namespace tt::torch_glue
