// Torch-side adapter of merge_states: argument checks (messages name the argument), the plan that fills the
// kernel's params struct, the CPU / CUDA entry points and their registrations. The schema is in csrc/registry.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "merge_state/merge_state.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

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
  // Rows of num_parts x head_dim elements each: inline unless there are many.
  tt::parallel_chunks(p.num_rows, p.num_parts * p.head_dim, [&](int64_t b, int64_t e) {
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

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("merge_states", &merge_states_cpu); }
#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) { m.impl("merge_states", &merge_states_cuda); }
#endif
