// Torch-side helpers shared by every op's adapter (csrc/<op>/<op>_torch.cpp): argument checks whose messages
// name the argument and what was expected, status -> torch error, the current CUDA stream.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#ifdef TWOTOWER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common/platform.h"

namespace tt::torch_glue {

using at::Tensor;

inline tt::DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return tt::DType::kFloat32;
    case at::kBFloat16: return tt::DType::kBFloat16;
    case at::kHalf: return tt::DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "twotower: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_dtype(const Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "twotower: ", name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_same_device(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "twotower: ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_last_dim_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "twotower: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

inline void check_status(tt::Status s, const char* op) {
  TORCH_CHECK(s == tt::Status::kOk, "twotower: ", op, " kernel failed: ", tt::status_str(s));
}

#ifdef TWOTOWER_WITH_CUDA
inline void* current_stream(const Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}
#endif

}  // namespace tt::torch_glue
