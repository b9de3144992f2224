// The MoE experts on CUDA (see moe.h): route -> up GEMM (+ relu^2) -> down GEMM -> combine on one stream, sized
// for the worst case (min(E, T*k) expert slots), no host synchronisation; moe_cuda_plan.h plans each call.
//
// Route (moe_route.cuh): a block-wide scan builds the offsets and active list. For decode-sized calls the up
// GEMM's CTAs route for themselves (one launch fewer: up, down, combine); otherwise one route CTA runs first.
// Prefill is cut into chunks of tokens, each a full sequence reusing one bounded workspace.
//
// The GEMMs are grouped and bandwidth-bound: CTA (expert slot a, N tile) streams its 64 weight rows of expert
// active[a] once through a cp.async ring and multiplies them with all of that expert's rows (16 or 64 at a time:
// the plan's bm; a decode step or a 16-token pass has 1..3 rows per expert) on mma.sync m16n8k16 (bf16 / fp16,
// fp32 accumulate). A k tile is 128 bytes of every weight row in every format (64 bf16, 128 fp8, 256 int4
// weights), and decode gets enough stages for 32 KiB of weights in flight per CTA. Slots past the active count
// exit at once. fp32 and shapes the tensor-core path cannot take (a K that is not a multiple of 8, unaligned rows)
// use a SIMT kernel with the same grid (moe_cuda_path). The combine sums each token's k slot outputs in j order in
// fp64, so results do not depend on where the route placed the slots.
//
// Quantised weights (fp8 / int4, moe.h): the weight tile streams through the cp.async stages in its stored form
// and each warp dequantises the 16 rows its own ldmatrix reads, 64 k at a time, 8 consecutive k per thread, in
// registers (moe_dequant.cuh: exactly quant.dequantize's numerics) into one shared tile of x's dtype; only a
// __syncwarp separates that from the mma. The SIMT kernel dequantises element by element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "block_attention/block_attention_ptx.cuh"  // cp_async_16, smem_addr, ldmatrix_x4, mma_16816; ba_ensure_dynamic_smem
#include "common/half_cuda.cuh"
#include "moe/moe.h"
#include "moe/moe_cuda_plan.h"
#include "moe/moe_dequant.cuh"
#include "moe/moe_route.cuh"

namespace tt {
namespace {

using moe_cuda::kBN, moe_cuda::kThreads;
constexpr int kRouteThreads = 1024;

MoeWs ws_at(char* base, const MoeCudaWorkspace& l) {
  return MoeWs{reinterpret_cast<int32_t*>(base + l.counts), reinterpret_cast<int32_t*>(base + l.offsets),
               reinterpret_cast<int32_t*>(base + l.active), reinterpret_cast<int32_t*>(base + l.n_active),
               reinterpret_cast<int32_t*>(base + l.slot_token), reinterpret_cast<int32_t*>(base + l.slot_of),
               reinterpret_cast<int32_t*>(base + l.err), reinterpret_cast<double*>(base + l.slot_weight),
               base + l.hidden, reinterpret_cast<float*>(base + l.out_slot)};
}

__device__ __forceinline__ float relu2(float v) {
  const float r = v < 0.f ? 0.f : v;  // NaN passes through
  return r * r;
}

// cp.async.wait_group takes an immediate: the ring depth is a runtime value of the plan.
__device__ __forceinline__ void cp_async_wait_pending(int n) {
  switch (n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    default: cp_async_wait<4>(); break;  // kMaxStages - 2
  }
}

// ---------------------------------------------------------------------------------------------------
// Route in its own launch (one CTA): counts and scan into the workspace, then slot positions by atomics.

__global__ void __launch_bounds__(kRouteThreads) moe_route_kernel(MoeParams p, MoeWs w) {
  extern __shared__ int32_t s_route[];  // [E] counts, then fill cursors; [kMoeScanScratch]
  const int64_t E = p.experts, k = p.topk, n = p.tokens * p.topk;
  int32_t* cnt = s_route;
  moe_route_count(p, n, cnt, w.err);
  moe_route_scan(cnt, E, w.offsets, w.active, w.n_active, cnt + E);
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    w.counts[e] = cnt[e];
    cnt[e] = w.offsets[e];  // the fill cursor
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t e = moe_id_at(p, i);
    if (e < 0 || e >= E) {
      w.slot_of[i] = -1;  // documented: an out-of-range choice contributes 0
      continue;
    }
    const int32_t s = atomicAdd(&cnt[e], 1);
    w.slot_token[s] = int32_t(i / k);
    w.slot_weight[s] = moe_weight_at(p, i);
    w.slot_of[i] = s;
  }
}

// What a GEMM CTA needs from the route: the plan's tile choice, and whether the up GEMM routes for itself.
struct MoeGemmArgs {
  int bm, stages;      // A rows per pass, cp.async stages (mma kernel)
  int fused_route;     // up GEMM: this CTA runs the route (moe_route.cuh) in shared memory
  int64_t route_smem;  // byte offset of the fused route's shared memory
};

// The rows of active expert slot a: expert e, its slots [s0, s0 + M), and (up GEMM) the token of each.
struct ExpertRows {
  int64_t s0, M;
  int32_t e;
  const int32_t* tok;  // tok[m]: token of slot s0 + m
};

// false: slot a is past the active count (the CTA exits). A fused route runs here in every CTA of the up GEMM;
// CTA (0, 0) also writes the counts, offsets, active list and slot lists the down GEMM and the combine read.
template <bool kUp>
__device__ __forceinline__ bool expert_rows(const MoeParams& p, const MoeWs& w, const MoeGemmArgs& ga,
                                            unsigned char* route_smem, ExpertRows& r) {
  const int a = blockIdx.x;
  if (kUp && ga.fused_route) {
    const int64_t E = p.experts, n = p.tokens * p.topk;
    int32_t* cnt = reinterpret_cast<int32_t*>(route_smem);  // [E]
    int32_t* off = cnt + E;                                 // [E + 1]
    int32_t* act = off + E + 1;                             // [E]
    int32_t* tok = act + E;                                 // [n]
    int32_t* scratch = tok + n;                             // [kMoeScanScratch]
    const bool first = blockIdx.x == 0 && blockIdx.y == 0;
    moe_route_count(p, n, cnt, first ? w.err : nullptr);
    moe_route_scan(cnt, E, off, act, &scratch[kMoeScanScratch - 1], scratch);
    const int32_t na = scratch[kMoeScanScratch - 1];
    const int32_t mine = a < na ? act[a] : -1;
    if (mine < 0 && !first) return false;  // past the active count (CTA-uniform)
    if (first) {
      for (int64_t e = threadIdx.x; e <= E; e += blockDim.x) {
        w.offsets[e] = off[e];
        if (e < E) {
          w.counts[e] = cnt[e];
          if (e < na) w.active[e] = act[e];
          cnt[e] = off[e];  // the fill cursor
        }
      }
      if (threadIdx.x == 0) *w.n_active = na;
      __syncthreads();
    }
    if (threadIdx.x < 32) moe_route_fill_ordered(p, n, mine, tok, cnt, w, first);
    __syncthreads();
    if (mine < 0) return false;
    r = ExpertRows{off[mine], off[mine + 1] - off[mine], mine, tok};
    return true;
  }
  if (a >= *w.n_active) return false;
  const int32_t e = w.active[a];
  r = ExpertRows{w.offsets[e], w.counts[e], e, w.slot_token + w.offsets[e]};
  return true;
}

// The weights of expert e for one GEMM: matrix [N, K] (rows ld_w apart, in storage units: elements of T when dense,
// bytes when quantised) and, when quantised, its scales (fp8: fp32 [N]; int4: 16-bit [N, ceil(K / group)]).
template <typename T, MoeWeightFormat F>
using WeightT = std::conditional_t<F == MoeWeightFormat::kDense, T, uint8_t>;

template <typename T, MoeWeightFormat F>
struct GroupGemm {
  int64_t K, N, ld_w;
  const WeightT<T, F>* W;
  const void* scale;
};
template <typename T, MoeWeightFormat F, bool kUp>
__device__ __forceinline__ GroupGemm<T, F> group_gemm(const MoeParams& p, int64_t e) {
  const int64_t K = kUp ? p.hidden : p.inter, N = kUp ? p.inter : p.hidden;
  const int64_t ld_w = kUp ? p.up_stride_n : p.down_stride_n;
  const auto* W =
      static_cast<const WeightT<T, F>*>(kUp ? p.w_up : p.w_down) + e * (kUp ? p.up_stride_e : p.down_stride_e);
  const void* scale = nullptr;
  if constexpr (F == MoeWeightFormat::kFp8) {
    scale = static_cast<const float*>(kUp ? p.up_scale : p.down_scale) + e * N;
  } else if constexpr (F == MoeWeightFormat::kInt4) {
    scale = static_cast<const uint16_t*>(kUp ? p.up_scale : p.down_scale) + e * N * ((K + p.group - 1) / p.group);
  }
  return {K, N, ld_w, W, scale};
}

// Where row m of an expert's A operand lives: up: x[tok[m]]; down: hidden[s0 + m].
template <typename T, bool kUp>
__device__ __forceinline__ const T* a_row(const MoeParams& p, const MoeWs& w, const ExpertRows& ex, int64_t m) {
  if (kUp) return static_cast<const T*>(p.x) + int64_t(ex.tok[m]) * p.x_stride;
  return static_cast<const T*>(w.hidden) + (ex.s0 + m) * p.inter;
}

template <typename T, bool kUp>
__device__ __forceinline__ void epilogue(const MoeParams& p, const MoeWs& w, int64_t slot, int64_t n, float v) {
  if (kUp) static_cast<T*>(w.hidden)[slot * p.inter + n] = from_float<T>(relu2(v));
  else w.out_slot[slot * p.hidden + n] = v;
}

// 16-byte global -> shared copy of which only the first `bytes` (0..16) are read, the rest zero-filled (a
// quantised row's last chunk: its row ends mid-chunk).
__device__ __forceinline__ void cp_async_16_first(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// kSteps k16 steps of this warp's 16 weight rows (B rows [16 warp, 16 warp + 16) of Bt) with the mt m16 tiles of A
// (A columns from a_col on).
template <typename T, int kSteps>
__device__ __forceinline__ void mma_steps(float (&acc)[4][2][4], const T* At, int a_pitch, int a_col, const T* Bt,
                                          int b_pitch, int mt, int warp, int lane) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    uint32_t b[4];  // two n8 tiles of this warp's 16 columns: (k lo, k hi) each
    ldmatrix_x4(b, smem_addr(Bt + (warp * 16 + (lane / 16) * 8 + lane % 8) * b_pitch + kk * 16 + ((lane / 8) % 2) * 8));
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      if (mi >= mt) break;
      uint32_t af[4];
      ldmatrix_x4(af, smem_addr(At + (mi * 16 + lane % 16) * a_pitch + a_col + kk * 16 + (lane / 16) * 8));
      mma_16816<T>(acc[mi][0], af, b[0], b[1]);
      mma_16816<T>(acc[mi][1], af, b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core grouped GEMM (bf16 / fp16). Quantised (F != kDense, S the int4 scale type): the weight tile goes
// through the stages raw (Bq) and is dequantised 64 k at a time into the single tile Bs; warp w writes and reads
// only Bs rows [16 w, 16 w + 16), so __syncwarp orders the two (and the next 64 k after the mma reads), and the
// __syncthreads at the top of the next k step orders this step's reads of the stage before it is refilled.

template <typename T, MoeWeightFormat F, typename S, bool kUp>
__global__ void __launch_bounds__(kThreads) moe_gemm_mma_kernel(MoeParams p, MoeWs w, MoeGemmArgs ga) {
  constexpr bool kQuant = F != MoeWeightFormat::kDense;
  constexpr int kBK = moe_cuda::k_tile(F), kPitch = moe_cuda::pitch(F);
  constexpr int kRaw = moe_cuda::kTileRowBytes, kDq = moe_cuda::kDequantK, kDqPitch = kDq + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  ExpertRows ex;
  if (!expert_rows<kUp>(p, w, ga, smem + ga.route_smem, ex)) return;
  const auto g = group_gemm<T, F, kUp>(p, ex.e);
  const int64_t M = ex.M, K = g.K, N = g.N, ld_w = g.ld_w;
  const int bm = ga.bm, stages = ga.stages;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  const auto* W = g.W + n0 * ld_w;
  T* As = reinterpret_cast<T*>(smem);                                   // [stages][bm][kPitch]
  T* Bs = As + stages * bm * kPitch;  // dense: [stages][kBN][kPitch]; quantised: one dequantised [kBN][kDqPitch]
  uint8_t* Bq = reinterpret_cast<uint8_t*>(Bs + kBN * kDqPitch);          // quantised: [stages][kBN][kRaw]
  uint16_t* Sc = reinterpret_cast<uint16_t*>(Bq + stages * kBN * kRaw);  // int4: [kBN][sp]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t nk = (K + kBK - 1) / kBK;

  // Quantised: this lane dequantises rows warp * 16 + lane / 8 + 4 i (i < 4), k [kq, kq + 8) of every 64 k.
  const int kq = 8 * (lane % 8);
  float scale256[4] = {};  // fp8: the rows' scales times 2^8 (see moe_dequant.cuh)
  int group = 1, sp = 0;  // int4: group size, scale row pitch in Sc
  if constexpr (F == MoeWeightFormat::kFp8) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t n = n0 + warp * 16 + lane / 8 + 4 * i;
      if (n < N) scale256[i] = mul_rn(static_cast<const float*>(g.scale)[n], 256.f);
    }
  } else if constexpr (F == MoeWeightFormat::kInt4) {
    // Every scale of the CTA's rows, once (the m loop below reuses them; rows past N get 0); the first k step's
    // __syncthreads publishes them. The rows are contiguous in the scale tensor. The launch sized Sc for the
    // larger group count of the two GEMMs (moe_int4_groups), so this GEMM's pitch fits.
    group = int(p.group);
    const int ng = int((K + group - 1) / group);
    sp = int(moe_cuda::scale_pitch(ng));
    const uint16_t* src = static_cast<const uint16_t*>(g.scale) + n0 * ng;
    for (int c = tid; c < kBN * ng; c += kThreads) {
      const int r = c / ng;
      Sc[r * sp + c % ng] = n0 + r < N ? src[c] : uint16_t(0);
    }
  }
  const int64_t row_bytes = F == MoeWeightFormat::kFp8 ? K : (K + 1) / 2;  // quantised: stored bytes of a row

  for (int64_t m0 = 0; m0 < M; m0 += bm) {
    const int64_t rows = M - m0 < bm ? M - m0 : bm;
    const int mt = int((rows + 15) / 16);  // m16 tiles in use (warp-uniform)
    auto load = [&](int64_t kt, int st) {
      const int64_t k0 = kt * kBK;
      for (int c = tid; c < mt * 16 * (kBK / 8); c += kThreads) {  // A: 16-byte chunks of the rows in use
        const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
        const bool ok = r < rows && k0 + kc < K;
        const T* src = ok ? a_row<T, kUp>(p, w, ex, m0 + r) + k0 + kc : static_cast<const T*>(p.x);
        cp_async_16(smem_addr(As + (st * bm + r) * kPitch + kc), src, ok);
      }
      if constexpr (!kQuant) {
        for (int c = tid; c < kBN * (kBK / 8); c += kThreads) {  // B: the weight tile
          const int r = c / (kBK / 8), kc = (c % (kBK / 8)) * 8;
          const bool ok = n0 + r < N && k0 + kc < K;
          cp_async_16(smem_addr(Bs + (st * kBN + r) * kPitch + kc), ok ? W + r * ld_w + k0 + kc : W, ok);
        }
      } else {
        const int64_t b0 = kt * kRaw;  // the tile's first byte in a row
        for (int c = tid; c < kBN * (kRaw / 16); c += kThreads) {  // B: the raw weight tile, 16-byte chunks
          const int r = c / (kRaw / 16), cb = (c % (kRaw / 16)) * 16;
          const int64_t left = row_bytes - (b0 + cb);
          const int bytes = n0 + r < N && left > 0 ? (left < 16 ? int(left) : 16) : 0;
          cp_async_16_first(smem_addr(Bq + (st * kBN + r) * kRaw + cb), bytes > 0 ? W + r * ld_w + b0 + cb : W,
                            bytes);
        }
      }
    };
    float acc[4][2][4] = {};
    for (int st = 0; st < stages - 1; ++st) {
      if (st < nk) load(st, st);
      cp_async_commit();
    }
    for (int64_t kt = 0; kt < nk; ++kt) {
      cp_async_wait_pending(stages - 2);
      __syncthreads();
      if (kt + stages - 1 < nk) load(kt + stages - 1, int((kt + stages - 1) % stages));
      cp_async_commit();
      const int st = int(kt % stages);
      const T* At = As + st * bm * kPitch;
      if constexpr (!kQuant) {
        mma_steps<T, kBK / 16>(acc, At, kPitch, 0, Bs + st * kBN * kPitch, kPitch, mt, warp, lane);
      } else {
        const uint8_t* raw = Bq + st * kBN * kRaw;
#pragma unroll 1
        for (int sub = 0; sub < kBK / kDq; ++sub) {
          // K is a multiple of 8 here (moe_cuda_path), so a chunk of 8 k is all inside K or all past it (zeros:
          // a NaN scale must not reach the zero-filled columns of A past K).
          const int kin = sub * kDq + kq;  // k within the tile
          const int64_t k = kt * kBK + kin;
          // int4: the chunk's one group (group % 8 == 0) in the staged scales of the lane's first row
          const int gi = F == MoeWeightFormat::kInt4 && k < K ? int(uint32_t(k) / uint32_t(group)) : 0;
          const uint16_t* sc = Sc + (warp * 16 + lane / 8) * sp + gi;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = warp * 16 + lane / 8 + 4 * i;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (k < K) {
              if constexpr (F == MoeWeightFormat::kFp8)
                v = dequant_fp8x8<T>(*reinterpret_cast<const uint2*>(raw + r * kRaw + kin), scale256[i]);
              else
                v = dequant_int4x8<T, S>(*reinterpret_cast<const uint32_t*>(raw + r * kRaw + kin / 2),
                                         sc[4 * i * sp]);
            }
            *reinterpret_cast<uint4*>(Bs + r * kDqPitch + kq) = v;
          }
          __syncwarp();
          mma_steps<T, kDq / 16>(acc, At, kPitch, sub * kDq, Bs, kDqPitch, mt, warp, lane);
          __syncwarp();  // the next 64 k overwrite this warp's rows of Bs
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next row chunk reuses the stages
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      if (mi >= mt) break;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int64_t row = mi * 16 + lane / 4 + 8 * (q >> 1), col = n0 + warp * 16 + j * 8 + 2 * (lane % 4) + (q & 1);
          if (row < rows && col < N) epilogue<T, kUp>(p, w, ex.s0 + m0 + row, col, acc[mi][j][q]);
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// SIMT grouped GEMM (fp32, and shapes the tensor-core path cannot take): a warp per weight row, lanes over k
// (coalesced), 8 rows of A at a time. Quantised weights are dequantised per element (each once per 8 A rows):
// round_T(float(q) * float(scale)), T = x's dtype (no rounding for fp32).

template <typename T, MoeWeightFormat F>
__device__ __forceinline__ float simt_weight(const MoeParams& p, const WeightT<T, F>* wr, float row_scale,
                                             const uint16_t* row_groups, int64_t k) {
  if constexpr (F == MoeWeightFormat::kDense) {
    return to_float(wr[k]);
  } else if constexpr (F == MoeWeightFormat::kFp8) {
    return to_float(from_float<T>(mul_rn(fp8_to_float_div256(wr[k]), row_scale)));
  } else {
    const uint32_t byte = wr[k >> 1], n = k & 1 ? byte >> 4 : byte & 0xFu;
    const uint16_t sb = row_groups[uint32_t(k) / uint32_t(p.group)];
    const float s = p.scale_dtype == DType::kBFloat16 ? scale_bits_to_float<__nv_bfloat16>(sb)
                                                      : scale_bits_to_float<__half>(sb);
    return to_float(from_float<T>(mul_rn(int4_to_float(n), s)));
  }
}

template <typename T, MoeWeightFormat F, bool kUp>
__global__ void __launch_bounds__(kThreads) moe_gemm_simt_kernel(MoeParams p, MoeWs w, MoeGemmArgs ga) {
  extern __shared__ __align__(16) unsigned char smem[];  // the fused route's, if any
  ExpertRows ex;
  if (!expert_rows<kUp>(p, w, ga, smem + ga.route_smem, ex)) return;
  const auto g = group_gemm<T, F, kUp>(p, ex.e);
  const int64_t M = ex.M, K = g.K, N = g.N, ld_w = g.ld_w;
  const auto* W = g.W;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n_end = int64_t(blockIdx.y) * kBN + kBN < N ? int64_t(blockIdx.y) * kBN + kBN : N;
  for (int64_t n = int64_t(blockIdx.y) * kBN + warp; n < n_end; n += kThreads / 32) {
    const auto* wr = W + n * ld_w;
    float row_scale = 0.f;          // fp8: the row's scale times 2^8
    const uint16_t* row_groups = nullptr;  // int4: the row's group scales
    if constexpr (F == MoeWeightFormat::kFp8) row_scale = mul_rn(static_cast<const float*>(g.scale)[n], 256.f);
    if constexpr (F == MoeWeightFormat::kInt4)
      row_groups = static_cast<const uint16_t*>(g.scale) + n * ((K + p.group - 1) / p.group);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      float acc[8] = {};
      const T* ar[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) ar[r] = m0 + r < M ? a_row<T, kUp>(p, w, ex, m0 + r) : nullptr;
      for (int64_t k = lane; k < K; k += 32) {
        const float wv = simt_weight<T, F>(p, wr, row_scale, row_groups, k);
#pragma unroll
        for (int r = 0; r < 8; ++r)
          if (ar[r] != nullptr) acc[r] += to_float(ar[r][k]) * wv;
      }
#pragma unroll
      for (int r = 0; r < 8; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
        if (lane == 0 && ar[r] != nullptr) epilogue<T, kUp>(p, w, ex.s0 + m0 + r, n, acc[r]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Combine: y[t, n] = sum_j weight(t, j) * out_slot[slot(t, j), n], fp64 in j order; skipped choices add 0.

template <typename T>
__global__ void moe_combine_kernel(MoeParams p, MoeWs w) {
  const int64_t t = blockIdx.x, k = p.topk;
  T* y = static_cast<T*>(p.y) + t * p.y_stride;
  for (int64_t n = threadIdx.x; n < p.hidden; n += blockDim.x) {
    double acc = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t s = w.slot_of[t * k + j];
      if (s >= 0) acc += w.slot_weight[s] * double(w.out_slot[int64_t(s) * p.hidden + n]);
    }
    y[n] = from_float<T>(float(acc));
  }
}

// Both GEMMs of one weight format (S: int4's scale type; unused otherwise) on the plan's path; the up GEMM carries
// the fused route's shared memory when the plan fuses it.
template <typename T, MoeWeightFormat F, typename S>
Status launch_gemms(const MoeParams& p, const MoeWs& w, const MoeCudaPlan& pl, cudaStream_t s, dim3 up_grid,
                    dim3 down_grid) {
  const int fused = pl.fused_route ? 1 : 0;
  if constexpr (!std::is_same_v<T, float>) {
    if (pl.path == MoeCudaPath::kMma) {
      const MoeGemmArgs up{pl.bm, pl.stages, fused, pl.gemm_smem}, down{pl.bm, pl.stages, 0, pl.gemm_smem};
      const int64_t up_smem = pl.gemm_smem + (fused ? pl.route_smem : 0);
      if (ba_ensure_dynamic_smem<moe_gemm_mma_kernel<T, F, S, true>>(up_smem) != cudaSuccess ||
          ba_ensure_dynamic_smem<moe_gemm_mma_kernel<T, F, S, false>>(pl.gemm_smem) != cudaSuccess)
        return Status::kLaunchFailed;
      moe_gemm_mma_kernel<T, F, S, true><<<up_grid, kThreads, up_smem, s>>>(p, w, up);
      moe_gemm_mma_kernel<T, F, S, false><<<down_grid, kThreads, pl.gemm_smem, s>>>(p, w, down);
      return Status::kOk;
    }
  }
  const MoeGemmArgs up{0, 0, fused, 0}, down{0, 0, 0, 0};
  const int64_t up_smem = fused ? pl.route_smem : 0;
  if (ba_ensure_dynamic_smem<moe_gemm_simt_kernel<T, F, true>>(up_smem) != cudaSuccess) return Status::kLaunchFailed;
  moe_gemm_simt_kernel<T, F, true><<<up_grid, kThreads, up_smem, s>>>(p, w, up);
  moe_gemm_simt_kernel<T, F, false><<<down_grid, kThreads, 0, s>>>(p, w, down);
  return Status::kOk;
}

// One chunk of tokens: route (unless fused), up, down, combine.
template <typename T>
Status launch_chunk(const MoeParams& p, const MoeWs& w, const MoeCudaPlan& pl, cudaStream_t s) {
  const int64_t n = p.tokens * p.topk;
  const unsigned slots = unsigned(p.experts < n ? p.experts : n);
  if (slots > 0) {
    if (!pl.fused_route) {
      const int64_t smem = (p.experts + kMoeScanScratch) * 4;
      if (ba_ensure_dynamic_smem<moe_route_kernel>(smem) != cudaSuccess) return Status::kLaunchFailed;
      moe_route_kernel<<<1, kRouteThreads, smem, s>>>(p, w);
    }
    const dim3 up_grid(slots, unsigned((p.inter + kBN - 1) / kBN)), down_grid(slots, unsigned((p.hidden + kBN - 1) / kBN));
    using F = MoeWeightFormat;
    Status st = Status::kOk;
    switch (p.format) {
      case F::kDense: st = launch_gemms<T, F::kDense, T>(p, w, pl, s, up_grid, down_grid); break;
      case F::kFp8: st = launch_gemms<T, F::kFp8, float>(p, w, pl, s, up_grid, down_grid); break;
      case F::kInt4:
        st = p.scale_dtype == DType::kBFloat16
                 ? launch_gemms<T, F::kInt4, __nv_bfloat16>(p, w, pl, s, up_grid, down_grid)
                 : launch_gemms<T, F::kInt4, __half>(p, w, pl, s, up_grid, down_grid);
        break;
    }
    if (st != Status::kOk) return st;
  }
  // k = 0 (no slots): the combine reads no route data and writes zeros.
  moe_combine_kernel<T><<<unsigned(p.tokens), 256, 0, s>>>(p, w);
  return Status::kOk;
}

}  // namespace

int64_t moe_cuda_workspace_bytes(const MoeParams& p) {
  return moe_cuda_workspace(p, moe_cuda_chunk_tokens(p)).total;
}

int64_t moe_cuda_error_offset(const MoeParams& p) { return moe_cuda_workspace(p, moe_cuda_chunk_tokens(p)).err; }

Status moe_experts_cuda(const MoeParams& p, void* workspace, void* stream) {
  if (p.tokens == 0) return Status::kOk;
  if (p.experts > kMoeCudaMaxExperts || p.tokens > INT32_MAX) return Status::kUnsupportedShape;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return Status::kLaunchFailed;
  const MoeCudaPlan pl = moe_cuda_plan(p, block_attention_cuda_device(device));
  if (pl.path == MoeCudaPath::kUnsupported) return Status::kUnsupportedDType;  // a scale dtype
  const MoeWs w = ws_at(static_cast<char*>(workspace), moe_cuda_workspace(p, pl.chunk_tokens));
  auto s = static_cast<cudaStream_t>(stream);
  // The error word collects every chunk's bad ids (the route only ORs into it).
  if (cudaMemsetAsync(w.err, 0, 4, s) != cudaSuccess) return Status::kLaunchFailed;
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2, ids_es = p.ids_int64 ? 8 : 4, w_es = p.weights_fp64 ? 8 : 4;
  for (int64_t t0 = 0; t0 < p.tokens; t0 += pl.chunk_tokens) {
    MoeParams c = p;
    c.tokens = p.tokens - t0 < pl.chunk_tokens ? p.tokens - t0 : pl.chunk_tokens;
    c.x = static_cast<const char*>(p.x) + t0 * p.x_stride * es;
    c.y = static_cast<char*>(p.y) + t0 * p.y_stride * es;
    c.expert_ids = static_cast<const char*>(p.expert_ids) + t0 * p.topk * ids_es;
    c.expert_weights = static_cast<const char*>(p.expert_weights) + t0 * p.topk * w_es;
    Status st = Status::kOk;
    switch (p.dtype) {
      case DType::kFloat32: st = launch_chunk<float>(c, w, pl, s); break;
      case DType::kBFloat16: st = launch_chunk<__nv_bfloat16>(c, w, pl, s); break;
      case DType::kFloat16: st = launch_chunk<__half>(c, w, pl, s); break;
      default: return Status::kUnsupportedDType;
    }
    if (st != Status::kOk) return st;
  }
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace tt
