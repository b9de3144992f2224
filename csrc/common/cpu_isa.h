// The x86 instruction sets of the CPU kernels, chosen at run time (torch-free). Kernel objects are compiled for
// AVX2 + FMA + F16C (CMakeLists.txt); functions for wider sets carry the target attributes below and run only
// where cpu_isa_supported says so (cpuid). The three CPUs these machines have: AVX2-only EPYC, AVX-512 +
// avx512_bf16 EPYC (no AMX), Xeon with AVX-512, avx512_bf16 and AMX.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TT_X86 1
#include <immintrin.h>
#define TT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define TT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace tt {

// Ordered: each level includes the ones below it. kAmx is avx512_bf16 plus AMX tiles (bf16).
enum class CpuIsa : int32_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// Whether this CPU runs `isa` (cpuid; for kAmx whether it reports AMX, not whether the OS grants the tiles).
bool cpu_isa_supported(CpuIsa isa);
// The highest level this CPU runs.
CpuIsa cpu_best_isa();
// "scalar", "avx2", "avx512", "avx512_bf16", "amx".
const char* cpu_isa_name(CpuIsa isa);
// The level named `name` (as cpu_isa_name spells it); false if it names none.
bool cpu_isa_from_name(const char* name, CpuIsa* isa);

}  // namespace tt
