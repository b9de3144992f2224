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
#include "merge_state/merge_state.h"

namespace tt {

// C[M,N] (+)= A[M,K] @ op(B): row-major with leading dims, fp32 C; op(B) = B [K,N], or B^T when trans_b
// (B stored [N,K]). A and B are fp32, or bf16/fp16 when the provider says it multiplies those natively.
// The CPU kernel stays torch-free and the binding supplies the matrix library (oneDNN/AMX brgemm, MKL
// sgemm) through this callback.
using GemmFn = void (*)(void* ctx, DType ab_dtype, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                        const void* B, int64_t ldb, bool trans_b, float* C, int64_t ldc, bool accumulate);

struct CpuGemm {
  GemmFn fn = nullptr;
  void* ctx = nullptr;
  bool native_lowp = false;  // bf16/fp16 tiles go to fn as they are; else the kernel converts them to fp32
};

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
};

TT_HOST_DEVICE int64_t ba_group(const BlockAttentionParams& p) { return p.num_q_heads / p.num_kv_heads; }
TT_HOST_DEVICE int64_t ba_rows(const BlockAttentionParams& p) { return p.block_len * ba_group(p); }

// ---------------------------------------------------------------------------------------------------
// CPU. Work = tasks (b, kv head, key range of the virtual sequence). Plan on the host from ctx_lens (a
// CPU tensor there), run the tasks in any order on any threads, then merge per (b, kv head).

struct BlockAttentionTask {
  int64_t b, h, key_begin, key_end;
};

struct BlockAttentionCpuPlan {
  std::vector<BlockAttentionTask> tasks;  // ordered (b, h, chunk): parts of one (b,h) are contiguous
  std::vector<int64_t> part_begin;        // [B*Hkv + 1]: parts of (b,h) are tasks [part_begin[bh], part_begin[bh+1])
  std::vector<int64_t> order;             // task indices, largest first (for dynamic scheduling)
  int64_t tile_keys = 0;
};

// Chunks of about total_keys / (4 * threads) keys, at least a few tiles each, so a ragged batch still
// spreads over all threads and each task amortises its Q packing.
BlockAttentionCpuPlan block_attention_cpu_plan(const BlockAttentionParams& p, int64_t num_threads);

// Run task `task` of the plan: writes its partial state into part slot `task`.
Status block_attention_cpu_run_task(const BlockAttentionParams& p, const BlockAttentionCpuPlan& plan,
                                    int64_t task);

// Merge the parts of (b,h) pairs [bh_begin, bh_end) into out / lse.
Status block_attention_cpu_merge(const BlockAttentionParams& p, const BlockAttentionCpuPlan& plan,
                                 int64_t bh_begin, int64_t bh_end);

// ---------------------------------------------------------------------------------------------------
// CUDA. Flash-decoding: grid (splits, Hkv, B); split i of row b covers keys [i*chunk, (i+1)*chunk) of the
// virtual sequence. The plan depends only on shapes known before capture (B, Hkv, Lmax, SM count), never
// on the ctx_lens values, so a captured graph replays with new ctx_lens: a split past a row's length
// writes lse = -inf and the merge ignores it.

TT_HOST_DEVICE int64_t ba_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Kernel paths for the split pass: the SIMT baseline (every dtype), the sm_80+ tensor-core path (mma.sync,
// bf16/fp16, head dims 64/128) and the sm_90a path (TMA + wgmma, warp-specialised, bf16/fp16, head dim 128).
// The merge is shared.
enum class BlockAttentionCudaPath : int32_t { kSimt = 0, kMma = 1, kWgmma = 2 };

struct BlockAttentionCudaPlan {
  int64_t num_splits;   // per (b, kv head)
  int64_t split_keys;   // keys per split (multiple of the kernel's tile)
  BlockAttentionCudaPath path = BlockAttentionCudaPath::kSimt;
};

// Pure function of plan-time quantities: enough CTAs for ~2 waves, splits of at least `min_split_keys`.
// Each split writes a partial [rows, D] fp32 state while reading split_keys x D of K and V: splits of at
// least 4 * rows keys keep that write traffic under ~1/4 of the K/V read (rows = S x GQA group, 256 at the
// model's shapes, where short splits would write about as much as they read).
inline BlockAttentionCudaPlan block_attention_cuda_plan(int64_t batch, int64_t num_kv_heads, int64_t max_keys,
                                                        int64_t num_sms, int64_t tile_keys, int64_t rows) {
  const int64_t min_split_keys = ba_ceil_div(4 * (rows > tile_keys ? rows : tile_keys), tile_keys) * tile_keys;
  const int64_t ctas = batch * num_kv_heads > 0 ? batch * num_kv_heads : 1;
  int64_t splits = ba_ceil_div(2 * (num_sms > 0 ? num_sms : 1), ctas);
  const int64_t max_splits = ba_ceil_div(max_keys > 0 ? max_keys : 1, min_split_keys);
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  const int64_t split_keys = ba_ceil_div(ba_ceil_div(max_keys > 0 ? max_keys : 1, splits), tile_keys) * tile_keys;
  return {ba_ceil_div(max_keys > 0 ? max_keys : 1, split_keys), split_keys};
}

// Head dims the CUDA kernels are built for.
inline bool block_attention_cuda_supports(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

// Tile (keys per step) of a path's kernel; the binding plans splits with it.
int64_t block_attention_cuda_tile_keys(BlockAttentionCudaPath path, int64_t head_dim);

// Whether `path` can run these inputs on CUDA device `device`: dtype, head dim, pointer/stride alignment of
// its vector loads and the device's compute capability. Host only, no sync (pointers and shapes only).
bool block_attention_cuda_path_supported(const BlockAttentionParams& p, BlockAttentionCudaPath path, int device);

// What `path` needs, for error messages.
const char* block_attention_cuda_path_requirements(BlockAttentionCudaPath path);

// The default path: mma where it can run, else the SIMT kernel (which takes everything); wgmma once verified
// on a GPU (kWgmmaByDefault in block_attention_cuda.cu).
BlockAttentionCudaPath block_attention_cuda_default_path(const BlockAttentionParams& p, int device);

// Multiprocessor count of a CUDA device (cached), for the plan.
int block_attention_cuda_num_sms(int device);

// p.part_o / p.part_lse must hold B * Hkv * plan.num_splits slots of [M, D] / [M] floats. Asynchronous on
// `stream` (a cudaStream_t), no host synchronisation.
Status block_attention_cuda(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, void* stream);

}  // namespace tt
