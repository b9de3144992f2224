// The CPU kernels' GEMM provider (tt::CpuGemm, block_attention.h): C[M,N] (+)= A[M,K] @ op(B) on ATen's matrix
// libraries, so torch-free kernel code gets MKL/oneDNN sgemm and, where the CPU has native bf16/fp16 units
// (AMX), oneDNN's brgemm. Shared by every CPU kernel that multiplies matrices.
#pragma once
#include <ATen/core/Tensor.h>

#include "block_attention/block_attention.h"

namespace tt::torch_glue {

// Context of the callback: whether B tiles are packed to VNNI pairs for brgemm.
struct CpuGemmCtx {
  bool vnni = false;
};

// bf16/fp16 tiles go to the matrix library as they are only where it has native units for them (AMX: oneDNN's
// brgemm can pack); elsewhere widening to fp32 and sgemm is far faster than ATen's bf16 fallback GEMM.
// TWOTOWER_CPU_LOWP_GEMM=native|fp32 overrides the choice (tests run both).
bool cpu_native_lowp(at::ScalarType st);

// A CpuGemm for tiles of `st` whose context lives in `ctx` (which must outlive the kernel call).
CpuGemm make_cpu_gemm(at::ScalarType st, CpuGemmCtx& ctx);

// Call at the end of a parallel region that used the gemm (releases brgemm's per-thread AMX state).
void cpu_gemm_release(const CpuGemmCtx& ctx);

}  // namespace tt::torch_glue
