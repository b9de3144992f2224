// What the tensor-core split kernels of block attention (sm_80 mma.sync and sm_90a wgmma) share: 16-byte
// cp.async with zero-fill, fp32 pairs packed to bf16/fp16 registers, the online softmax and the partial-state
// epilogue on accumulator fragments, and the once-per-device opt-in to over 48 KiB of dynamic shared memory.
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
// past `valid` (key 0 of a tile is always valid, so each row's new max is finite), update the running max m and
// this thread's share l of the running sum of its two rows, turn the scores into unnormalised probabilities in
// place and rescale the output accumulators o.
template <int NS, int NO>
__device__ __forceinline__ void softmax_step(float (&s)[NS], float (&o)[NO], float (&m)[2], float (&l)[2],
                                             int64_t valid, float scale_log2, int tig) {
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    const int col = (i / 4) * 8 + 2 * tig + (i & 1);
    s[i] = col < valid ? s[i] * scale_log2 : -INFINITY;
    mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
  }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the 4 lanes of a quad hold one row's columns
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    alpha[r] = exp2f(m[r] - mx[r]);  // 0 on the first tile (m = -inf)
    m[r] = mx[r];
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    s[i] = exp2f(s[i] - mx[(i >> 1) & 1]);  // masked: exp2(-inf) = 0
    l[(i >> 1) & 1] += s[i];
  }
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] *= alpha[(i >> 1) & 1];
}

// Split epilogue of one warp whose 16 rows start at packed row `row16` (all lanes call it: l is quad-reduced
// here): the normalised partial output (NO / 4 blocks of 8 dims) and lse (natural log) of each row below M.
template <int NO>
__device__ __forceinline__ void write_partial(const BlockAttentionParams& p, int64_t slot, int64_t row16,
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
    const float inv = 1.f / l[r];  // l >= 1: the row max contributes exp2(0)
    float* const dst = p.part_o + (slot * M + row) * (2 * NO);  // NO / 4 blocks of 8 dims: D = 2 NO
#pragma unroll
    for (int j = 0; j < NO / 4; ++j)
      *reinterpret_cast<float2*>(dst + j * 8 + 2 * tig) = make_float2(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
    if (tig == 0) p.part_lse[slot * M + row] = (m[r] + log2f(l[r])) * kLn2;
  }
}

// Over 48 KiB of dynamic shared memory needs an opt-in per kernel and device; done once (normally on the
// first, eager call, before any graph capture).
template <auto Kernel>
Status ensure_dynamic_smem(int bytes) {
  if (bytes <= 48 * 1024) return Status::kOk;
  static bool opted_in[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return Status::kLaunchFailed;
  if (!opted_in[device]) {
    if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
      return Status::kLaunchFailed;
    opted_in[device] = true;
  }
  return Status::kOk;
}

}  // namespace tt
