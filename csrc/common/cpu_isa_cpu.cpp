// See cpu_isa.h.
#include "common/cpu_isa.h"

#include <cstring>

#ifdef TT_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tt {
namespace {

constexpr const char* kNames[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx"};

#ifdef TT_X86
// AMX: cpuid leaf 7 (EDX bit 22 AMX-BF16, bit 24 AMX-TILE), the OS enabling the tile state in XCR0 (bits 17, 18),
// and Linux granting this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): without the
// last, the first tile instruction faults. Asked once.
bool amx_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv is there
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

}  // namespace

bool cpu_isa_supported(CpuIsa isa) {
#ifdef TT_X86
  switch (isa) {
    case CpuIsa::kScalar: return true;
    case CpuIsa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::kAvx512Bf16: return cpu_isa_supported(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512bf16");
    case CpuIsa::kAmx: {
      static const bool amx = cpu_isa_supported(CpuIsa::kAvx512Bf16) && amx_usable();
      return amx;
    }
  }
  return false;
#else
  return isa == CpuIsa::kScalar;
#endif
}

CpuIsa cpu_best_isa(CpuIsa cap) {
  for (int32_t i = int32_t(cap); i > 0; --i)
    if (cpu_isa_supported(CpuIsa(i))) return CpuIsa(i);
  return CpuIsa::kScalar;
}

const char* cpu_isa_name(CpuIsa isa) {
  const auto i = int32_t(isa);
  return i >= 0 && i <= int32_t(CpuIsa::kAmx) ? kNames[i] : "unknown";
}

bool cpu_isa_from_name(const char* name, CpuIsa* isa) {
  for (int32_t i = 0; i <= int32_t(CpuIsa::kAmx); ++i) {
    if (std::strcmp(name, kNames[i]) == 0) {
      *isa = CpuIsa(i);
      return true;
    }
  }
  return false;
}

}  // namespace tt
