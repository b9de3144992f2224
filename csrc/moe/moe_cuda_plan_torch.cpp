// cuda_moe_path(...): which grouped-GEMM kernel a CUDA moe_experts call with these shapes, strides, weight format
// and pointer alignment gets (the pure host function tt::moe_cuda_path of moe_cuda_plan.h, the one the CUDA
// launcher calls), on any build and machine: the path choice is testable without a GPU.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "common/torch_checks.h"
#include "moe/moe_cuda_plan.h"

namespace {

using namespace tt::torch_glue;

// cuda_moe_path(dtype, format, hidden, inter, group_size, scale_dtype, strides, pointer_offset) -> "mma" | "simt" |
// "unsupported". format: dense | fp8 | int4; scale_dtype defaults to the format's (fp8: float32, int4: bfloat16);
// strides = [x_stride, up_stride_e, up_stride_n, down_stride_e, down_stride_n] in storage units (elements of x's
// dtype when dense, bytes when quantised), default contiguous; pointer_offset: bytes added to x, w_up and w_down's
// (otherwise 256-byte aligned) addresses.
std::string cuda_moe_path_op(at::ScalarType dtype, std::string format, int64_t hidden, int64_t inter,
                             int64_t group_size, std::optional<at::ScalarType> scale_dtype,
                             std::vector<int64_t> strides, int64_t pointer_offset) {
  TORCH_CHECK_VALUE(format == "dense" || format == "fp8" || format == "int4",
                    "twotower: format must be dense, fp8 or int4, got '", format, "'");
  TORCH_CHECK_VALUE(hidden >= 1 && inter >= 1, "twotower: hidden and inter must be >= 1, got ", hidden, " and ", inter);
  TORCH_CHECK_VALUE(strides.empty() || strides.size() == 5, "twotower: strides must be [x_stride, up_stride_e, "
                    "up_stride_n, down_stride_e, down_stride_n] or empty, got ", strides.size(), " values");
  const auto dtype_of = [](at::ScalarType t, const char* name) {
    return kernel_dtype(at::empty({0}, at::TensorOptions().dtype(t)), name);
  };
  tt::MoeParams p{};
  p.dtype = dtype_of(dtype, "dtype");
  p.format = format == "fp8" ? tt::MoeWeightFormat::kFp8 : format == "int4" ? tt::MoeWeightFormat::kInt4
                                                                             : tt::MoeWeightFormat::kDense;
  p.hidden = hidden;
  p.inter = inter;
  p.group = group_size;
  p.scale_dtype = scale_dtype ? dtype_of(*scale_dtype, "scale_dtype")
                  : p.format == tt::MoeWeightFormat::kInt4 ? tt::DType::kBFloat16 : tt::DType::kFloat32;
  // Stored row lengths: int4 packs two k per byte.
  const auto row = [&](int64_t k) { return p.format == tt::MoeWeightFormat::kInt4 ? (k + 1) / 2 : k; };
  if (strides.empty()) strides = {hidden, inter * row(hidden), row(hidden), hidden * row(inter), row(inter)};
  p.x_stride = strides[0];
  p.up_stride_e = strides[1];
  p.up_stride_n = strides[2];
  p.down_stride_e = strides[3];
  p.down_stride_n = strides[4];
  const auto at_offset = [&](uintptr_t base) {
    return reinterpret_cast<const void*>(base + uintptr_t(pointer_offset));
  };
  p.x = at_offset(1 << 20);
  p.w_up = at_offset(2 << 20);
  p.w_down = at_offset(3 << 20);
  switch (tt::moe_cuda_path(p)) {
    case tt::MoeCudaPath::kMma: return "mma";
    case tt::MoeCudaPath::kSimt: return "simt";
    case tt::MoeCudaPath::kUnsupported: break;
  }
  return "unsupported";
}

}  // namespace

// No tensor arguments: registered as CompositeExplicitAutograd (any build).
TORCH_LIBRARY_IMPL(twotower, CompositeExplicitAutograd, m) { m.impl("cuda_moe_path", &cuda_moe_path_op); }
