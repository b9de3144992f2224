// Torch-side adapter of lm_head_unmask: argument checks (messages name the argument), the plan (positions, gathered
// hidden rows, instruction set), the threads' split and the registration. The schema is in csrc/registry.cpp, the
// kernel and its numerics in lm_head_unmask.h.
//
// lm_head_unmask(hidden [B, S, K] fp32|bf16 (last dim contiguous), w: the LM head packed (linear.h) in hidden's
//   dtype, n = V, x [B, S] int64 (in place), mask_id, then threshold_unmask's per-row tensors, kept, counts, done,
//   logprob, and logits_out [B, S, V] in hidden's dtype (contiguous, optional: receives every position's logits)).
//   CPU only: on CUDA ops.lm_head_unmask composes F.linear and threshold_unmask.
// TWOTOWER_LINEAR_CPU_ISA forces the instruction set as for linear (TWOTOWER_LINEAR_CPU_GEMM does not apply: the
// fused op always runs the micro kernel).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/cpu_isa_torch.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"
#include "linear/linear_torch.h"
#include "lm_head_unmask/lm_head_unmask.h"
#include "threshold_unmask/threshold_unmask_torch.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

void check_head(const Tensor& hidden, const Tensor& w, int64_t n) {
  TORCH_CHECK_TYPE(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16,
                   "twotower: hidden must be float32 or bfloat16, got ", hidden.scalar_type());
  TORCH_CHECK(hidden.dim() == 3, "twotower: hidden must be [batch, seq, hidden_size] (3-D), got shape ",
              hidden.sizes());
  TORCH_CHECK(hidden.size(1) >= 1 && hidden.size(1) <= tt::kUnmaskMaxSeq, "twotower: hidden's seq dim must be in [1, ",
              tt::kUnmaskMaxSeq, "], got shape ", hidden.sizes());
  check_last_dim_contiguous(hidden, "hidden");
  TORCH_CHECK_VALUE(n >= 2 && n <= INT32_MAX, "twotower: n (the vocabulary size) must be in [2, 2^31), got ", n);
  check_packed_weight(w, "w", n, hidden.size(-1), "hidden's K", hidden, "hidden", "the LM head");
}

void lm_head_unmask_cpu(const Tensor& hidden, const Tensor& w, int64_t n, const Tensor& x, int64_t mask_id,
                        const Tensor& gamma, const Tensor& step, const Tensor& steps_per_block,
                        const Tensor& temperature, const Tensor& seed, const Tensor& block,
                        const std::optional<Tensor>& kept, const Tensor& counts, const Tensor& done,
                        const std::optional<Tensor>& logprob, const std::optional<Tensor>& logits_out) {
  check_head(hidden, w, n);
  const int64_t B = hidden.size(0), S = hidden.size(1), K = hidden.size(2);
  const UnmaskRowTensors rows{gamma, step, steps_per_block, temperature, seed, block, kept};
  tt::LmHeadUnmaskParams p{};
  p.unmask = plan_unmask_commit(hidden, "hidden", S, n, x, mask_id, rows, counts, done, logprob);
  p.unmask.dtype = kernel_dtype(hidden, "hidden");
  p.unmask.slice_width = tt::kUnmaskCpuSliceWidth;
  if (logits_out.has_value()) {
    check_dtype(*logits_out, hidden.scalar_type(), "logits_out");
    check_same_device(*logits_out, "logits_out", hidden, "hidden");
    TORCH_CHECK(logits_out->dim() == 3 && logits_out->size(0) == B && logits_out->size(1) == S &&
                logits_out->size(2) == n && logits_out->is_contiguous(), "twotower: logits_out must be a contiguous "
                "[batch, seq, n] = [", B, ", ", S, ", ", n, "] tensor, got ", logits_out->is_contiguous() ? "" :
                "a non-contiguous ", "shape ", logits_out->sizes());
    p.head.y = logits_out->data_ptr();
    p.head.y_stride = n;
  }
  check_row_values(p.unmask, "");
  if (B == 0) return;
  // The positions to compute, and their hidden rows gathered (committed rows are never read).
  const Tensor pos = at::empty({B * S}, x.options().dtype(at::kInt));
  p.rows = pos.data_ptr<int32_t>();
  p.num_rows = tt::lm_head_unmask_rows(p, pos.data_ptr<int32_t>());
  const Tensor xr = at::index_select(hidden.reshape({B * S, K}), 0, pos.narrow(0, 0, p.num_rows));
  p.head.x = xr.data_ptr();
  p.head.x_stride = K;
  p.head.w = w.data_ptr();
  p.head.M = p.num_rows;
  p.head.N = n;
  p.head.K = K;
  p.head.dtype = p.unmask.dtype;
  p.isa = tt::linear_cpu_plan(p.num_rows, n, K, p.head.dtype,
                              cpu_isa_from_env("TWOTOWER_LINEAR_CPU_ISA", tt::CpuIsa::kAmx), 1).isa;
  Tensor xa;
  if (p.isa == tt::CpuIsa::kAmx && p.head.dtype == tt::DType::kBFloat16) {
    xa = at::empty({tt::linear_amx_x_elems(p.num_rows, K)}, hidden.options());
    tt::linear_amx_pad_x(p.head, static_cast<uint16_t*>(xa.data_ptr()));
    p.head.x_amx = static_cast<const uint16_t*>(xa.data_ptr());
  }
  // Phase 1 over (slice, group) items: each reads a slice of the head's weight once for its group's rows (re-read
  // from the cache per 8 rows, as the linear's blocks do) and scans their logits; then phase 2 as threshold_unmask.
  const int64_t ns = tt::unmask_num_slices(p.unmask), items = tt::lm_head_unmask_items(p);
  const int64_t group = std::min(p.num_rows, tt::lm_head_unmask_group_rows(p.head.dtype));
  const int64_t work = p.unmask.slice_width * (K * int64_t(xr.element_size()) * (1 + group / 8) / 16 + group);
  std::vector<tt::UnmaskState> states(B * S * ns);
  std::vector<uint8_t> bad(B * S * ns);
  tt::parallel_chunks(items, work, [&](int64_t b, int64_t e) {
    check_status(tt::lm_head_unmask_scan_cpu(p, states.data(), bad.data(), b, e), "lm_head_unmask");
  });
  finish_unmask_cpu(p.unmask, states, bad, "lm_head_unmask's logits (hidden @ w^T)");
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("lm_head_unmask", &lm_head_unmask_cpu); }
