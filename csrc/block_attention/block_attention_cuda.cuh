// Internal to the CUDA block attention files (torch-free, device code): what every split kernel shares, and
// the tensor-core split launchers that block_attention_cuda.cu dispatches to before its merge kernel.
// A split kernel CTA owns packed rows (row = s * G + g) of one (b, kv head) and one split of the row's keys.
// A row with one split writes out / lse directly; otherwise split i writes, for its slot
// (b * Hkv + h) * gridDim.x + i, the normalised partial output part_o[slot][row][D] and part_lse[slot][row]
// (natural log; -inf for a row that sees no key of the split, which only causal masking makes possible).
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "block_attention/block_attention.h"
#include "common/half_cuda.cuh"

namespace tt {

// Row b's context length as the kernels use it: clamped to [0, Lmax] (checking would need a host sync).
__device__ __forceinline__ int64_t ba_clamped_ctx(const BlockAttentionParams& p, int64_t b) {
  const int64_t c = p.ctx_lens[b];
  return c < 0 ? 0 : (c > p.ctx_capacity ? p.ctx_capacity : c);
}

// Row b's splits, from its own length (the split and merge kernels agree through this).
__device__ __forceinline__ BaRowSplits ba_device_row_splits(const BlockAttentionParams& p, int64_t b,
                                                            int64_t max_splits, int64_t split_unit, int align) {
  return ba_row_splits(ba_clamped_ctx(p, b) + p.block_len, max_splits, split_unit, align);
}

// The work of one split-kernel CTA, grid (split, kv head x row block, batch): packed rows
// [row0, row0 + rows_per_cta) of KV head h of batch row b, over keys [k0, k1) of the row's virtual sequence
// [context 0..ctx | block]. k0 >= k1: a split this row does not use (the grid is shape-only).
struct BaSplitWork {
  int64_t b, h, row0, ctx, k0, k1, slot;
  bool direct;  // the row's only split: write out / lse, not a partial state
};

__device__ __forceinline__ BaSplitWork ba_split_work(const BlockAttentionParams& p, int64_t rows_per_cta,
                                                     int64_t split_unit, int align) {
  const int64_t row_blocks = (ba_rows(p) + rows_per_cta - 1) / rows_per_cta;
  BaSplitWork w;
  w.b = blockIdx.z;
  w.h = blockIdx.y / row_blocks;
  w.row0 = (blockIdx.y % row_blocks) * rows_per_cta;
  w.ctx = ba_clamped_ctx(p, w.b);
  const BaRowSplits rs = ba_row_splits(w.ctx + p.block_len, gridDim.x, split_unit, align);
  w.k0 = int64_t(blockIdx.x) * rs.chunk;
  w.k1 = min(w.ctx + p.block_len, w.k0 + rs.chunk);
  w.slot = (w.b * p.num_kv_heads + w.h) * gridDim.x + blockIdx.x;
  w.direct = rs.splits == 1;
  return w;
}

// Keys [0, limit) of the split are visible to packed row `row`: all of [k0, k1), or with causal masking only
// the context and the block keys up to the row's own block position s = row / G.
__device__ __forceinline__ int64_t ba_key_limit(const BlockAttentionParams& p, const BaSplitWork& w, int64_t row) {
  if (!p.causal) return w.k1;
  const int64_t own = w.ctx + row / ba_group(p) + 1;
  return own < w.k1 ? own : w.k1;
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

// Where the result of packed row `row` goes: out / lse of (b, s, q head) for a direct split, else the split's
// partial slot. Element d of the row is written through put(d, value).
template <typename T>
struct BaRowDst {
  T* out = nullptr;     // direct: out row (elements)
  float* part = nullptr;  // partial: part_o row
  float* lse = nullptr;

  __device__ __forceinline__ BaRowDst(const BlockAttentionParams& p, const BaSplitWork& w, int64_t row) {
    const int64_t G = ba_group(p), s = row / G, qh = w.h * G + row % G;
    if (w.direct) {
      out = static_cast<T*>(p.out) + w.b * p.o_stride_b + s * p.o_stride_s + qh * p.o_stride_h;
      lse = p.lse + w.b * p.lse_stride_b + qh * p.lse_stride_h + s;
    } else {
      const int64_t M = ba_rows(p);
      part = p.part_o + (w.slot * M + row) * p.head_dim;
      lse = p.part_lse + w.slot * M + row;
    }
  }
  __device__ __forceinline__ void put(int64_t d, float v) const {
    if (out) out[d] = from_float<T>(v);
    else part[d] = v;
  }
};

// Split passes of the tensor-core paths (grid and workspace as the SIMT kernel's; the plan says which variant).
Status block_attention_mma_split(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan,
                                 cudaStream_t stream, std::string* launched);
Status block_attention_wgmma_split(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan,
                                   cudaStream_t stream, std::string* launched);
// Whether the kernel image this build has for the current device holds the tensor-core kernels' bodies
// (cudaFuncGetAttributes: SASS/PTX versions; the wgmma body exists only in sm_90a code).
bool block_attention_mma_image_ok(int device);
bool block_attention_wgmma_image_ok(int device);
// nullptr if the wgmma kernel's K/V tensor maps encode for these inputs, else why not.
const char* block_attention_wgmma_refusal(const BlockAttentionParams& p);

// Over 48 KiB of dynamic shared memory needs an opt-in per kernel and device; done once per byte size
// (normally on the first, eager call, before any graph capture).
template <auto Kernel>
cudaError_t ba_ensure_dynamic_smem(int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static int64_t opted_in[64] = {};
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (opted_in[device] < bytes) {
    if (const cudaError_t e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
        e != cudaSuccess)
      return e;
    opted_in[device] = bytes;
  }
  return cudaSuccess;
}

// Whether a kernel's image for the current device was built from code of at least `min_arch` (10 * major +
// minor): cudaFuncGetAttributes reports the SASS (binaryVersion) and PTX (ptxVersion) versions it loaded.
template <auto Kernel>
bool ba_kernel_image_at_least(int min_arch) {
  cudaFuncAttributes a{};
  if (cudaFuncGetAttributes(&a, Kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; clear it so the next launch check does not see it
    return false;
  }
  return a.binaryVersion >= min_arch && a.ptxVersion >= min_arch;
}

}  // namespace tt
