// What the tensor-core split kernels of block attention (sm_80 mma.sync and sm_90a wgmma) share: 16-byte
// cp.async with zero-fill, fp32 pairs packed to bf16/fp16 registers, the online softmax (with per-row key
// limits for causal masking) and the split epilogue on accumulator fragments.
//
// Both MMAs give a warp 16 rows with the same accumulator layout: a thread (lane = 4 grp + tig) holds, for
// each 8-column block j, elements 4j + e at row grp + 8 (e >> 1), column 8j + 2 tig + (e & 1). The helpers
// take the accumulators flat in that order (float[4 * blocks]).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "block_attention/block_attention.h"
#include "block_attention/block_attention_cuda.cuh"

namespace tt {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with valid == false nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix and mma.sync m16n8k16 (sm_80+), shared by the attention mma kernel and the MoE grouped GEMM.
// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] (row) * b[16x8] (col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of the 16-bit type, `lo` in the low half (the lower column of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One online-softmax step on a warp's score tile (NS / 4 blocks of 8 keys): scale to log2 units, mask keys at or
// past `valid[r]` (tile-relative, one limit per row of the thread: the split's end, and the row's own block
// position under causal masking), update the running max m and this thread's share l of the running sum of its
// two rows, turn the scores into unnormalised probabilities in place and return the factor by which the
// output accumulators must be rescaled (the caller applies it: the wgmma consumer does so later, while its
// accumulators may be in flight). A row that has seen no key yet keeps m = -inf, l = 0.
template <int NS>
__device__ __forceinline__ void softmax_scores(float (&s)[NS], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                               const int (&valid)[2], float scale_log2, int tig) {
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int col = (i / 4) * 8 + 2 * tig + (i & 1), r = (i >> 1) & 1;
    s[i] = col < valid[r] ? s[i] * scale_log2 : -INFINITY;
    mx[r] = fmaxf(mx[r], s[i]);
  }
  float ref[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad hold one row's columns
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    ref[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // no key yet: exp2(-inf - 0) = 0, never NaN
    alpha[r] = exp2f(m[r] - ref[r]);            // 0 on the row's first keys (m = -inf)
    m[r] = mx[r];
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    s[i] = exp2f(s[i] - ref[(i >> 1) & 1]);  // masked: exp2(-inf) = 0
    l[(i >> 1) & 1] += s[i];
  }
}

// Tile-relative limits of the thread's two rows for the tile at key t0, clamped to [0, tile] (32-bit compares
// in the softmax).
template <int kTile>
__device__ __forceinline__ void tile_limits(int (&valid)[2], const int64_t (&limit)[2], int64_t t0) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t v = limit[r] - t0;
    valid[r] = v < 0 ? 0 : v > kTile ? kTile : int(v);
  }
}

template <int NO>
__device__ __forceinline__ void rescale_acc(float (&o)[NO], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];
}

// Split epilogue of one warp whose 16 rows start at packed row `row16` (all lanes call it: l is quad-reduced
// here): the normalised output (NO / 4 blocks of 8 dims) and lse (natural log) of each row below M, into
// out / lse for a row's only split, else into the split's partial slot. A row that saw no key (causal
// masking can leave one in a split) gets o = 0, lse = -inf.
template <typename T, int NO>
__device__ __forceinline__ void write_result(const BlockAttentionParams& p, const BaSplitWork& w, int64_t row16,
                                             const float (&o)[NO], const float (&m)[2], float (&l)[2], int grp,
                                             int tig) {
  constexpr float kLn2 = 0.6931471805599453f;
  const int64_t M = ba_rows(p);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row16 + grp + 8 * r;
    if (row >= M) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const BaRowDst<T> dst(p, w, row);
#pragma unroll
    for (int j = 0; j < NO / 4; ++j) {
      const int d = j * 8 + 2 * tig;
      const float v0 = o[4 * j + 2 * r] * inv, v1 = o[4 * j + 2 * r + 1] * inv;
      if (dst.part) {
        *reinterpret_cast<float2*>(dst.part + d) = make_float2(v0, v1);
      } else {
        dst.out[d] = from_float<T>(v0);
        dst.out[d + 1] = from_float<T>(v1);
      }
    }
    if (tig == 0) *dst.lse = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

}  // namespace tt
