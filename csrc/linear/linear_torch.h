// Torch-side pieces of the linear op that the fused ops share: the LM head + commit (lm_head_unmask_torch.cpp) and
// the MoE layer's shared expert (moe_torch.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "linear/linear.h"

namespace tt::torch_glue {

// w (the argument w_name) must be a weight packed for ops.linear (linear.h; python/twotower_ext/packed.py) with n
// outputs over K inputs (named k_name in the error: "x's in_features"), in x's dtype and on x's device. The error
// calls the weight `what` ("a linear weight") and says the layout and the shape it expected.
void check_packed_weight(const at::Tensor& w, const char* w_name, int64_t n, int64_t K, const char* k_name,
                         const at::Tensor& x, const char* x_name, const char* what);

// The plan a call of M rows gets here: linear_cpu_plan at torch's thread count, with the instruction set and the
// path the environment forces (TWOTOWER_LINEAR_CPU_ISA, TWOTOWER_LINEAR_CPU_GEMM) where it does.
tt::LinearPlan linear_call_plan(int64_t M, int64_t N, int64_t K, tt::DType dt);

// The linear op's CPU implementation: y = x @ W^T for a packed w of n outputs (linear_torch.cpp's header comment).
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, int64_t n);

}  // namespace tt::torch_glue
