// Torch-side pieces of the linear op that the fused LM head + commit op (lm_head_unmask_torch.cpp) shares.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tt::torch_glue {

// w must be a weight packed for ops.linear (linear.h; python/twotower_ext/packed.py) with n outputs over the K =
// x.size(-1) inputs of x, in x's dtype and on x's device. The error names w as `what` ("a linear weight") and K as
// `k_name` ("x's in_features"), and says the layout and the shape it expected.
void check_packed_weight(const at::Tensor& w, int64_t n, const at::Tensor& x, const char* x_name, const char* what,
                         const char* k_name);

}  // namespace tt::torch_glue
