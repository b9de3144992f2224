// The CPU kernels' matrix library (tt::CpuGemm, block_attention.h): fp32 C[M,N] (+)= A[M,K] @ op(B) on ATen's
// sgemm (MKL / oneDNN), so torch-free kernel code gets the library where it wins (the MoE op's many-token experts,
// widened attention tiles). bf16 tiles do not come here: the kernels multiply them with their own vdpbf16ps / AMX
// code (block_attention_bf16_cpu.cpp), which needs no packing API of the library.
#pragma once
#include <ATen/core/Tensor.h>

#include "block_attention/block_attention.h"

namespace tt::torch_glue {

CpuGemm cpu_sgemm();

}  // namespace tt::torch_glue
