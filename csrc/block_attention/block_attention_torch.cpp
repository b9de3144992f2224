// Torch-side adapter of block_attention / block_attention_out: argument checks (messages name the argument), the plan that fills the
// kernel's params struct, the CPU / CUDA entry points and their registrations. The schema is in csrc/registry.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "block_attention/block_attention.h"
#include "common/cpu_gemm_torch.h"
#include "common/cpu_isa_torch.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

// ---------------------------------------------------------------------------------------------------
// block_attention(q [B,S,Hq,D], k_blk, v_blk [B,S,Hkv,D], k_ctx, v_ctx [B,Lmax,Hkv,D], ctx_lens int32 [B],
//                 scale?, causal=False) -> (out [B,S,Hq,D], lse [B,Hq,S] fp32)
// causal: block query j sees the row's context and block keys 0..j (the context tower's extension / AR step).
// block_attention_out(..., scale?, out, causal=False) -> lse: the same, written into a caller's out (any strides, last dim
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
                                        bool causal, const Tensor* out = nullptr) {
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
  p.causal = causal;
  return plan;
}

// How bf16 tiles are multiplied: AMX tiles where the CPU has them (and the OS grants them), else vdpbf16ps where
// avx512_bf16 exists, else widened to fp32 for the matrix library; TWOTOWER_ATTN_CPU_ISA=avx2|avx512 forces the
// widening, =avx512_bf16 the vdpbf16ps kernels, =amx the AMX ones (tests run each; bench/bench_block_attention.py
// times each). On the Xeon (1 thread, 32 q / 2 kv heads, ctx 4096, best of 12 on a busy machine): fp32 11.8 ms,
// bf16 widened 14.5 ms, vdpbf16ps 13.2 ms (there its throughput only matches two fp32 FMAs), AMX 2.9 ms. On the
// avx512_bf16 EPYC without AMX the bf16 matmul runs at 2.3x the fp32 one (issue 29), which vdpbf16ps is for.
tt::BaCpuBf16 attention_cpu_bf16() {
  switch (cpu_isa_from_env("TWOTOWER_ATTN_CPU_ISA", tt::CpuIsa::kAmx)) {
    case tt::CpuIsa::kAmx: return tt::BaCpuBf16::kAmx;
    case tt::CpuIsa::kAvx512Bf16: return tt::BaCpuBf16::kAvx512Bf16;
    default: return tt::BaCpuBf16::kWiden;
  }
}

void run_block_attention_cpu(BlockAttentionPlan& plan, const Tensor& q) {
  auto& p = plan.p;
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK_VALUE(p.ctx_lens[b] >= 0 && p.ctx_lens[b] <= p.ctx_capacity, "twotower: ctx_lens must be in [0, ",
                      p.ctx_capacity, "] (k_ctx dim 1), got ctx_lens[", b, "] = ", p.ctx_lens[b]);
  }
  if (p.batch == 0) return;
  p.gemm = cpu_sgemm();
  p.bf16 = attention_cpu_bf16();

  const auto cplan = tt::block_attention_cpu_plan(p);
  const int64_t ntasks = int64_t(cplan.tasks.size()), M = tt::ba_rows(p);
  auto part_o = at::empty({ntasks, M, p.head_dim}, q.options().dtype(at::kFloat));
  auto part_lse = at::empty({ntasks, M}, q.options().dtype(at::kFloat));
  p.part_o = part_o.data_ptr<float>();
  p.part_lse = part_lse.data_ptr<float>();
  // Dynamic scheduling, largest tasks first (a ragged batch's chunks differ in size), on the ops' helper pool
  // (common/parallel_cpu.h): an OpenMP region here woke its sleeping team for every call of a pass, which made a
  // denoiser block's attention 3x slower at 2 threads than at 1. Work per task in elements: its keys times the
  // kv head's query rows times the head dim, twice (QK^T and PV).
  int64_t keys = 0;
  for (const auto& t : cplan.tasks) keys += t.key_end - t.key_begin;
  tt::parallel_chunks(ntasks, std::max<int64_t>(1, keys / std::max<int64_t>(1, ntasks)) * M * p.head_dim * 2,
                      [&](int64_t b, int64_t e) {
                        for (int64_t i = b; i < e; ++i)
                          check_status(tt::block_attention_cpu_run_task(p, cplan, cplan.order[i]), "block_attention");
                      });
  tt::parallel_chunks(p.batch * p.num_kv_heads, (ntasks / std::max<int64_t>(1, p.batch * p.num_kv_heads) + 1) * M *
                      p.head_dim, [&](int64_t b, int64_t e) {
    check_status(tt::block_attention_cpu_merge(p, cplan, b, e), "block_attention");
  });
}

std::tuple<Tensor, Tensor> block_attention_cpu(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk,
                                               const Tensor& k_ctx, const Tensor& v_ctx, const Tensor& ctx_lens,
                                               std::optional<double> scale, bool causal) {
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, causal);
  run_block_attention_cpu(plan, q);
  return {plan.out, plan.lse};
}

Tensor block_attention_out_cpu(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk, const Tensor& k_ctx,
                               const Tensor& v_ctx, const Tensor& ctx_lens, std::optional<double> scale,
                               const Tensor& out, bool causal) {
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, causal, &out);
  run_block_attention_cpu(plan, q);
  return plan.lse;
}

// ---------------------------------------------------------------------------------------------------
// CUDA: the path and plan are pure host functions (block_attention_cuda_plan.h), so the CPU build has them too:
// cuda_attention_plan(...) shows on any machine which kernel and launch a shape would get on a given GPU.

tt::BlockAttentionCudaPath attn_cuda_path_by_name(const std::string& name, const char* what) {
  TORCH_CHECK_VALUE(name == "simt" || name == "mma" || name == "wgmma", "twotower: ", what,
                    " must be simt, mma or wgmma, got '", name, "'");
  return name == "simt" ? tt::BlockAttentionCudaPath::kSimt
         : name == "mma" ? tt::BlockAttentionCudaPath::kMma
                         : tt::BlockAttentionCudaPath::kWgmma;
}

// The CUDA kernel path: the default for these inputs, or the forced one (`forced`, from TWOTOWER_ATTN_PATH or
// the plan op's `path`), which must be able to run them: a forced path is never swapped for another.
tt::BlockAttentionCudaPath attn_cuda_path(const tt::BaCudaInputs& in, const tt::BaCudaDevice& dev, const char* forced,
                                          const char* what) {
  if (forced == nullptr || *forced == '\0') {
    const auto path = tt::ba_cuda_default_path(in, dev);
    const char* why = tt::ba_cuda_path_refusal(path, in, dev);
    TORCH_CHECK(why == nullptr, "twotower: block_attention has no CUDA kernel for these inputs: ", why);
    return path;
  }
  const auto path = attn_cuda_path_by_name(forced, what);
  const char* why = tt::ba_cuda_path_refusal(path, in, dev);
  TORCH_CHECK(why == nullptr, "twotower: ", what, "=", forced, " cannot run these inputs: ", why);
  return path;
}

tt::BlockAttentionCudaPlan attn_cuda_plan(const tt::BlockAttentionParams& p, const tt::BaCudaInputs& in,
                                          const tt::BaCudaDevice& dev, const char* forced, const char* what) {
  const auto path = attn_cuda_path(in, dev, forced, what);
  tt::BlockAttentionCudaPlan plan;
  const char* why = tt::ba_cuda_make_plan(p.batch, p.block_len, p.num_q_heads, p.num_kv_heads, p.head_dim,
                                          p.ctx_capacity, path, dev, &plan);
  TORCH_CHECK(why == nullptr, "twotower: block_attention on CUDA: ", why, " (batch ", p.batch, ", kv_heads ",
              p.num_kv_heads, ", block_len x group ", tt::ba_rows(p), ")");
  return plan;
}

tt::DType attn_dtype_by_name(const std::string& name) {
  if (name == "float32" || name == "fp32") return tt::DType::kFloat32;
  if (name == "bfloat16" || name == "bf16") return tt::DType::kBFloat16;
  TORCH_CHECK_VALUE(name == "float16" || name == "fp16", "twotower: dtype must be float32, bfloat16 or float16, got '",
                    name, "'");
  return tt::DType::kFloat16;
}

// cuda_attention_plan(...) -> [path (0 simt, 1 mma, 2 wgmma), grid_x, grid_y, grid_z, threads, smem_bytes,
// tile_keys, stages, rows_per_cta, split_unit, merge, row_splits, row_chunk, split_align]: the launch block_attention would
// make for these shapes on a GPU of compute capability `cc` with `num_sms` SMs (its shared-memory limits from
// the known parts, or smem_optin / smem_per_sm when given), default or forced `path`, contiguous inputs; the
// row fields for a row of ctx_len context keys. sm90a_image=False: a build without sm_90a code.
std::vector<int64_t> cuda_attention_plan_op(int64_t batch, int64_t block_len, int64_t q_heads, int64_t kv_heads,
                                            int64_t head_dim, int64_t ctx_capacity, std::string dtype, int64_t cc,
                                            int64_t num_sms, std::string path, int64_t ctx_len, int64_t smem_optin,
                                            int64_t smem_per_sm, bool sm90a_image) {
  TORCH_CHECK_VALUE(batch >= 1 && block_len >= 1 && q_heads >= 1 && kv_heads >= 1 && q_heads % kv_heads == 0 &&
                        head_dim >= 1 && ctx_capacity >= 0,
                    "twotower: cuda_attention_plan needs batch, block_len, q_heads, kv_heads, head_dim >= 1, q_heads a "
                    "multiple of kv_heads and ctx_capacity >= 0");
  TORCH_CHECK_VALUE(ctx_len <= ctx_capacity, "twotower: ctx_len must be <= ctx_capacity (", ctx_capacity, "), got ",
                    ctx_len);
  auto dev = tt::ba_cuda_known_device(int(cc), int(num_sms));
  if (smem_optin > 0) dev.smem_optin = smem_optin;
  if (smem_per_sm > 0) dev.smem_per_sm = smem_per_sm;
  dev.wgmma_image = dev.wgmma_image && sm90a_image;
  tt::BlockAttentionParams p{};
  p.batch = batch; p.block_len = block_len; p.num_q_heads = q_heads; p.num_kv_heads = kv_heads;
  p.head_dim = head_dim; p.ctx_capacity = ctx_capacity;
  tt::BaCudaInputs in;
  in.dtype = attn_dtype_by_name(dtype);
  in.head_dim = head_dim;
  const auto pl = attn_cuda_plan(p, in, dev, path.c_str(), "path");
  const auto rs = tt::ba_row_splits((ctx_len >= 0 ? ctx_len : ctx_capacity) + block_len, pl.grid_x, pl.split_unit,
                                    pl.split_align);
  return {int64_t(pl.path), pl.grid_x, pl.grid_y, pl.grid_z, pl.threads, pl.smem_bytes, pl.tile_keys, pl.stages,
          pl.rows_per_cta, pl.split_unit, pl.merge() ? 1 : 0, rs.splits, rs.chunk, pl.split_align};
}

// What the last CUDA block_attention call of this thread launched ("" in a build without CUDA kernels).
std::string cuda_attention_last_launch_op() {
#ifdef TWOTOWER_WITH_CUDA
  return tt::block_attention_cuda_last_launch();
#else
  return "";
#endif
}

#ifdef TWOTOWER_WITH_CUDA
void run_block_attention_cuda(BlockAttentionPlan& plan, const Tensor& q) {
  auto& p = plan.p;
  if (p.batch == 0) return;
  // The plan uses only shapes and the device (never ctx_lens values: they stay on the device and may change
  // between graph replays); ctx_lens outside [0, Lmax] are clamped by the kernels rather than checked.
  const auto dev = tt::block_attention_cuda_device(q.device().index());
  const auto cplan = attn_cuda_plan(p, tt::ba_cuda_inputs(p), dev, std::getenv("TWOTOWER_ATTN_PATH"),
                                    "TWOTOWER_ATTN_PATH");
  const char* why = tt::block_attention_cuda_launch_refusal(p, cplan);
  TORCH_CHECK(why == nullptr, "twotower: block_attention's wgmma kernel cannot run these inputs: ", why);
  Tensor part_o, part_lse;
  if (cplan.merge()) {
    const int64_t slots = p.batch * p.num_kv_heads * cplan.grid_x, M = tt::ba_rows(p);
    part_o = at::empty({slots, M, p.head_dim}, q.options().dtype(at::kFloat));
    part_lse = at::empty({slots, M}, q.options().dtype(at::kFloat));
    p.part_o = part_o.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  check_status(tt::block_attention_cuda(p, cplan, current_stream(q)), "block_attention");
}

std::tuple<Tensor, Tensor> block_attention_cuda(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk,
                                                const Tensor& k_ctx, const Tensor& v_ctx, const Tensor& ctx_lens,
                                                std::optional<double> scale, bool causal) {
  c10::cuda::CUDAGuard guard(q.device());
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, causal);
  run_block_attention_cuda(plan, q);
  return {plan.out, plan.lse};
}

Tensor block_attention_out_cuda(const Tensor& q, const Tensor& k_blk, const Tensor& v_blk, const Tensor& k_ctx,
                                const Tensor& v_ctx, const Tensor& ctx_lens, std::optional<double> scale,
                                const Tensor& out, bool causal) {
  c10::cuda::CUDAGuard guard(q.device());
  auto plan = plan_block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, causal, &out);
  run_block_attention_cuda(plan, q);
  return plan.lse;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) {
  m.impl("block_attention", &block_attention_cpu);
  m.impl("block_attention_out", &block_attention_out_cpu);
}
// No tensor arguments: these dispatch on no backend, so they register as CompositeExplicitAutograd (any build).
TORCH_LIBRARY_IMPL(twotower, CompositeExplicitAutograd, m) {
  m.impl("cuda_attention_plan", &cuda_attention_plan_op);
  m.impl("cuda_attention_last_launch", &cuda_attention_last_launch_op);
}
#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) {
  m.impl("block_attention", &block_attention_cuda);
  m.impl("block_attention_out", &block_attention_out_cuda);
}
#endif
