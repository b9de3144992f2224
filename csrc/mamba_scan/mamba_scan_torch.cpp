// Torch-side adapter of mamba_block_scan: argument checks (messages name the argument), the plan that fills the
// kernel's params struct, the CPU / CUDA entry points and their registrations. The schema is in csrc/registry.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "mamba_scan/mamba_scan.h"
#include "common/call_scratch_cpu.h"
#include "common/cpu_isa_torch.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

// ---------------------------------------------------------------------------------------------------
// mamba_block_scan(xBC [B,L,C], dt [B,L,H], conv_state [B,K-1,C], ssm_state [B,H,P,N] fp32, conv_weight [C,K],
//                  conv_bias [C]?, dt_bias/A_log/D [H] fp32, seq_lens int32 [B]?, dt_min, dt_max,
//                  conv_state_out?, ssm_state_out?) -> y [B,L,H*P]

struct MambaScanPlan {
  tt::MambaScanParams p;
  Tensor y;
};

void scan_check_shape(const Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "twotower: ", name, " must have shape ", want, ", got ", t.sizes());
}

void scan_check_fp32_vector(const Tensor& t, const char* name, int64_t n, const Tensor& ref) {
  check_dtype(t, at::kFloat, name);
  check_same_device(t, name, ref, "xBC");
  scan_check_shape(t, name, {n});
  TORCH_CHECK(t.is_contiguous(), "twotower: ", name, " must be contiguous");
}

void scan_check_ssm_state(const Tensor& t, const char* name, at::IntArrayRef want, const Tensor& ref) {
  check_dtype(t, at::kFloat, name);
  check_same_device(t, name, ref, "xBC");
  scan_check_shape(t, name, want);
  TORCH_CHECK(t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(1) == t.size(2) * t.size(3),
              "twotower: ", name, " must be contiguous in its last three dims [H, P, N], got strides ", t.strides());
}

void scan_check_conv_state(const Tensor& t, const char* name, at::IntArrayRef want, const Tensor& ref) {
  check_dtype(t, ref.scalar_type(), name);
  check_same_device(t, name, ref, "xBC");
  scan_check_shape(t, name, want);
  check_last_dim_contiguous(t, name);
}

MambaScanPlan plan_mamba_block_scan(const Tensor& xbc, const Tensor& dt, const Tensor& conv_state,
                                    const Tensor& ssm_state, const Tensor& conv_weight,
                                    const std::optional<Tensor>& conv_bias, const Tensor& dt_bias,
                                    const Tensor& A_log, const Tensor& D, const std::optional<Tensor>& seq_lens,
                                    double dt_min, double dt_max, const std::optional<Tensor>& conv_state_out,
                                    const std::optional<Tensor>& ssm_state_out) {
  MambaScanPlan plan;
  auto& p = plan.p;
  p.dtype = kernel_dtype(xbc, "xBC");
  TORCH_CHECK(xbc.dim() == 3, "twotower: xBC must be [batch, tokens, conv_dim], got shape ", xbc.sizes());
  TORCH_CHECK(ssm_state.dim() == 4, "twotower: ssm_state must be [batch, heads, head_dim, state], got shape ",
              ssm_state.sizes());
  TORCH_CHECK(conv_weight.dim() == 2, "twotower: conv_weight must be [conv_dim, kernel], got shape ",
              conv_weight.sizes());
  const int64_t B = xbc.size(0), L = xbc.size(1), C = xbc.size(2);
  const int64_t H = ssm_state.size(1), P = ssm_state.size(2), N = ssm_state.size(3), K = conv_weight.size(1);
  TORCH_CHECK(H > 0 && P > 0 && N > 0 && K > 0, "twotower: ssm_state and conv_weight must have non-zero heads, ",
              "head_dim, state and kernel, got ssm_state ", ssm_state.sizes(), " and conv_weight ", conv_weight.sizes());
  const int64_t rest = C - H * P;
  TORCH_CHECK(rest > 0 && rest % (2 * N) == 0 && H % (rest / (2 * N)) == 0, "twotower: xBC's last dim (", C,
              ") must be heads*head_dim + 2*groups*state = ", H, "*", P, " + 2*groups*", N,
              " with groups dividing heads");
  const int64_t G = rest / (2 * N);
  check_last_dim_contiguous(xbc, "xBC");
  check_dtype(dt, xbc.scalar_type(), "dt");
  check_same_device(dt, "dt", xbc, "xBC");
  scan_check_shape(dt, "dt", {B, L, H});
  check_last_dim_contiguous(dt, "dt");
  scan_check_conv_state(conv_state, "conv_state", {B, K - 1, C}, xbc);
  scan_check_ssm_state(ssm_state, "ssm_state", {B, H, P, N}, xbc);
  check_dtype(conv_weight, xbc.scalar_type(), "conv_weight");
  check_same_device(conv_weight, "conv_weight", xbc, "xBC");
  scan_check_shape(conv_weight, "conv_weight", {C, K});
  TORCH_CHECK(conv_weight.is_contiguous(), "twotower: conv_weight must be contiguous");
  if (conv_bias) {
    check_dtype(*conv_bias, xbc.scalar_type(), "conv_bias");
    check_same_device(*conv_bias, "conv_bias", xbc, "xBC");
    scan_check_shape(*conv_bias, "conv_bias", {C});
    TORCH_CHECK(conv_bias->is_contiguous(), "twotower: conv_bias must be contiguous");
  }
  scan_check_fp32_vector(dt_bias, "dt_bias", H, xbc);
  scan_check_fp32_vector(A_log, "A_log", H, xbc);
  scan_check_fp32_vector(D, "D", H, xbc);
  if (seq_lens) {
    check_dtype(*seq_lens, at::kInt, "seq_lens");
    check_same_device(*seq_lens, "seq_lens", xbc, "xBC");
    scan_check_shape(*seq_lens, "seq_lens", {B});
    TORCH_CHECK(seq_lens->is_contiguous(), "twotower: seq_lens must be contiguous");
  }
  TORCH_CHECK_VALUE(!(dt_min > dt_max), "twotower: dt_min must be <= dt_max, got ", dt_min, " > ", dt_max);
  if (conv_state_out) scan_check_conv_state(*conv_state_out, "conv_state_out", {B, K - 1, C}, xbc);
  if (ssm_state_out) scan_check_ssm_state(*ssm_state_out, "ssm_state_out", {B, H, P, N}, xbc);

  plan.y = at::empty({B, L, H * P}, xbc.options());
  p.xbc = xbc.data_ptr();
  p.dt = dt.data_ptr();
  p.conv_state_in = conv_state.data_ptr();
  p.ssm_state_in = ssm_state.data_ptr<float>();
  p.conv_weight = conv_weight.data_ptr();
  p.conv_bias = conv_bias ? conv_bias->data_ptr() : nullptr;
  p.dt_bias = dt_bias.data_ptr<float>();
  p.A_log = A_log.data_ptr<float>();
  p.D = D.data_ptr<float>();
  p.seq_lens = seq_lens ? seq_lens->data_ptr<int32_t>() : nullptr;
  p.y = plan.y.data_ptr();
  p.conv_state_out = conv_state_out ? conv_state_out->data_ptr() : nullptr;
  p.ssm_state_out = ssm_state_out ? ssm_state_out->data_ptr<float>() : nullptr;
  p.batch = B; p.seqlen = L; p.nheads = H; p.headdim = P; p.dstate = N; p.ngroups = G; p.conv_dim = C; p.kernel = K;
  p.xbc_batch_stride = xbc.stride(0);
  p.xbc_tok_stride = xbc.stride(1);
  p.dt_batch_stride = dt.stride(0);
  p.dt_tok_stride = dt.stride(1);
  p.cs_in_batch_stride = conv_state.stride(0);
  p.cs_in_tap_stride = conv_state.stride(1);
  p.cs_out_batch_stride = conv_state_out ? conv_state_out->stride(0) : 0;
  p.cs_out_tap_stride = conv_state_out ? conv_state_out->stride(1) : 0;
  p.ssm_in_batch_stride = ssm_state.stride(0);
  p.ssm_out_batch_stride = ssm_state_out ? ssm_state_out->stride(0) : 0;
  p.dt_min = float(dt_min);
  p.dt_max = float(dt_max);
  return plan;
}

Tensor mamba_block_scan_cpu(const Tensor& xbc, const Tensor& dt, const Tensor& conv_state, const Tensor& ssm_state,
                            const Tensor& conv_weight, const std::optional<Tensor>& conv_bias, const Tensor& dt_bias,
                            const Tensor& A_log, const Tensor& D, const std::optional<Tensor>& seq_lens, double dt_min,
                            double dt_max, const std::optional<Tensor>& conv_state_out,
                            const std::optional<Tensor>& ssm_state_out) {
  auto plan = plan_mamba_block_scan(xbc, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                    seq_lens, dt_min, dt_max, conv_state_out, ssm_state_out);
  const auto& p = plan.p;
  const tt::CpuIsa isa = cpu_isa_from_env("TWOTOWER_SCAN_CPU_ISA", tt::CpuIsa::kAvx512);
  // The activated conv output of every live token, fp32 (common/call_scratch_cpu.h: no per-call allocation).
  struct ActTag;
  const tt::CallScratch<float, ActTag> scratch(size_t(p.batch * p.seqlen * p.conv_dim));
  float* act = scratch.data();
  // Conv items (row, channel block), then (row, head) scan items once every conv item is done. Each runs inline
  // for an AR step or a small model's block and splits dynamically for a wide model or a prompt
  // (common/parallel_cpu.h); work per item in elements of about the same cost.
  tt::parallel_chunks(p.batch * tt::mamba_conv_blocks(p), p.seqlen * tt::kMambaConvBlock * p.kernel,
                      [&](int64_t b, int64_t e) { check_status(tt::mamba_conv_cpu(p, act, b, e), "mamba_block_scan"); });
  tt::parallel_chunks(p.batch * p.nheads, p.seqlen * p.headdim * p.dstate, [&](int64_t b, int64_t e) {
    check_status(tt::mamba_scan_cpu(p, isa, act, b, e), "mamba_block_scan");
  });
  return plan.y;
}

#ifdef TWOTOWER_WITH_CUDA
Tensor mamba_block_scan_cuda(const Tensor& xbc, const Tensor& dt, const Tensor& conv_state, const Tensor& ssm_state,
                             const Tensor& conv_weight, const std::optional<Tensor>& conv_bias, const Tensor& dt_bias,
                             const Tensor& A_log, const Tensor& D, const std::optional<Tensor>& seq_lens, double dt_min,
                             double dt_max, const std::optional<Tensor>& conv_state_out,
                             const std::optional<Tensor>& ssm_state_out) {
  c10::cuda::CUDAGuard guard(xbc.device());
  auto plan = plan_mamba_block_scan(xbc, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                    seq_lens, dt_min, dt_max, conv_state_out, ssm_state_out);
  TORCH_CHECK(tt::mamba_scan_cuda_supports(plan.p.headdim, plan.p.dstate), "twotower: mamba_block_scan on CUDA ",
              "supports state <= 512 and head_dim * (threads per state row) <= 512, got head_dim ",
              plan.p.headdim, " and state ", plan.p.dstate);
  TORCH_CHECK(tt::mamba_scan_cuda_grid_ok(plan.p.batch, plan.p.nheads), "twotower: mamba_block_scan on CUDA ",
              "supports batch * heads <= 2^31 - 1, got ", plan.p.batch, " * ", plan.p.nheads);
  check_status(tt::mamba_scan_cuda(plan.p, current_stream(xbc)), "mamba_block_scan");
  return plan.y;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("mamba_block_scan", &mamba_block_scan_cpu); }
#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) { m.impl("mamba_block_scan", &mamba_block_scan_cuda); }
#endif
