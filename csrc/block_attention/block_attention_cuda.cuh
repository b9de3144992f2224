// Internal to the CUDA block attention files (torch-free, device code): what every split kernel shares, and
// the tensor-core split launcher that block_attention_cuda.cu dispatches to before its merge kernel.
// Every split kernel writes, for its (b, kv head, split) slot = (b * Hkv + h) * num_splits + split, the
// normalised partial output part_o[slot][row][D] and part_lse[slot][row] (natural log) of the packed rows
// row = s * G + g it owns; a split that holds no key of its row writes lse = -inf only.
#pragma once
#include <cuda_runtime.h>

#include "block_attention/block_attention.h"

namespace tt {

// Row b's context length as the kernels use it: clamped to [0, Lmax] (checking would need a host sync).
__device__ __forceinline__ int64_t ba_clamped_ctx(const BlockAttentionParams& p, int64_t b) {
  const int64_t c = p.ctx_lens[b];
  return c < 0 ? 0 : (c > p.ctx_capacity ? p.ctx_capacity : c);
}

// The work of one split-kernel CTA, grid (split, kv head x row block, batch): packed rows
// [row0, row0 + rows_per_cta) of KV head h of batch row b, over keys [k0, k1) of the row's virtual sequence
// [context 0..ctx | block]. k0 >= k1 for a split past the row's length (the plan is shape-only).
struct BaSplitWork {
  int64_t b, h, row0, ctx, k0, k1, slot;
};

__device__ __forceinline__ BaSplitWork ba_split_work(const BlockAttentionParams& p, int64_t rows_per_cta,
                                                     int64_t split_keys) {
  const int64_t row_blocks = (ba_rows(p) + rows_per_cta - 1) / rows_per_cta;
  BaSplitWork w;
  w.b = blockIdx.z;
  w.h = blockIdx.y / row_blocks;
  w.row0 = (blockIdx.y % row_blocks) * rows_per_cta;
  w.ctx = ba_clamped_ctx(p, w.b);
  w.k0 = int64_t(blockIdx.x) * split_keys;
  w.k1 = min(w.ctx + p.block_len, w.k0 + split_keys);
  w.slot = (w.b * p.num_kv_heads + w.h) * gridDim.x + blockIdx.x;
  return w;
}

// Where the K and V rows of a key of (b, h)'s virtual sequence [context 0..ctx | block 0..S) live: key < ctx in
// the context cache, else row key - ctx of the block tensors. Every split kernel loads its tiles through this.
template <typename T>
struct BaKvRows {
  const T *kc, *vc, *kb, *vb;
  int64_t kc_l, vc_l, kb_s, vb_s, ctx;

  __device__ __forceinline__ BaKvRows(const BlockAttentionParams& p, const BaSplitWork& w)
      : kc(static_cast<const T*>(p.k_ctx) + w.b * p.kc_stride_b + w.h * p.kc_stride_h),
        vc(static_cast<const T*>(p.v_ctx) + w.b * p.vc_stride_b + w.h * p.vc_stride_h),
        kb(static_cast<const T*>(p.k_blk) + w.b * p.kb_stride_b + w.h * p.kb_stride_h),
        vb(static_cast<const T*>(p.v_blk) + w.b * p.vb_stride_b + w.h * p.vb_stride_h),
        kc_l(p.kc_stride_l), vc_l(p.vc_stride_l), kb_s(p.kb_stride_s), vb_s(p.vb_stride_s), ctx(w.ctx) {}

  // Element d of the key's K and V rows (key < ctx + S).
  __device__ __forceinline__ const T* k(int64_t key, int d) const {
    return key < ctx ? kc + key * kc_l + d : kb + (key - ctx) * kb_s + d;
  }
  __device__ __forceinline__ const T* v(int64_t key, int d) const {
    return key < ctx ? vc + key * vc_l + d : vb + (key - ctx) * vb_s + d;
  }
};

// An empty split: mark its rows empty (lse = -inf) so the merge gives it weight 0.
__device__ __forceinline__ void ba_write_empty_split(const BlockAttentionParams& p, const BaSplitWork& w,
                                                     int64_t rows_per_cta) {
  const int64_t M = ba_rows(p);
  for (int64_t i = threadIdx.x; i < rows_per_cta; i += blockDim.x)
    if (w.row0 + i < M) p.part_lse[w.slot * M + w.row0 + i] = -INFINITY;
}

// Split pass of the tensor-core path (grid, plan and workspace as the SIMT kernel's).
Status block_attention_mma_split(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan,
                                 cudaStream_t stream);

// Split pass of the sm_90a TMA + wgmma path (head dim 128). A context cache a TMA tensor map cannot describe
// goes to block_attention_mma_split (its plan fits: the wgmma tile is a multiple of the mma tile).
Status block_attention_wgmma_split(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan,
                                   cudaStream_t stream);
int64_t block_attention_wgmma_tile_keys();

}  // namespace tt
