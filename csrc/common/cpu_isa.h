// The x86 instruction sets of the CPU kernels, chosen at run time from cpuid (torch-free). Kernel objects are
// compiled for AVX2 + FMA + F16C (CMakeLists.txt); AVX-512 and AMX functions carry the target attributes below
// and run only where cpu_isa_supported says so.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TT_X86 1
#include <immintrin.h>
#define TT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define TT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define TT_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#endif

namespace tt {

// In order of preference; each implies the ones before it (except scalar, which every CPU runs).
//   kAvx2: AVX2 + FMA (+ F16C); kAvx512: F, BW, VL, DQ; kAvx512Bf16: + vdpbf16ps; kAmx: + AMX-TILE / AMX-BF16
//   with the tile state granted by the OS (arch_prctl), bf16 tile products.
enum class CpuIsa : int32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

bool cpu_isa_supported(CpuIsa isa);
// The best instruction set this CPU runs, at most `cap` (the best a kernel family has code for).
CpuIsa cpu_best_isa(CpuIsa cap = CpuIsa::kAmx);
// "scalar", "avx2", "avx512", "avx512_bf16", "amx" (the names of the TWOTOWER_*_CPU_ISA variables).
const char* cpu_isa_name(CpuIsa isa);
// The instruction set of that name, or false.
bool cpu_isa_from_name(const char* name, CpuIsa* isa);

}  // namespace tt
