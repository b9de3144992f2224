// The one binding file: every op's TORCH_LIBRARY schema, argument checks and CPU / CUDA registrations.
// Everything below csrc/<op>/ is torch-free; this file maps tensors onto the kernels' params structs.
// Each op has a section (schema in the TORCH_LIBRARY block, implementation functions, registrations).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifdef TWOTOWER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "merge_state/merge_state.h"

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------------
// Shared checks: every message names the argument and what was expected.

tt::DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return tt::DType::kFloat32;
    case at::kBFloat16: return tt::DType::kBFloat16;
    case at::kHalf: return tt::DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "twotower: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_dtype(const Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "twotower: ", name, " must be ", want, ", got ", t.scalar_type());
}

void check_same_device(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "twotower: ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

void check_last_dim_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "twotower: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

void check_status(tt::Status s, const char* op) {
  TORCH_CHECK(s == tt::Status::kOk, "twotower: ", op, " kernel failed: ", tt::status_str(s));
}

#ifdef TWOTOWER_WITH_CUDA
void* current_stream(const Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}
#endif

// ---------------------------------------------------------------------------------------------------
// merge_states(o [P, *rows, D], lse [P, *rows] fp32) -> (out [*rows, D], lse_out [*rows] fp32)

struct MergeStatesPlan {
  tt::MergeStatesParams p;
  Tensor o3, lse2, out, lse_out;  // keep-alive for views / copies the params point into
};

MergeStatesPlan plan_merge_states(const Tensor& o, const Tensor& lse) {
  MergeStatesPlan plan;
  auto& p = plan.p;
  p.dtype = kernel_dtype(o, "o");
  check_dtype(lse, at::kFloat, "lse");
  check_same_device(o, "o", lse, "lse");
  TORCH_CHECK(o.dim() >= 2, "twotower: o must be [parts, ..., head_dim] (at least 2-D), got shape ", o.sizes());
  TORCH_CHECK(lse.dim() == o.dim() - 1 && lse.sizes() == o.sizes().slice(0, o.dim() - 1),
              "twotower: lse must have o's shape without the last dim, i.e. ", o.sizes().slice(0, o.dim() - 1),
              ", got ", lse.sizes());
  TORCH_CHECK(o.size(0) >= 1, "twotower: o must hold at least one part (dim 0), got shape ", o.sizes());
  check_last_dim_contiguous(o, "o");
  // Collapse the row dims; flatten() only copies when the row dims cannot be viewed as one.
  plan.o3 = o.dim() == 2 ? o.unsqueeze(1) : o.flatten(1, -2);
  plan.lse2 = lse.dim() == 1 ? lse.unsqueeze(1) : lse.flatten(1, -1);
  auto rows = o.sizes().slice(1, o.dim() - 2).vec();
  auto out_shape = rows;
  out_shape.push_back(o.size(-1));
  plan.out = at::empty(out_shape, o.options());
  plan.lse_out = at::empty(rows, lse.options());
  p.o = plan.o3.data_ptr();
  p.lse = plan.lse2.data_ptr<float>();
  p.out = plan.out.data_ptr();
  p.lse_out = plan.lse_out.data_ptr<float>();
  p.num_parts = plan.o3.size(0);
  p.num_rows = plan.o3.size(1);
  p.head_dim = plan.o3.size(2);
  p.o_part_stride = plan.o3.stride(0);
  p.o_row_stride = plan.o3.stride(1);
  p.lse_part_stride = plan.lse2.stride(0);
  p.lse_row_stride = plan.lse2.stride(1);
  p.out_row_stride = p.head_dim;
  return plan;
}

std::tuple<Tensor, Tensor> merge_states_cpu(const Tensor& o, const Tensor& lse) {
  auto plan = plan_merge_states(o, lse);
  const auto& p = plan.p;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.num_parts * p.head_dim));
  at::parallel_for(0, p.num_rows, grain, [&](int64_t b, int64_t e) {
    check_status(tt::merge_states_cpu(p, b, e), "merge_states");
  });
  return {plan.out, plan.lse_out};
}

#ifdef TWOTOWER_WITH_CUDA
std::tuple<Tensor, Tensor> merge_states_cuda(const Tensor& o, const Tensor& lse) {
  c10::cuda::CUDAGuard guard(o.device());
  auto plan = plan_merge_states(o, lse);
  check_status(tt::merge_states_cuda(plan.p, current_stream(o)), "merge_states");
  return {plan.out, plan.lse_out};
}
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Registry: schemas first, then one registration block per dispatch key.

TORCH_LIBRARY(twotower, m) {
  m.def("merge_states(Tensor o, Tensor lse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(twotower, CPU, m) {
  m.impl("merge_states", &merge_states_cpu);
}

#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) {
  m.impl("merge_states", &merge_states_cuda);
}
#endif

// A plain module: the ops register themselves with the dispatcher when the library is loaded, so this
// needs no libtorch_python and builds against the stable ABI (one _C.abi3.so for every CPython >= 3.9).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "twotower_ext kernels (ops live in torch.ops.twotower)",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
