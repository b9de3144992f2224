// Fused denoiser attention (torch-free): the S block queries of each row attend, with one softmax and no
// mask, over the first ctx_lens[b] keys of the context cache followed by the S block keys (docs/semantics.md).
//   q [B,S,Hq,D]; k_blk, v_blk [B,S,Hkv,D]; k_ctx, v_ctx [B,Lmax,Hkv,D]; ctx_lens int32 [B]
//   out [B,S,Hq,D] in q's dtype; lse [B,Hq,S] fp32 (natural log). fp32 accumulation.
// GQA packing: the S tokens x G = Hq/Hkv query heads of one KV head are the M = S*G rows that share every
// K/V tile (row m = s*G + g), so each KV head's context is read once. The key sequence of row b is the
// virtual concatenation [context 0..ctx_len) | block 0..S); it is split into chunks whose partial states
// (o normalised, lse) are merged with the merge_states math (merge_state.h).
#pragma once
#include <cstdint>
#include <vector>

#include "common/platform.h"
#include "block_attention/block_attention_cuda_plan.h"
#include "merge_state/merge_state.h"

namespace tt {

// fp32 C[M,N] (+)= A[M,K] @ op(B): row-major with leading dims; op(B) = B [K,N], or B^T when trans_b (B stored
// [N,K]). The CPU kernels stay torch-free and the binding supplies the matrix library (MKL / oneDNN sgemm) through
// this callback (common/cpu_gemm_torch.h).
using GemmFn = void (*)(void* ctx, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                        int64_t ldb, bool trans_b, float* C, int64_t ldc, bool accumulate);

struct CpuGemm {
  GemmFn fn = nullptr;
  void* ctx = nullptr;
};

// How the CPU kernel multiplies bf16 tiles (the binding picks the best this CPU runs; TWOTOWER_ATTN_CPU_ISA forces
// one): widened to fp32 for the matrix library (every CPU; also fp16 tiles), vdpbf16ps microkernels (avx512_bf16),
// or AMX tile products (amx). The two native ones read the same packed tiles (block_attention_bf16_cpu.cpp).
enum class BaCpuBf16 : int32_t { kWiden = 0, kAvx512Bf16 = 1, kAmx = 2 };

struct BlockAttentionParams {
  const void *q, *k_blk, *v_blk, *k_ctx, *v_ctx;
  const int32_t* ctx_lens;  // [B]; on CUDA device memory (values clamped to [0, Lmax] there)
  void* out;                // [B,S,Hq,D]
  float* lse;               // [B,Hq,S]
  int64_t batch, block_len, num_q_heads, num_kv_heads, head_dim, ctx_capacity;
  // Element strides; the last dim of every tensor is contiguous.
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t kb_stride_b, kb_stride_s, kb_stride_h, vb_stride_b, vb_stride_s, vb_stride_h;
  int64_t kc_stride_b, kc_stride_l, kc_stride_h, vc_stride_b, vc_stride_l, vc_stride_h;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h;  // lse stride over s is 1
  float scale;                         // softmax scale, resolved (default 1/sqrt(D))
  bool causal = false;                 // block query j sees context + block keys 0..j (else all S block keys)
  DType dtype;
  // Split-KV partial states, one slot per (task or split): o [slots, M, D] fp32 normalised, lse [slots, M].
  float* part_o = nullptr;
  float* part_lse = nullptr;
  CpuGemm gemm;  // CPU only
  BaCpuBf16 bf16 = BaCpuBf16::kWiden;  // CPU only: how bf16 tiles are multiplied
};

TT_HOST_DEVICE int64_t ba_group(const BlockAttentionParams& p) { return p.num_q_heads / p.num_kv_heads; }
TT_HOST_DEVICE int64_t ba_rows(const BlockAttentionParams& p) { return p.block_len * ba_group(p); }

// ---------------------------------------------------------------------------------------------------
// CPU. Work = tasks (b, kv head, key range of the virtual sequence). Plan on the host from ctx_lens (a
// CPU tensor there), run the tasks in any order on any threads, then merge per (b, kv head). Causal: a task
// masks, per query row s, the keys at or past ctx + s + 1 of its range, and each tile's GEMMs skip the rows
// that see none of its keys; a row that sees none of the task's keys gives an empty part (lse -inf). A NaN score (a NaN input, or inf - inf from inf inputs) makes the row's out and
// lse NaN, as in the reference.

struct BlockAttentionTask {
  int64_t b, h, key_begin, key_end;
};

struct BlockAttentionCpuPlan {
  std::vector<BlockAttentionTask> tasks;  // ordered (b, h, chunk): parts of one (b,h) are contiguous
  std::vector<int64_t> part_begin;        // [B*Hkv + 1]: parts of (b,h) are tasks [part_begin[bh], part_begin[bh+1])
  std::vector<int64_t> order;             // task indices, largest first (for dynamic scheduling)
  int64_t tile_keys = 0;
};

// Each row's keys in chunks of 1,024 keys (4 tiles), more where a row has over 32 of them (at most 32 parts): a
// function of the row's own length, never of the batch or the threads, so a row's result is the same in any batch.
BlockAttentionCpuPlan block_attention_cpu_plan(const BlockAttentionParams& p);

// Run task `task` of the plan: writes its partial state into part slot `task`.
Status block_attention_cpu_run_task(const BlockAttentionParams& p, const BlockAttentionCpuPlan& plan,
                                    int64_t task);

// Merge the parts of (b,h) pairs [bh_begin, bh_end) into out / lse.
Status block_attention_cpu_merge(const BlockAttentionParams& p, const BlockAttentionCpuPlan& plan,
                                 int64_t bh_begin, int64_t bh_end);

// The bf16 tiles of the native paths (block_attention_bf16_cpu.cpp; x86 only, like the paths). A GEMM operand B is
// packed in panels of kBaBf16Panel columns, each contiguous over the depth: pair row r of a panel holds, for each of
// its columns, the two bf16 values of depth 2r and 2r+1 (the layout vdpbf16ps and AMX multiply).
//   ba_pack_k_bf16: key rows [n, D] (ld apart) -> K^T as B: depth D rounded up to 32, n rounded up to 32 columns;
//     zero past n and D.
//   ba_pack_v_bf16: value rows [n, D] -> V as B: depth n rounded up to 32, D rounded up to 32 columns; zero past n, D.
//   ba_bf16_gemm: C [rows, cols] (+)= A [rows, depth] . B with rows a multiple of 16, cols of kBaBf16Panel, depth
//     of 32 (A rows contiguous in depth, lda elements apart; C rows ldc floats apart; fp32 accumulation).
//   ba_bf16_begin / ba_bf16_end: around a thread's GEMMs on one path (AMX: tile configuration and release).
constexpr int64_t kBaBf16Panel = 32;
void ba_pack_k_bf16(const uint16_t* k, int64_t ld, int64_t n, int64_t D, uint16_t* dst);
void ba_pack_v_bf16(const uint16_t* v, int64_t ld, int64_t n, int64_t D, uint16_t* dst);
void ba_bf16_gemm(BaCpuBf16 path, int64_t rows, int64_t cols, int64_t depth, const uint16_t* A, int64_t lda,
                  const uint16_t* B, float* C, int64_t ldc, bool accumulate);
void ba_bf16_begin(BaCpuBf16 path);
void ba_bf16_end(BaCpuBf16 path);
// One row of the online softmax for the native paths (16 lanes, avx512_bf16): scores row[0, live_n) (raw, times
// scale) against the running max m_old -> *m_new; writes exp(scale * s - m_new) as bf16 to prow[0, width) (0 past
// live_n; width a multiple of 16) and returns their fp32 sum.
float ba_softmax_row_bf16(const float* row, int64_t live_n, int64_t width, float scale, float m_old, uint16_t* prow,
                          float* m_new);

// ---------------------------------------------------------------------------------------------------
// CUDA. The plan (path choice, grid, shared memory, per-row splits) is host-only: block_attention_cuda_plan.h.

// What the tensor-core paths' vector loads need of these inputs: K/V rows by 16-byte copies (cp.async, TMA), Q
// by 4-byte (mma) or 16-byte (wgmma) loads.
inline BaCudaInputs ba_cuda_inputs(const BlockAttentionParams& p) {
  BaCudaInputs in;
  in.dtype = p.dtype;
  in.head_dim = p.head_dim;
  const int64_t e = p.dtype == DType::kFloat32 ? 4 : 2, B = p.batch, S = p.block_len, L = p.ctx_capacity;
  const int64_t Hq = p.num_q_heads, Hkv = p.num_kv_heads;
  in.kv_aligned16 = ba_aligned(p.k_blk, e, 16, {{p.kb_stride_b, B}, {p.kb_stride_s, S}, {p.kb_stride_h, Hkv}}) &&
                    ba_aligned(p.v_blk, e, 16, {{p.vb_stride_b, B}, {p.vb_stride_s, S}, {p.vb_stride_h, Hkv}}) &&
                    ba_aligned(p.k_ctx, e, 16, {{p.kc_stride_b, B}, {p.kc_stride_l, L}, {p.kc_stride_h, Hkv}}) &&
                    ba_aligned(p.v_ctx, e, 16, {{p.vc_stride_b, B}, {p.vc_stride_l, L}, {p.vc_stride_h, Hkv}});
  in.q_aligned4 = ba_aligned(p.q, e, 4, {{p.q_stride_b, B}, {p.q_stride_s, S}, {p.q_stride_h, Hq}});
  in.q_aligned16 = ba_aligned(p.q, e, 16, {{p.q_stride_b, B}, {p.q_stride_s, S}, {p.q_stride_h, Hq}});
  return in;
}

// The device's plan inputs (attributes cached per device; the image flags from cudaFuncGetAttributes: whether
// this build's code for the device holds each tensor-core kernel's body).
BaCudaDevice block_attention_cuda_device(int device);

// Host-side problems of launching `plan` that only the runtime can see (nullptr if none): a wgmma context cache
// cuTensorMapEncodeTiled cannot describe, or the encoder missing from the driver.
const char* block_attention_cuda_launch_refusal(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan);

// p.part_o / p.part_lse must hold B * Hkv * plan.grid_x slots of [M, D] / [M] floats when plan.merge().
// Asynchronous on `stream` (a cudaStream_t), no host synchronisation.
Status block_attention_cuda(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, void* stream);

// The kernels the last block_attention_cuda call on this thread launched (name, template parameters, grid),
// for tests and tools/gpu_check.sh: which kernel really ran.
const char* block_attention_cuda_last_launch();

}  // namespace tt
