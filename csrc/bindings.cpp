// The one binding file: every op's TORCH_LIBRARY schema, argument checks and CPU / CUDA registrations.
// Everything below csrc/<op>/ is torch-free; this file maps tensors onto the kernels' params structs.
// Each op has a section (schema in the TORCH_LIBRARY block, implementation functions, registrations).
#include <Python.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/native/CPUBlas.h>  // block_attention: brgemm / pack
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#ifdef TWOTOWER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "mamba_scan/mamba_scan.h"
#include "block_attention/block_attention.h"
#include "merge_state/merge_state.h"
#include "threshold_unmask/threshold_unmask.h"

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
  const int64_t work = std::max<int64_t>(1, p.seqlen * p.headdim * p.dstate);
  at::parallel_for(0, p.batch * p.nheads, std::max<int64_t>(1, 32768 / work), [&](int64_t b, int64_t e) {
    check_status(tt::mamba_scan_cpu(p, b, e), "mamba_block_scan");
  });
  // The conv state is rewritten only after every (row, head) item has read it: it may be the input too.
  at::parallel_for(0, p.batch, 1, [&](int64_t b, int64_t e) {
    check_status(tt::mamba_conv_state_update_cpu(p, b, e), "mamba_block_scan");
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
  check_status(tt::mamba_scan_cuda(plan.p, current_stream(xbc)), "mamba_block_scan");
  return plan.y;
}
#endif

// ---------------------------------------------------------------------------------------------------
// block_attention(q [B,S,Hq,D], k_blk, v_blk [B,S,Hkv,D], k_ctx, v_ctx [B,Lmax,Hkv,D], ctx_lens int32 [B],
//                 scale?) -> (out [B,S,Hq,D], lse [B,Hq,S] fp32)
// block_attention_out(..., scale?, out) -> lse: the same, written into a caller's out (any strides, last dim
// contiguous). Every path reads all inputs before it writes out, so out may even be q.

struct BlockAttentionPlan {
  tt::BlockAttentionParams p;
  Tensor ctx_lens, out, lse;  // keep-alive
};

void attn_check_shape(const Tensor& t, const char* name, at::IntArrayRef want, const char* layout) {
  TORCH_CHECK(t.sizes() == want, "twotower: ", name, " must be ", layout, " = ", want, ", got ", t.sizes());
}

BlockAttentionPlan plan_block_attention(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk, const Tensor& k_ctx,
                                        const Tensor& v_ctx, const Tensor& ctx_lens, std::optional<double> scale,
                                        const Tensor* out = nullptr) {
  BlockAttentionPlan plan;
  auto& p = plan.p;
  p.dtype = kernel_dtype(q, "q");
  const std::pair<const Tensor*, const char*> kv[] = {{&k_blk, "k_blk"}, {&v_blk, "v_blk"}, {&k_ctx, "k_ctx"},
                                                      {&v_ctx, "v_ctx"}};
  for (const auto& [t, name] : kv) {
    check_dtype(*t, q.scalar_type(), name);
    check_same_device(*t, name, q, "q");
  }
  check_dtype(ctx_lens, at::kInt, "ctx_lens");
  check_same_device(ctx_lens, "ctx_lens", q, "q");
  TORCH_CHECK(q.dim() == 4, "twotower: q must be [batch, block_len, q_heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k_blk.dim() == 4, "twotower: k_blk must be [batch, block_len, kv_heads, head_dim], got shape ",
              k_blk.sizes());
  TORCH_CHECK(k_ctx.dim() == 4, "twotower: k_ctx must be [batch, ctx_capacity, kv_heads, head_dim], got shape ",
              k_ctx.sizes());
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k_blk.size(2), L = k_ctx.size(1);
  TORCH_CHECK(S >= 1 && Hq >= 1 && D >= 1, "twotower: q must have block_len, q_heads and head_dim >= 1, got shape ",
              q.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "twotower: q_heads (", Hq, ") must be a multiple of kv_heads (", Hkv,
              ", k_blk dim 2)");
  attn_check_shape(k_blk, "k_blk", {B, S, Hkv, D}, "[batch, block_len, kv_heads, head_dim]");
  attn_check_shape(v_blk, "v_blk", {B, S, Hkv, D}, "[batch, block_len, kv_heads, head_dim]");
  attn_check_shape(k_ctx, "k_ctx", {B, L, Hkv, D}, "[batch, ctx_capacity, kv_heads, head_dim]");
  attn_check_shape(v_ctx, "v_ctx", {B, L, Hkv, D}, "[batch, ctx_capacity, kv_heads, head_dim]");
  attn_check_shape(ctx_lens, "ctx_lens", {B}, "[batch]");
  for (const auto& [t, name] : kv) check_last_dim_contiguous(*t, name);
  check_last_dim_contiguous(q, "q");
  const double sc = scale.value_or(1.0 / std::sqrt(double(D)));
  TORCH_CHECK_VALUE(std::isfinite(sc), "twotower: scale must be finite, got ", sc);

  plan.ctx_lens = ctx_lens.contiguous();
  if (out != nullptr) {
    check_dtype(*out, q.scalar_type(), "out");
    check_same_device(*out, "out", q, "q");
    attn_check_shape(*out, "out", {B, S, Hq, D}, "[batch, block_len, q_heads, head_dim] (q's shape)");
    check_last_dim_contiguous(*out, "out");
    plan.out = *out;
  } else {
    plan.out = at::empty({B, S, Hq, D}, q.options());
  }
  plan.lse = at::empty({B, Hq, S}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k_blk = k_blk.data_ptr();
  p.v_blk = v_blk.data_ptr();
  p.k_ctx = k_ctx.data_ptr();
  p.v_ctx = v_ctx.data_ptr();
  p.ctx_lens = plan.ctx_lens.data_ptr<int32_t>();
  p.out = plan.out.data_ptr();
  p.lse = plan.lse.data_ptr<float>();
  p.batch = B; p.block_len = S; p.num_q_heads = Hq; p.num_kv_heads = Hkv; p.head_dim = D; p.ctx_capacity = L;
  p.q_stride_b = q.stride(0); p.q_stride_s = q.stride(1); p.q_stride_h = q.stride(2);
  p.kb_stride_b = k_blk.stride(0); p.kb_stride_s = k_blk.stride(1); p.kb_stride_h = k_blk.stride(2);
  p.vb_stride_b = v_blk.stride(0); p.vb_stride_s = v_blk.stride(1); p.vb_stride_h = v_blk.stride(2);
  p.kc_stride_b = k_ctx.stride(0); p.kc_stride_l = k_ctx.stride(1); p.kc_stride_h = k_ctx.stride(2);
  p.vc_stride_b = v_ctx.stride(0); p.vc_stride_l = v_ctx.stride(1); p.vc_stride_h = v_ctx.stride(2);
  p.o_stride_b = plan.out.stride(0); p.o_stride_s = plan.out.stride(1); p.o_stride_h = plan.out.stride(2);
  p.lse_stride_b = plan.lse.stride(0); p.lse_stride_h = plan.lse.stride(1);
  p.scale = float(sc);
  return plan;
}

// The CPU kernel's GEMM callback: C[M,N] (+)= A[M,K] @ B[K,N] on ATen's matrix libraries. fp32 goes to
// MKL/oneDNN sgemm through at::mm_out on views; bf16/fp16 to cpublas::brgemm (oneDNN's AMX ukernel, with B
// packed to VNNI, where the CPU has one).
struct AttnGemmCtx {
  bool vnni;
};

void attn_gemm(void* ctx, tt::DType dt, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B,
               int64_t ldb, bool trans_b, float* C, int64_t ldc, bool accumulate) {
  using at::native::cpublas::brgemm;
  const bool vnni = static_cast<AttnGemmCtx*>(ctx)->vnni;
  const auto st = dt == tt::DType::kFloat32 ? at::kFloat : dt == tt::DType::kBFloat16 ? at::kBFloat16 : at::kHalf;
  auto a = at::from_blob(const_cast<void*>(A), {M, K}, {lda, 1}, st);
  auto b = trans_b ? at::from_blob(const_cast<void*>(B), {N, K}, {ldb, 1}, st).t()
                   : at::from_blob(const_cast<void*>(B), {K, N}, {ldb, 1}, st);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, at::kFloat);
  if (dt == tt::DType::kFloat32 || (vnni && K % 2 != 0)) {
    // fp32 operands, or VNNI pairs that an odd K cannot fill: widen (exact) and use sgemm.
    if (dt != tt::DType::kFloat32) {
      a = a.to(at::kFloat);
      b = b.to(at::kFloat);
    }
    accumulate ? at::addmm_out(c, c, a, b) : at::mm_out(c, a, b);
    return;
  }
  if (trans_b) b = b.contiguous();  // brgemm takes B as [K, N] rows only
  thread_local std::vector<uint16_t> packed;
  const void* bp = b.data_ptr();
  int64_t ld = b.stride(0);
  if (vnni) {
    if (packed.size() < size_t(K * N)) packed.resize(K * N);
    at::native::cpublas::pack(K, N, ld, N, st, st, bp, packed.data());
    bp = packed.data();
    ld = N;
  }
  if (dt == tt::DType::kBFloat16) {
    brgemm(M, N, K, lda, ld, ldc, accumulate, static_cast<const at::BFloat16*>(A), static_cast<const at::BFloat16*>(bp),
           C, vnni);
  } else {
    brgemm(M, N, K, lda, ld, ldc, accumulate, static_cast<const at::Half*>(A), static_cast<const at::Half*>(bp), C,
           vnni);
  }
}

// bf16/fp16 tiles go to the matrix library as they are only where it has native units for them (AMX: oneDNN's
// brgemm can pack); elsewhere widening to fp32 and sgemm is far faster than ATen's bf16 fallback GEMM.
// TWOTOWER_CPU_LOWP_GEMM=native|fp32 overrides the choice (tests run both).
bool attn_native_lowp(at::ScalarType st) {
  if (st == at::kFloat) return false;
  const char* env = std::getenv("TWOTOWER_CPU_LOWP_GEMM");
  if (env != nullptr && std::string(env) == "native") return true;
  if (env != nullptr && std::string(env) == "fp32") return false;
  return at::native::cpublas::could_pack(st);
}

void run_block_attention_cpu(BlockAttentionPlan& plan, const Tensor& q) {
  auto& p = plan.p;
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK_VALUE(p.ctx_lens[b] >= 0 && p.ctx_lens[b] <= p.ctx_capacity, "twotower: ctx_lens must be in [0, ",
                      p.ctx_capacity, "] (k_ctx dim 1), got ctx_lens[", b, "] = ", p.ctx_lens[b]);
  }
  if (p.batch == 0) return;
  AttnGemmCtx gctx{false};
  p.gemm.native_lowp = attn_native_lowp(q.scalar_type());
  gctx.vnni = p.gemm.native_lowp && at::native::cpublas::could_pack(q.scalar_type());
  p.gemm.fn = &attn_gemm;
  p.gemm.ctx = &gctx;

  const int64_t threads = at::get_num_threads();
  const auto cplan = tt::block_attention_cpu_plan(p, threads);
  const int64_t ntasks = int64_t(cplan.tasks.size()), M = tt::ba_rows(p);
  auto part_o = at::empty({ntasks, M, p.head_dim}, q.options().dtype(at::kFloat));
  auto part_lse = at::empty({ntasks, M}, q.options().dtype(at::kFloat));
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  // Dynamic scheduling, largest tasks first: a ragged batch's chunks differ in size.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, ntasks), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1)) < ntasks;)
      check_status(tt::block_attention_cpu_run_task(p, cplan, cplan.order[i]), "block_attention");
    if (gctx.vnni) at::native::cpublas::brgemm_release(true);
  });
  at::parallel_for(0, p.batch * p.num_kv_heads, 1, [&](int64_t b, int64_t e) {
    check_status(tt::block_attention_cpu_merge(p, cplan, b, e), "block_attention");
  });
}

std::tuple<Tensor, Tensor> block_attention_cpu(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk,
                                               const Tensor& k_ctx, const Tensor& v_ctx, const Tensor& ctx_lens,
                                               std::optional<double> scale) {
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale);
  run_block_attention_cpu(plan, q);
  return {plan.out, plan.lse};
}

Tensor block_attention_out_cpu(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk, const Tensor& k_ctx,
                               const Tensor& v_ctx, const Tensor& ctx_lens, std::optional<double> scale,
                               const Tensor& out) {
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, &out);
  run_block_attention_cpu(plan, q);
  return plan.lse;
}

#ifdef TWOTOWER_WITH_CUDA
// The CUDA kernel path: the fastest one these inputs allow, or the one TWOTOWER_ATTN_PATH=simt|mma|wgmma
// forces (tests use it to cover each path; a forced path that cannot run the inputs is an error, not a fallback).
tt::BlockAttentionCudaPath attn_cuda_path(const tt::BlockAttentionParams& p, int device) {
  const char* env = std::getenv("TWOTOWER_ATTN_PATH");
  if (env == nullptr || *env == '\0') return tt::block_attention_cuda_default_path(p, device);
  const std::string name(env);
  TORCH_CHECK_VALUE(name == "simt" || name == "mma" || name == "wgmma",
                    "twotower: TWOTOWER_ATTN_PATH must be simt, mma or wgmma, got '", name, "'");
  const auto path = name == "simt"  ? tt::BlockAttentionCudaPath::kSimt
                    : name == "mma" ? tt::BlockAttentionCudaPath::kMma
                                    : tt::BlockAttentionCudaPath::kWgmma;
  TORCH_CHECK(tt::block_attention_cuda_path_supported(p, path, device), "twotower: TWOTOWER_ATTN_PATH=", name,
              " cannot run these inputs: ", tt::block_attention_cuda_path_requirements(path));
  return path;
}

void run_block_attention_cuda(BlockAttentionPlan& plan, const Tensor& q) {
  auto& p = plan.p;
  TORCH_CHECK(tt::block_attention_cuda_supports(p.head_dim), "twotower: head_dim must be 64 or 128 on CUDA, got ",
              p.head_dim);
  if (p.batch == 0) return;
  // The split plan uses only shapes (never ctx_lens values: they stay on the device and may change between
  // graph replays); ctx_lens outside [0, Lmax] are clamped by the kernel rather than checked (no host sync).
  const int num_sms = tt::block_attention_cuda_num_sms(q.device().index());
  const auto path = attn_cuda_path(p, q.device().index());
  auto cplan = tt::block_attention_cuda_plan(p.batch, p.num_kv_heads, p.ctx_capacity + p.block_len, num_sms,
                                             tt::block_attention_cuda_tile_keys(path, p.head_dim), tt::ba_rows(p));
  cplan.path = path;
  const int64_t slots = p.batch * p.num_kv_heads * cplan.num_splits, M = tt::ba_rows(p);
  auto part_o = at::empty({slots, M, p.head_dim}, q.options().dtype(at::kFloat));
  auto part_lse = at::empty({slots, M}, q.options().dtype(at::kFloat));
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  check_status(tt::block_attention_cuda(p, cplan, current_stream(q)), "block_attention");
}

std::tuple<Tensor, Tensor> block_attention_cuda(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk,
                                                const Tensor& k_ctx, const Tensor& v_ctx, const Tensor& ctx_lens,
                                                std::optional<double> scale) {
  c10::cuda::CUDAGuard guard(q.device());
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale);
  run_block_attention_cuda(plan, q);
  return {plan.out, plan.lse};
}

Tensor block_attention_out_cuda(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk, const Tensor& k_ctx,
                                const Tensor& v_ctx, const Tensor& ctx_lens, std::optional<double> scale,
                                const Tensor& out) {
  c10::cuda::CUDAGuard guard(q.device());
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, &out);
  run_block_attention_cuda(plan, q);
  return plan.lse;
}
#endif

// ---------------------------------------------------------------------------------------------------
// threshold_unmask(logits [B,S,V] fp32|bf16, x [B,S] int64 (in place), mask_id, gamma, step [1] int64,
//   steps_per_block, temperature, seed [1] int64, offset [1] int64, counts [B] int32 (out), done [B] bool (out))
// step/seed/offset live on the logits' device so a captured CUDA graph can be replayed with new values.

void check_unmask_scalar(const Tensor& t, const char* name, const Tensor& logits) {
  check_dtype(t, at::kLong, name);
  TORCH_CHECK(t.numel() == 1, "twotower: ", name, " must hold one value (0-d or [1]), got shape ", t.sizes());
  check_same_device(t, name, logits, "logits");
}

tt::ThresholdUnmaskParams plan_threshold_unmask(const Tensor& logits, const Tensor& x, int64_t mask_id, double gamma,
                                                const Tensor& step, int64_t steps_per_block, double temperature,
                                                const Tensor& seed, const Tensor& offset, const Tensor& counts,
                                                const Tensor& done) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
                   "twotower: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, "twotower: logits must be [batch, seq, vocab] (3-D), got shape ", logits.sizes());
  const int64_t B = logits.size(0), S = logits.size(1), V = logits.size(2);
  TORCH_CHECK(S >= 1 && S <= tt::kUnmaskMaxSeq, "twotower: logits' seq dim must be in [1, ", tt::kUnmaskMaxSeq,
              "], got shape ", logits.sizes());
  TORCH_CHECK(V >= 2 && V <= INT32_MAX, "twotower: logits' vocab dim must be in [2, 2^31), got shape ", logits.sizes());
  check_last_dim_contiguous(logits, "logits");
  check_dtype(x, at::kLong, "x");
  check_same_device(x, "x", logits, "logits");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == S, "twotower: x must be [batch, seq] = [", B, ", ", S,
              "] like logits, got shape ", x.sizes());
  check_last_dim_contiguous(x, "x");
  check_unmask_scalar(step, "step", logits);
  check_unmask_scalar(seed, "seed", logits);
  check_unmask_scalar(offset, "offset", logits);
  check_dtype(counts, at::kInt, "counts");
  check_same_device(counts, "counts", logits, "logits");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == B && counts.is_contiguous(),
              "twotower: counts must be a contiguous [batch] = [", B, "] tensor, got shape ", counts.sizes());
  check_dtype(done, at::kBool, "done");
  check_same_device(done, "done", logits, "logits");
  TORCH_CHECK(done.dim() == 1 && done.size(0) == B && done.is_contiguous(),
              "twotower: done must be a contiguous [batch] = [", B, "] tensor, got shape ", done.sizes());
  TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < V, "twotower: mask_id must be in [0, vocab = ", V, "), got ", mask_id);
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "twotower: gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(steps_per_block >= 1 && steps_per_block <= INT32_MAX,
                    "twotower: steps_per_block must be >= 1, got ", steps_per_block);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0.0 && (temperature == 0.0 || float(temperature) > 0.f),
                    "twotower: temperature must be 0 (greedy) or a positive finite float32 value, got ", temperature);
  tt::ThresholdUnmaskParams p{};
  p.logits = logits.data_ptr();
  p.x = x.data_ptr<int64_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.done = done.data_ptr<bool>();
  p.step = step.data_ptr<int64_t>();
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset.data_ptr<int64_t>();
  p.batch = B;
  p.seq = S;
  p.vocab = V;
  p.logits_batch_stride = logits.stride(0);
  p.logits_seq_stride = logits.stride(1);
  p.x_batch_stride = x.stride(0);
  p.mask_id = mask_id;
  p.gamma = float(gamma);
  p.steps_per_block = int32_t(steps_per_block);
  p.temperature = float(temperature);
  p.dtype = logits.scalar_type() == at::kFloat ? tt::DType::kFloat32 : tt::DType::kBFloat16;
  return p;
}

void threshold_unmask_cpu(const Tensor& logits, const Tensor& x, int64_t mask_id, double gamma, const Tensor& step,
                          int64_t steps_per_block, double temperature, const Tensor& seed, const Tensor& offset,
                          const Tensor& counts, const Tensor& done) {
  auto p = plan_threshold_unmask(logits, x, mask_id, gamma, step, steps_per_block, temperature, seed, offset, counts,
                                 done);
  p.slice_width = tt::kUnmaskCpuSliceWidth;
  const int64_t step_value = *p.step;
  TORCH_CHECK_VALUE(step_value >= 0 && step_value < steps_per_block, "twotower: step must be in [0, steps_per_block = ",
                    steps_per_block, "), got ", step_value);
  // Phase 1 over (position, vocabulary slice) items, then the per-row merge + commit.
  const int64_t ns = tt::unmask_num_slices(p), items = p.batch * p.seq * ns;
  std::vector<tt::UnmaskState> states(items);
  std::vector<uint8_t> bad(items);
  at::parallel_for(0, items, std::max<int64_t>(1, 32768 / p.slice_width), [&](int64_t b, int64_t e) {
    check_status(tt::threshold_unmask_scan_cpu(p, states.data(), bad.data(), b, e), "threshold_unmask");
  });
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / ns;
    TORCH_CHECK_VALUE(!bad[i], "twotower: logits must not contain NaN (found at masked position batch ", r / p.seq,
                      ", seq ", r % p.seq, ")");
  }
  at::parallel_for(0, p.batch, 64, [&](int64_t b, int64_t e) {
    check_status(tt::threshold_unmask_commit_cpu(p, states.data(), b, e), "threshold_unmask");
  });
}

#ifdef TWOTOWER_WITH_CUDA
// TWOTOWER_UNMASK_DEBUG=1: synchronise after the kernel and raise on NaN logits or an out-of-range step
// (not capturable). Otherwise NaN counts as -inf and a bad step leaves x untouched with counts = -1.
bool unmask_debug() {
  const char* v = std::getenv("TWOTOWER_UNMASK_DEBUG");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

void threshold_unmask_cuda(const Tensor& logits, const Tensor& x, int64_t mask_id, double gamma, const Tensor& step,
                           int64_t steps_per_block, double temperature, const Tensor& seed, const Tensor& offset,
                           const Tensor& counts, const Tensor& done) {
  c10::cuda::CUDAGuard guard(logits.device());
  auto p = plan_threshold_unmask(logits, x, mask_id, gamma, step, steps_per_block, temperature, seed, offset, counts,
                                 done);
  p.slice_width = tt::kUnmaskCudaSliceWidth;
  auto ws = at::empty({tt::threshold_unmask_cuda_workspace_bytes(p)}, logits.options().dtype(at::kByte));
  check_status(tt::threshold_unmask_cuda(p, ws.data_ptr(), current_stream(logits)), "threshold_unmask");
  if (unmask_debug()) {
    const int32_t err = ws.narrow(0, p.batch * 4, 4).view(at::kInt).item<int32_t>();
    TORCH_CHECK_VALUE(!(err & tt::kUnmaskErrNaN), "twotower: logits must not contain NaN at masked positions "
                      "(TWOTOWER_UNMASK_DEBUG check)");
    TORCH_CHECK_VALUE(!(err & tt::kUnmaskErrStep), "twotower: step must be in [0, steps_per_block = ", steps_per_block,
                      "), got ", step.item<int64_t>(), " (TWOTOWER_UNMASK_DEBUG check)");
  }
}
#endif

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Registry: schemas first, then one registration block per dispatch key.

TORCH_LIBRARY(twotower, m) {
  m.def("block_attention(Tensor q, Tensor k_blk, Tensor v_blk, Tensor k_ctx, Tensor v_ctx, Tensor ctx_lens, "
        "float? scale=None) -> (Tensor, Tensor)");
  m.def("block_attention_out(Tensor q, Tensor k_blk, Tensor v_blk, Tensor k_ctx, Tensor v_ctx, Tensor ctx_lens, "
        "float? scale, Tensor(a!) out) -> Tensor");
  m.def("merge_states(Tensor o, Tensor lse) -> (Tensor, Tensor)");
  m.def("threshold_unmask(Tensor logits, Tensor(a!) x, int mask_id, float gamma, Tensor step, int steps_per_block, "
        "float temperature, Tensor seed, Tensor offset, Tensor(b!) counts, Tensor(c!) done) -> ()");
  m.def("mamba_block_scan(Tensor xBC, Tensor dt, Tensor conv_state, Tensor ssm_state, Tensor conv_weight, "
        "Tensor? conv_bias, Tensor dt_bias, Tensor A_log, Tensor D, Tensor? seq_lens, float dt_min, float dt_max, "
        "Tensor(a!)? conv_state_out, Tensor(b!)? ssm_state_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(twotower, CPU, m) {
  m.impl("block_attention", &block_attention_cpu);
  m.impl("block_attention_out", &block_attention_out_cpu);
  m.impl("merge_states", &merge_states_cpu);
  m.impl("threshold_unmask", &threshold_unmask_cpu);
  m.impl("mamba_block_scan", &mamba_block_scan_cpu);
}

#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) {
  m.impl("block_attention", &block_attention_cuda);
  m.impl("block_attention_out", &block_attention_out_cuda);
  m.impl("merge_states", &merge_states_cuda);
  m.impl("threshold_unmask", &threshold_unmask_cuda);
  m.impl("mamba_block_scan", &mamba_block_scan_cuda);
}
#endif

// A plain module: the ops register themselves with the dispatcher when the library is loaded, so this
// needs no libtorch_python and builds against the stable ABI (one _C.abi3.so for every CPython >= 3.9).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "twotower_ext kernels (ops live in torch.ops.twotower)",
                            -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
