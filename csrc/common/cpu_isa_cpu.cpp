// See cpu_isa.h.
#include "common/cpu_isa.h"

#include <cstring>

namespace tt {

namespace {
constexpr CpuIsa kLevels[] = {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAmx};
}

bool cpu_isa_supported(CpuIsa isa) {
#ifdef TT_X86
  switch (isa) {
    case CpuIsa::kScalar: return true;
    case CpuIsa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::kAvx512Bf16: return cpu_isa_supported(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512bf16");
    case CpuIsa::kAmx:
      return cpu_isa_supported(CpuIsa::kAvx512Bf16) && __builtin_cpu_supports("amx-tile") &&
             __builtin_cpu_supports("amx-bf16");
  }
  return false;
#else
  return isa == CpuIsa::kScalar;
#endif
}

CpuIsa cpu_best_isa() {
  static const CpuIsa best = [] {
    CpuIsa b = CpuIsa::kScalar;
    for (CpuIsa isa : kLevels)
      if (cpu_isa_supported(isa)) b = isa;
    return b;
  }();
  return best;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
    case CpuIsa::kAmx: return "amx";
  }
  return "?";
}

bool cpu_isa_from_name(const char* name, CpuIsa* isa) {
  for (CpuIsa l : kLevels)
    if (std::strcmp(name, cpu_isa_name(l)) == 0) {
      *isa = l;
      return true;
    }
  return false;
}

}  // namespace tt
