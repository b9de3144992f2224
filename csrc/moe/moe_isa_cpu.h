// The x86 instruction sets of the MoE CPU kernels (moe_gemm_cpu.cpp, moe_dequant_cpu.cpp): their objects are
// compiled for AVX2 + FMA + F16C (CMakeLists.txt); the AVX-512 functions carry target attributes and run only
// where moe_cpu_isa_supported says so (cpuid).
#pragma once

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TT_MOE_X86 1
#include <immintrin.h>
#define TT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define TT_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif
