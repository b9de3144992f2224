// CUDA block attention, flash-decoding style: grid (split, kv head x row block, batch). A CTA owns some of
// the M = S*G packed query rows of one KV head (GQA packing: all those rows share each K/V tile in shared
// memory) and one split of the row's key sequence [context | block], its splits sized from its own length
// (block_attention_cuda_plan.h); a row's only split writes out / lse, several write normalised partial states
// that a second kernel merges with the merge_states math.
// This file holds the SIMT split kernel (fp32 math, every dtype, head dims 1..256: the fallback), the merge
// kernel every path shares, the device queries and the dispatch; the tensor-core split kernels are in
// block_attention_mma_sm80.cu (mma.sync, sm_80+) and block_attention_wgmma_sm90.cu (TMA + wgmma, sm_90a).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "block_attention/block_attention.h"
#include "block_attention/block_attention_cuda.cuh"
#include "common/half_cuda.cuh"

namespace tt {
namespace {

constexpr int kWarps = ba_cuda::kSimtWarps;
constexpr int kRowsPerWarp = ba_cuda::kSimtRowsPerWarp;
constexpr int kRowsPerCta = ba_cuda::kSimtRows;
constexpr int kTile = ba_cuda::kSimtTile;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// kW = output dims per lane (head_dim <= 32 * kW); dims past head_dim are guarded. Shared memory (dynamic,
// ba_cuda::simt_smem): Q [kRowsPerCta][D], K [kTile][pitch] (odd pitch: lane j reads row j conflict-free),
// V [kTile][D], all fp32.
template <typename T, int kW>
__global__ void __launch_bounds__(kWarps * 32) simt_split_kernel(BlockAttentionParams p, int64_t split_unit) {
  extern __shared__ float smem[];
  const int D = int(p.head_dim), pitch = D | 1;
  float* const qs = smem;
  float* const ks = qs + kRowsPerCta * D;
  float* const vs = ks + kTile * pitch;
  const int64_t G = ba_group(p), M = ba_rows(p);
  const BaSplitWork w = ba_split_work(p, kRowsPerCta, split_unit, ba_cuda::kSplitAlign);
  if (w.k0 >= w.k1) return;  // a split this row does not use
  const int64_t b = w.b, h = w.h, row0 = w.row0, k0 = w.k0, k1 = w.k1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kRowsPerCta * D; i += blockDim.x) {
    const int rr = i / D, d = i % D;
    const int64_t r = row0 + rr;
    float x = 0.f;
    if (r < M) x = to_float(q[b * p.q_stride_b + (r / G) * p.q_stride_s + (h * G + r % G) * p.q_stride_h + d]);
    qs[i] = x;
  }
  const BaKvRows<T> rows(p, w);

  float acc[kRowsPerWarp][kW];
  float m[kRowsPerWarp], l[kRowsPerWarp];
  int64_t limit[kRowsPerWarp];  // keys visible to the row (causal masking)
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
    limit[rr] = ba_key_limit(p, w, row0 + warp * kRowsPerWarp + rr);
#pragma unroll
    for (int i = 0; i < kW; ++i) acc[rr][i] = 0.f;
  }

  for (int64_t t0 = k0; t0 < k1; t0 += kTile) {
    const int nt = k1 - t0 < kTile ? int(k1 - t0) : kTile;
    __syncthreads();  // the previous tile is consumed (and q is loaded, on the first step)
    for (int i = threadIdx.x; i < kTile * D; i += blockDim.x) {
      const int j = i / D, d = i % D;
      float kx = 0.f, vx = 0.f;
      if (j < nt) {
        kx = to_float(*rows.k(t0 + j, d));
        vx = to_float(*rows.v(t0 + j, d));
      }
      ks[j * pitch + d] = kx;
      vs[j * D + d] = vx;
    }
    __syncthreads();

    float pj[kRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const float* qrow = qs + (warp * kRowsPerWarp + rr) * D;
      const float* krow = ks + lane * pitch;
      float s = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) s += qrow[d] * krow[d];
      const bool valid = lane < nt && t0 + lane < limit[rr];
      s = valid ? s * p.scale : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(s));  // -inf while the row has seen no key
      pj[rr] = valid ? __expf(s - m_new) : 0.f;
      const float alpha = m[rr] == -INFINITY ? 0.f : __expf(m[rr] - m_new);
      l[rr] = l[rr] * alpha + warp_sum(pj[rr]);
      m[rr] = m_new;
#pragma unroll
      for (int i = 0; i < kW; ++i) acc[rr][i] *= alpha;
    }
    for (int j = 0; j < nt; ++j) {
      float v[kW];
#pragma unroll
      for (int i = 0; i < kW; ++i) v[i] = lane + 32 * i < D ? vs[j * D + lane + 32 * i] : 0.f;
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const float wj = __shfl_sync(kFull, pj[rr], j);
#pragma unroll
        for (int i = 0; i < kW; ++i) acc[rr][i] += wj * v[i];
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = row0 + warp * kRowsPerWarp + rr;
    if (r >= M) continue;
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
    const BaRowDst<T> dst(p, w, r);
#pragma unroll
    for (int i = 0; i < kW; ++i)
      if (lane + 32 * i < D) dst.put(lane + 32 * i, acc[rr][i] * inv);
    if (lane == 0) *dst.lse = l[rr] > 0.f ? m[rr] + logf(l[rr]) : -INFINITY;
  }
}

// One warp per (b, kv head, packed row) of a row with several splits: merge them into out / lse (a row with one
// split was written by it).
template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    merge_kernel(BlockAttentionParams p, int64_t max_splits, int64_t split_unit, int align) {
  const int64_t G = p.num_q_heads / p.num_kv_heads, M = p.block_len * G, D = p.head_dim;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.batch * p.num_kv_heads * M) return;
  const int lane = threadIdx.x % 32;
  const int64_t bh = row / M, r = row % M, b = bh / p.num_kv_heads, h = bh % p.num_kv_heads;
  const int64_t splits = ba_device_row_splits(p, b, max_splits, split_unit, align).splits;
  if (splits == 1) return;
  const float* lse = p.part_lse + bh * max_splits * M + r;
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
        const float wi = merge_weight(lse[i * M], m);
        if (wi != 0.f) a += wi * p.part_o[((bh * max_splits + i) * M + r) * D + d];
      }
    }
    dst[d] = from_float<T>(a * inv);
  }
  if (lane == 0) p.lse[b * p.lse_stride_b + qh * p.lse_stride_h + s] = merge_final_lse(m, wsum);
}

const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "fp32" : t == DType::kBFloat16 ? "bf16" : "fp16";
}

template <typename T, int kW>
Status launch_simt(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream,
                   std::string* launched) {
  constexpr auto kernel = simt_split_kernel<T, kW>;
  if (ba_ensure_dynamic_smem<kernel>(plan.smem_bytes) != cudaSuccess) return Status::kLaunchFailed;
  const dim3 grid(unsigned(plan.grid_x), unsigned(plan.grid_y), unsigned(plan.grid_z));
  kernel<<<grid, plan.threads, plan.smem_bytes, stream>>>(p, plan.split_unit);
  *launched = "simt_split_kernel<" + std::string(dtype_name(p.dtype)) + ",lane_width=" + std::to_string(kW) +
              ",head_dim=" + std::to_string(p.head_dim) + ">";
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

template <typename T>
Status launch_simt_width(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream,
                         std::string* launched) {
  switch (ba_cuda::simt_lane_width(p.head_dim)) {
    case 1: return launch_simt<T, 1>(p, plan, stream, launched);
    case 2: return launch_simt<T, 2>(p, plan, stream, launched);
    case 4: return launch_simt<T, 4>(p, plan, stream, launched);
    default: return launch_simt<T, 8>(p, plan, stream, launched);
  }
}

// The chosen path's split pass, then the shared merge (none when no row can have two splits).
template <typename T>
Status launch(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream,
              std::string* launched) {
  Status st = Status::kUnsupportedShape;
  switch (plan.path) {
    case BlockAttentionCudaPath::kSimt: st = launch_simt_width<T>(p, plan, stream, launched); break;
    case BlockAttentionCudaPath::kMma: st = block_attention_mma_split(p, plan, stream, launched); break;
#ifdef TT_BUILD_HAS_WGMMA
    case BlockAttentionCudaPath::kWgmma: st = block_attention_wgmma_split(p, plan, stream, launched); break;
#else
    case BlockAttentionCudaPath::kWgmma: break;  // not in this build: the plan refused it (wgmma_image false)
#endif
  }
  if (st != Status::kOk) return st;
  *launched += " grid(" + std::to_string(plan.grid_x) + "," + std::to_string(plan.grid_y) + "," +
               std::to_string(plan.grid_z) + ")";
  if (!plan.merge()) return Status::kOk;
  const int64_t rows = p.batch * p.num_kv_heads * ba_rows(p);
  merge_kernel<T><<<unsigned((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(p, plan.grid_x, plan.split_unit,
                                                                                      int(plan.split_align));
  *launched += " + merge_kernel";
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

thread_local std::string g_last_launch;

}  // namespace

BaCudaDevice block_attention_cuda_device(int device) {
  static int major[64], minor[64], sms[64], optin[64], per_sm[64], image[64];
  BaCudaDevice d;
  d.cc = 10 * device_attribute(device, cudaDevAttrComputeCapabilityMajor, major) +
         device_attribute(device, cudaDevAttrComputeCapabilityMinor, minor);
  const int n = device_attribute(device, cudaDevAttrMultiProcessorCount, sms);
  d.num_sms = n > 0 ? n : 1;
  d.smem_optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin, optin);
  d.smem_per_sm = device_attribute(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor, per_sm);
  if (device >= 0 && device < 64) {
    if (image[device] == 0) {  // bit 1: mma body, bit 2: wgmma body, bit 4: queried
      int cur = 0;
      const bool switch_device = cudaGetDevice(&cur) == cudaSuccess && cur != device;
      if (switch_device) (void)cudaSetDevice(device);
#ifdef TT_BUILD_HAS_WGMMA
      const bool wgmma = block_attention_wgmma_image_ok(device);
#else
      const bool wgmma = false;  // built without the CUTLASS headers: no wgmma kernel at all
#endif
      image[device] = 4 | (block_attention_mma_image_ok(device) ? 1 : 0) | (wgmma ? 2 : 0);
      if (switch_device) (void)cudaSetDevice(cur);
    }
    d.mma_image = image[device] & 1;
    d.wgmma_image = image[device] & 2;
  } else {
    d.mma_image = d.wgmma_image = false;
  }
  return d;
}

const char* block_attention_cuda_launch_refusal(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan) {
#ifdef TT_BUILD_HAS_WGMMA
  return plan.path == BlockAttentionCudaPath::kWgmma ? block_attention_wgmma_refusal(p) : nullptr;
#else
  return plan.path == BlockAttentionCudaPath::kWgmma ? "this build has no wgmma kernel (no CUTLASS headers)" : nullptr;
#endif
}

Status block_attention_cuda(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, void* stream) {
  g_last_launch.clear();
  if (p.batch == 0) return Status::kOk;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, plan, s, &g_last_launch);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, plan, s, &g_last_launch);
    case DType::kFloat16: return launch<__half>(p, plan, s, &g_last_launch);
    default: return Status::kUnsupportedDType;
  }
}

const char* block_attention_cuda_last_launch() { return g_last_launch.c_str(); }

}  // namespace tt
