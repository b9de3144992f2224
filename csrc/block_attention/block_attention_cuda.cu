// CUDA block attention, flash-decoding style: grid (split, kv head x row block, batch). A CTA owns
// kRowsPerCta of the M = S*G packed query rows of one KV head (GQA packing: all those rows share each K/V
// tile in shared memory) and one split of the row's key sequence [context | block]; it writes a
// normalised partial state, and a second kernel merges the splits with the merge_states math.
// This file holds the SIMT split kernel (fp32 math, every dtype, head dims 64/128: the fallback), the merge
// kernel every path shares, and the path choice; the tensor-core split kernels are in
// block_attention_mma_sm80.cu (mma.sync, sm_80+) and block_attention_wgmma_sm90.cu (TMA + wgmma, sm_90a).
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "block_attention/block_attention.h"
#include "block_attention/block_attention_cuda.cuh"
#include "common/half_cuda.cuh"

namespace tt {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kTile = 32;  // keys per step: one per lane for the scores
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) split_kernel(BlockAttentionParams p, int64_t split_keys) {
  constexpr int kPerLane = D / 32;
  __shared__ float qs[kRowsPerCta][D];
  __shared__ float ks[kTile][D + 1];  // +1: lane j reads row j, conflict-free
  __shared__ float vs[kTile][D];
  const int64_t G = ba_group(p), M = ba_rows(p);
  const BaSplitWork w = ba_split_work(p, kRowsPerCta, split_keys);
  if (w.k0 >= w.k1) {
    ba_write_empty_split(p, w, kRowsPerCta);
    return;
  }
  const int64_t b = w.b, h = w.h, row0 = w.row0, k0 = w.k0, k1 = w.k1, slot = w.slot;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kRowsPerCta * D; i += blockDim.x) {
    const int rr = i / D, d = i % D;
    const int64_t r = row0 + rr;
    float x = 0.f;
    if (r < M) x = to_float(q[b * p.q_stride_b + (r / G) * p.q_stride_s + (h * G + r % G) * p.q_stride_h + d]);
    qs[rr][d] = x;
  }
  const BaKvRows<T> rows(p, w);

  float acc[kRowsPerWarp][kPerLane];
  float m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[rr][i] = 0.f;
  }

  for (int64_t t0 = k0; t0 < k1; t0 += kTile) {
    const int nt = k1 - t0 < kTile ? int(k1 - t0) : kTile;
    __syncthreads();  // the previous tile is consumed (and q is loaded, on the first step)
    for (int i = threadIdx.x; i < kTile * D; i += blockDim.x) {
      const int j = i / D, d = i % D;
      const int64_t key = t0 + j;
      float kx = 0.f, vx = 0.f;
      if (j < nt) {
        kx = to_float(*rows.k(key, d));
        vx = to_float(*rows.v(key, d));
      }
      ks[j][d] = kx;
      vs[j][d] = vx;
    }
    __syncthreads();

    float pj[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const float* qrow = qs[warp * kRowsPerWarp + rr];
      float s = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) s += qrow[d] * ks[lane][d];
      s = lane < nt ? s * p.scale : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(s));
      pj[rr] = lane < nt ? __expf(s - m_new) : 0.f;
      const float alpha = m[rr] == -INFINITY ? 0.f : __expf(m[rr] - m_new);
      l[rr] = l[rr] * alpha + warp_sum(pj[rr]);
      m[rr] = m_new;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[rr][i] *= alpha;
    }
    for (int j = 0; j < nt; ++j) {
      float v[kPerLane];
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) v[i] = vs[j][lane + 32 * i];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const float w = __shfl_sync(kFull, pj[rr], j);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) acc[rr][i] += w * v[i];
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = row0 + warp * kRowsPerWarp + rr;
    if (r >= M) continue;
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
    float* dst = p.part_o + (slot * M + r) * D;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) dst[lane + 32 * i] = acc[rr][i] * inv;
    if (lane == 0) p.part_lse[slot * M + r] = l[rr] > 0.f ? m[rr] + logf(l[rr]) : -INFINITY;
  }
}

// One warp per (b, kv head, packed row): merge the splits' partial states into out / lse.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) merge_kernel(BlockAttentionParams p, int64_t splits) {
  const int64_t G = p.num_q_heads / p.num_kv_heads, M = p.block_len * G, D = p.head_dim;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.batch * p.num_kv_heads * M) return;
  const int lane = threadIdx.x % 32;
  const int64_t bh = row / M, r = row % M, b = bh / p.num_kv_heads, h = bh % p.num_kv_heads;
  const float* lse = p.part_lse + bh * splits * M + r;
  const float m = merge_max_lse(lse, splits, M);
  float wsum = 0.f;
  if (m != -INFINITY)
    for (int64_t i = 0; i < splits; ++i) wsum += merge_weight(lse[i * M], m);
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  const int64_t s = r / G, qh = h * G + r % G;
  T* dst = static_cast<T*>(p.out) + b * p.o_stride_b + s * p.o_stride_s + qh * p.o_stride_h;
  for (int64_t d = lane; d < D; d += 32) {
    float a = 0.f;
    if (m != -INFINITY) {
      for (int64_t i = 0; i < splits; ++i) {
        const float w = merge_weight(lse[i * M], m);
        if (w != 0.f) a += w * p.part_o[((bh * splits + i) * M + r) * D + d];
      }
    }
    dst[d] = from_float<T>(a * inv);
  }
  if (lane == 0) p.lse[b * p.lse_stride_b + qh * p.lse_stride_h + s] = merge_final_lse(m, wsum);
}

template <typename T, int D>
Status launch_simt(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream) {
  const int64_t M = ba_rows(p), row_blocks = (M + kRowsPerCta - 1) / kRowsPerCta;
  if (plan.num_splits > 0x7fffffff || p.num_kv_heads * row_blocks > 65535 || p.batch > 65535)
    return Status::kUnsupportedShape;
  const dim3 grid(unsigned(plan.num_splits), unsigned(p.num_kv_heads * row_blocks), unsigned(p.batch));
  split_kernel<T, D><<<grid, kWarps * 32, 0, stream>>>(p, plan.split_keys);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

// The chosen path's split pass, then the shared merge.
template <typename T>
Status launch(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream) {
  Status st = Status::kUnsupportedShape;
  switch (plan.path) {
    case BlockAttentionCudaPath::kSimt:
      st = p.head_dim == 64    ? launch_simt<T, 64>(p, plan, stream)
           : p.head_dim == 128 ? launch_simt<T, 128>(p, plan, stream)
                               : Status::kUnsupportedShape;
      break;
    case BlockAttentionCudaPath::kMma: st = block_attention_mma_split(p, plan, stream); break;
    case BlockAttentionCudaPath::kWgmma: st = block_attention_wgmma_split(p, plan, stream); break;
  }
  if (st != Status::kOk) return st;
  const int64_t rows = p.batch * p.num_kv_heads * ba_rows(p);
  merge_kernel<T><<<unsigned((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(p, plan.num_splits);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

// Cached per-device attribute (plan-time queries must stay cheap: the binding asks on every call).
int device_attribute(int device, cudaDeviceAttr attr, int (&cache)[64]) {
  if (device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, attr, device) != cudaSuccess || v <= 0) v = -1;
    cache[device] = v;
  }
  return cache[device] > 0 ? cache[device] : 0;
}

int compute_capability(int device) {
  static int major[64] = {}, minor[64] = {};
  return 10 * device_attribute(device, cudaDevAttrComputeCapabilityMajor, major) +
         device_attribute(device, cudaDevAttrComputeCapabilityMinor, minor);
}

// Pointer and every stride (elements of `elem_bytes`) multiples of `align` bytes.
bool aligned(const void* ptr, int64_t elem_bytes, int64_t align, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(align) != 0) return false;
  for (const int64_t s : strides)
    if ((s * elem_bytes) % align != 0) return false;
  return true;
}

// The tensor-core paths load K/V rows with 16-byte copies (cp.async, TMA) and Q with 4-byte (mma) or
// 16-byte (wgmma) loads; head dims 64/128 keep every row a whole number of 16-byte chunks.
bool tensor_core_inputs(const BlockAttentionParams& p, int64_t q_align) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  return aligned(p.q, 2, q_align, {p.q_stride_b, p.q_stride_s, p.q_stride_h}) &&
         aligned(p.k_blk, 2, 16, {p.kb_stride_b, p.kb_stride_s, p.kb_stride_h}) &&
         aligned(p.v_blk, 2, 16, {p.vb_stride_b, p.vb_stride_s, p.vb_stride_h}) &&
         aligned(p.k_ctx, 2, 16, {p.kc_stride_b, p.kc_stride_l, p.kc_stride_h}) &&
         aligned(p.v_ctx, 2, 16, {p.vc_stride_b, p.vc_stride_l, p.vc_stride_h});
}

}  // namespace

int64_t block_attention_cuda_tile_keys(BlockAttentionCudaPath path, int64_t) {
  switch (path) {
    case BlockAttentionCudaPath::kSimt: return kTile;
    case BlockAttentionCudaPath::kMma: return 64;
    case BlockAttentionCudaPath::kWgmma: return block_attention_wgmma_tile_keys();
  }
  return kTile;
}

bool block_attention_cuda_path_supported(const BlockAttentionParams& p, BlockAttentionCudaPath path, int device) {
  if (!block_attention_cuda_supports(p.head_dim)) return false;
  switch (path) {
    case BlockAttentionCudaPath::kSimt: return true;
    case BlockAttentionCudaPath::kMma: return tensor_core_inputs(p, 4) && compute_capability(device) >= 80;
    // wgmma / setmaxnreg exist only on sm_90a (compute capability 9.0 exactly).
    case BlockAttentionCudaPath::kWgmma:
      return p.head_dim == 128 && tensor_core_inputs(p, 16) && compute_capability(device) == 90;
  }
  return false;
}

const char* block_attention_cuda_path_requirements(BlockAttentionCudaPath path) {
  switch (path) {
    case BlockAttentionCudaPath::kSimt: return "simt takes float32/bfloat16/float16 with head_dim 64 or 128";
    case BlockAttentionCudaPath::kMma:
      return "mma needs bfloat16/float16 inputs, head_dim 64 or 128, 16-byte aligned k/v pointers and strides "
             "(4-byte for q) and an sm_80+ device";
    case BlockAttentionCudaPath::kWgmma:
      return "wgmma needs bfloat16/float16 inputs, head_dim 128, 16-byte aligned q/k/v pointers and strides and "
             "an sm_90 (Hopper) device";
  }
  return "unknown path";
}

// The sm_90a wgmma kernel is compiled in CI but has not yet run on a Hopper GPU (none was available to this
// project so far). An unverified kernel must not silently become what H100/H200 users get, so it runs only
// when TWOTOWER_ATTN_PATH=wgmma asks for it; set this to true once tools/gpu_check.sh passes on an sm_90 device.
constexpr bool kWgmmaByDefault = false;

BlockAttentionCudaPath block_attention_cuda_default_path(const BlockAttentionParams& p, int device) {
  if (kWgmmaByDefault && block_attention_cuda_path_supported(p, BlockAttentionCudaPath::kWgmma, device))
    return BlockAttentionCudaPath::kWgmma;
  if (block_attention_cuda_path_supported(p, BlockAttentionCudaPath::kMma, device)) return BlockAttentionCudaPath::kMma;
  return BlockAttentionCudaPath::kSimt;
}

int block_attention_cuda_num_sms(int device) {
  static int cached[64] = {};
  const int n = device_attribute(device, cudaDevAttrMultiProcessorCount, cached);
  return n > 0 ? n : 1;
}

Status block_attention_cuda(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, void* stream) {
  if (p.batch == 0) return Status::kOk;
  if (!block_attention_cuda_supports(p.head_dim)) return Status::kUnsupportedShape;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, plan, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, plan, s);
    case DType::kFloat16: return launch<__half>(p, plan, s);
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace tt
