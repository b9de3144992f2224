// cuda_moe_path(...): which grouped-GEMM kernel a CUDA moe_experts call with these shapes, strides, weight format
// and pointer alignment gets, and cuda_moe_plan(...): the rest of its plan on a given GPU (the pure host functions
// tt::moe_cuda_path / tt::moe_cuda_plan of moe_cuda_plan.h, the ones the CUDA launcher calls), on any build and
// machine: the plan is testable without a GPU.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "common/torch_checks.h"
#include "moe/moe_cuda_plan.h"

namespace {

using namespace tt::torch_glue;

tt::MoeWeightFormat moe_format_by_name(const std::string& format) {
  TORCH_CHECK_VALUE(format == "dense" || format == "fp8" || format == "int4",
                    "twotower: format must be dense, fp8 or int4, got '", format, "'");
  return format == "fp8" ? tt::MoeWeightFormat::kFp8 : format == "int4" ? tt::MoeWeightFormat::kInt4
                                                                         : tt::MoeWeightFormat::kDense;
}

tt::DType moe_dtype_of(at::ScalarType t, const char* name) {
  return kernel_dtype(at::empty({0}, at::TensorOptions().dtype(t)), name);
}

// Params of a call with contiguous tensors (strides in storage units; int4 packs two k per byte) at 256-byte
// aligned addresses (the allocator's), the format's default scale dtype.
tt::MoeParams moe_plan_params(at::ScalarType dtype, const std::string& format, int64_t hidden, int64_t inter,
                              int64_t group_size) {
  TORCH_CHECK_VALUE(hidden >= 1 && inter >= 1, "twotower: hidden and inter must be >= 1, got ", hidden, " and ", inter);
  tt::MoeParams p{};
  p.dtype = moe_dtype_of(dtype, "dtype");
  p.format = moe_format_by_name(format);
  p.hidden = hidden;
  p.inter = inter;
  p.group = group_size;
  p.scale_dtype = p.format == tt::MoeWeightFormat::kInt4 ? tt::DType::kBFloat16 : tt::DType::kFloat32;
  const auto row = [&](int64_t k) { return p.format == tt::MoeWeightFormat::kInt4 ? (k + 1) / 2 : k; };
  p.x_stride = hidden;
  p.up_stride_e = inter * row(hidden);
  p.up_stride_n = row(hidden);
  p.down_stride_e = hidden * row(inter);
  p.down_stride_n = row(inter);
  p.x = reinterpret_cast<const void*>(uintptr_t(1) << 20);
  p.w_up = reinterpret_cast<const void*>(uintptr_t(2) << 20);
  p.w_down = reinterpret_cast<const void*>(uintptr_t(3) << 20);
  return p;
}

// cuda_moe_path(dtype, format, hidden, inter, group_size, scale_dtype, strides, pointer_offset) -> "mma" | "simt" |
// "unsupported". format: dense | fp8 | int4; scale_dtype defaults to the format's (fp8: float32, int4: bfloat16);
// strides = [x_stride, up_stride_e, up_stride_n, down_stride_e, down_stride_n] in storage units (elements of x's
// dtype when dense, bytes when quantised), default contiguous; pointer_offset: bytes added to x, w_up and w_down's
// (otherwise 256-byte aligned) addresses.
std::string cuda_moe_path_op(at::ScalarType dtype, std::string format, int64_t hidden, int64_t inter,
                             int64_t group_size, std::optional<at::ScalarType> scale_dtype,
                             std::vector<int64_t> strides, int64_t pointer_offset) {
  tt::MoeParams p = moe_plan_params(dtype, format, hidden, inter, group_size);
  TORCH_CHECK_VALUE(strides.empty() || strides.size() == 5, "twotower: strides must be [x_stride, up_stride_e, "
                    "up_stride_n, down_stride_e, down_stride_n] or empty, got ", strides.size(), " values");
  if (scale_dtype) p.scale_dtype = moe_dtype_of(*scale_dtype, "scale_dtype");
  if (!strides.empty()) {
    p.x_stride = strides[0];
    p.up_stride_e = strides[1];
    p.up_stride_n = strides[2];
    p.down_stride_e = strides[3];
    p.down_stride_n = strides[4];
  }
  const auto at_offset = [&](const void* base) {
    return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + uintptr_t(pointer_offset));
  };
  p.x = at_offset(p.x);
  p.w_up = at_offset(p.w_up);
  p.w_down = at_offset(p.w_down);
  switch (tt::moe_cuda_path(p)) {
    case tt::MoeCudaPath::kMma: return "mma";
    case tt::MoeCudaPath::kSimt: return "simt";
    case tt::MoeCudaPath::kUnsupported: break;
  }
  return "unsupported";
}

// cuda_moe_plan(dtype, format, hidden, inter, experts, topk, tokens, group_size, cc, num_sms, smem_optin,
// smem_per_sm) -> [path (-1 unsupported, 0 simt, 1 mma), chunk_tokens, chunks, workspace_bytes, fused_route,
// launches, bm, stages, k_tile, gemm_smem, route_smem, ctas_per_sm, up_bytes_in_flight_per_sm,
// down_bytes_in_flight_per_sm]: the plan of a call with contiguous tensors on a GPU of compute capability cc with
// num_sms SMs (its shared memory from the known parts, or smem_optin / smem_per_sm when given).
std::vector<double> cuda_moe_plan_op(at::ScalarType dtype, std::string format, int64_t hidden, int64_t inter,
                                     int64_t experts, int64_t topk, int64_t tokens, int64_t group_size, int64_t cc,
                                     int64_t num_sms, int64_t smem_optin, int64_t smem_per_sm) {
  TORCH_CHECK_VALUE(experts >= 1 && topk >= 0 && topk <= experts && tokens >= 0,
                    "twotower: cuda_moe_plan needs experts >= 1, 0 <= topk <= experts and tokens >= 0, got experts ",
                    experts, ", topk ", topk, ", tokens ", tokens);
  tt::MoeParams p = moe_plan_params(dtype, format, hidden, inter, group_size);
  p.experts = experts;
  p.topk = topk;
  p.tokens = tokens;
  auto dev = tt::ba_cuda_known_device(int(cc), int(num_sms));
  if (smem_optin > 0) dev.smem_optin = smem_optin;
  if (smem_per_sm > 0) dev.smem_per_sm = smem_per_sm;
  const auto pl = tt::moe_cuda_plan(p, dev);
  return {double(int32_t(pl.path)), double(pl.chunk_tokens), double(pl.chunks), double(pl.workspace_bytes),
          pl.fused_route ? 1.0 : 0.0, double(pl.launches), double(pl.bm), double(pl.stages), double(pl.k_tile),
          double(pl.gemm_smem), double(pl.route_smem), double(pl.ctas_per_sm),
          tt::moe_cuda_bytes_in_flight_per_sm(p, pl, dev, true), tt::moe_cuda_bytes_in_flight_per_sm(p, pl, dev, false)};
}

}  // namespace

// No tensor arguments: registered as CompositeExplicitAutograd (any build).
TORCH_LIBRARY_IMPL(twotower, CompositeExplicitAutograd, m) {
  m.impl("cuda_moe_path", &cuda_moe_path_op);
  m.impl("cuda_moe_plan", &cuda_moe_plan_op);
}
