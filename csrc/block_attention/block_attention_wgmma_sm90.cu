// Tensor-core split pass of block attention for sm_90a, head_dim 128, bf16/fp16: TMA + wgmma,
// warp-specialised in the FlashAttention-3 way. At the model's shapes (S 16 x GQA group 16 = 256 packed rows
// per KV head) each K/V tile feeds 128 rows per CTA: the pass is tensor-core bound, and Hopper's
// asynchronous 64-row warpgroup MMAs fed straight from shared memory are where its speed is.
//
// CTA = (split, kv head x row block, batch) as every split kernel (block_attention_cuda.cuh).
// Warpgroup 0 produces: it fills a kStages ring of K/V tiles (kTileN keys x 128 dims, each stored as two
// 64-dim halves of 128-byte rows, 128-byte swizzle) and hands most of its registers to the consumers
// (setmaxnreg). A tile wholly inside the row's context comes by TMA (a 4-D tensor map over the strided cache
// [B, Lmax, Hkv, D]). The tile that reaches the context's end - the last context keys, the block's S keys,
// zeros past the split - is copied by the producer's threads with cp.async into the same swizzled layout, so
// cache rows past ctx_lens[b] are never read and no stale NaN can reach P V.
// Warpgroups 1..kConsumers own 64 packed query rows each: Q lives in shared memory (swizzled, loaded once);
// per tile S = Q K^T by wgmma m64n128k16 (both operands from shared memory), the online softmax in registers
// (fp32, log2 units, as the sm_80 kernel), P rounded to the input dtype as the register A operand, and
// O += P V by wgmma with V read MN-major from the same tile. Full / empty mbarriers per stage order the two.
// FlashAttention-3's overlap: a consumer issues S(i+1) = Q K(i+1)^T before O += P(i) V(i) and runs the softmax
// of tile i+1 while that product is in flight (intra-warpgroup), and the two consumers take turns issuing
// their GEMMs (ping-pong on two named barriers), so one's softmax runs under the other's tensor-core work.
// A consumer therefore holds two stages (V of tile i, K of tile i+1): the ring has three.
#include <cuda.h>          // CUtensorMap and its enums
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <cute/arch/config.hpp>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "block_attention/block_attention.h"
#include "block_attention/block_attention_cuda.cuh"
#include "block_attention/block_attention_ptx.cuh"

namespace tt {
namespace {

constexpr int kD = ba_cuda::kWgmmaDim;         // head dim of this path
constexpr int kTileN = ba_cuda::kWgmmaTile;    // keys per tile
constexpr int kStages = ba_cuda::kWgmmaStages;  // K/V ring depth (3 x 64 KiB)
constexpr int kRowBytes = 128;                 // one swizzle row: 64 dims of a 16-bit type
constexpr int kHalfBytes = kTileN * kRowBytes;  // one 64-dim half of a K or V tile (16 KiB)
constexpr int kStageBytes = 4 * kHalfBytes;     // K halves 0, 1 then V halves 0, 1
constexpr int kQHalfBytes = 64 * kRowBytes;     // one 64-dim half of a consumer's 64 Q rows (8 KiB)

static_assert(ba_cuda::wgmma_smem(2, kStages) ==
                  1024 /*alignment slack*/ + kStages * kStageBytes + 2 * 2 * kQHalfBytes + 2 * kStages * 8,
              "the plan's shared-memory size is this kernel's layout");

// Device code exists only in the sm_90a pass (the sm_80 pass of this file compiles an empty kernel).
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED) && defined(CUTE_ARCH_TMA_SM90_ENABLED)
#define TT_SM90A_DEVICE 1
// Byte offset of 16-byte chunk c (0..7) of row r in a 128-byte-swizzled region: what TMA's SWIZZLE_128B
// writes and wgmma's 128-byte swizzle mode reads (the region 1024-byte aligned).
__device__ __forceinline__ uint32_t swz(int r, int c) { return uint32_t(r * kRowBytes + ((c ^ (r & 7)) << 4)); }

// wgmma shared-memory descriptor, 128-byte swizzle: start address, leading / stride byte offsets (>> 4).
// K-major operands (Q, K): SBO = 1024 (8 rows of 128 B), LBO unused. MN-major V: LBO = the distance between
// the two 64-dim halves, SBO = 1024 (8 keys).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32) |
         (uint64_t(1) << 62);
}

template <typename T>
struct Gmma;
template <>
struct Gmma<__nv_bfloat16> {
  using SS = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using RS = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};
template <>
struct Gmma<__half> {
  using SS = cute::SM90::GMMA::MMA_64x128x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using RS = cute::SM90::GMMA::MMA_64x128x16_F32F16F16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};

#define TT_ACC64(a)                                                                                              \
  a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15], a[16],   \
      a[17], a[18], a[19], a[20], a[21], a[22], a[23], a[24], a[25], a[26], a[27], a[28], a[29], a[30], a[31],   \
      a[32], a[33], a[34], a[35], a[36], a[37], a[38], a[39], a[40], a[41], a[42], a[43], a[44], a[45], a[46],   \
      a[47], a[48], a[49], a[50], a[51], a[52], a[53], a[54], a[55], a[56], a[57], a[58], a[59], a[60], a[61],   \
      a[62], a[63]

// The compiler sees a wgmma as finishing when its asm statement does; these empty volatile statements pin the
// accumulator registers between the fence / wait instructions (as CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void fence_regs(float (&r)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) cute::warpgroup_fence_operand(r[i]);
}

__device__ __forceinline__ void fence_regs(uint32_t (&r)[8][4]) {
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) cute::warpgroup_fence_operand(r[i][j]);
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Named barriers: 0 is __syncthreads, 1 the producer's copies, 2..3 the consumers' Q loads, 4..5 the
// consumers' turns to issue GEMMs (ping-pong).
constexpr int kSchedBarrier = 4;

#endif  // TT_SM90A_DEVICE

template <typename T, int kConsumers>
__global__ void __launch_bounds__((kConsumers + 1) * 128, 1)
    wgmma_split_kernel(const BlockAttentionParams p, const __grid_constant__ CUtensorMap tm_k,
                       const __grid_constant__ CUtensorMap tm_v, int64_t split_unit) {
#ifdef TT_SM90A_DEVICE
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 x 40 + 256 x 232 <= 64 K registers
  constexpr int kRows = 64 * kConsumers;
  constexpr float kLog2e = 1.4426950408889634f;

  const int64_t G = ba_group(p), M = ba_rows(p);
  const BaSplitWork w = ba_split_work(p, kRows, split_unit, kTileN);  // whole tiles (the plan's split_align)
  if (w.k0 >= w.k1) return;  // a split this row does not use
  const int64_t b = w.b, h = w.h, ctx = w.ctx, k0 = w.k0, k1 = w.k1;
  const int64_t tiles = (k1 - k0 + kTileN - 1) / kTileN;

  extern __shared__ unsigned char smem_raw[];
  unsigned char* const smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* const q_smem = smem + kStages * kStageBytes;
  uint64_t* const full = reinterpret_cast<uint64_t*>(q_smem + kConsumers * 2 * kQHalfBytes);
  uint64_t* const empty = full + kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&full[s], 1);
      Barrier::init(&empty[s], kConsumers * 128);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128, wtid = threadIdx.x % 128;
  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    if constexpr (kConsumers > 1) cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (wtid == 0) {
      cute::prefetch_tma_descriptor(&tm_k);
      cute::prefetch_tma_descriptor(&tm_v);
    }
    const BaKvRows<T> rows(p, w);
    for (int64_t it = 0; it < tiles; ++it) {
      const int stage = int(it % kStages);
      if (it >= kStages) Barrier::wait(&empty[stage], uint32_t((it / kStages - 1) & 1));
      unsigned char* const ks = smem + stage * kStageBytes;
      unsigned char* const vs = ks + 2 * kHalfBytes;
      const int64_t t0 = k0 + it * kTileN;
      if (t0 + kTileN <= ctx) {
        if (wtid == 0) {
          Barrier::arrive_and_expect_tx(&full[stage], kStageBytes);
          constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
          for (int half = 0; half < 2; ++half) {
            cute::SM90_TMA_LOAD_4D::copy(&tm_k, &full[stage], kHint, ks + half * kHalfBytes, half * 64, int32_t(h),
                                         int32_t(t0), int32_t(b));
            cute::SM90_TMA_LOAD_4D::copy(&tm_v, &full[stage], kHint, vs + half * kHalfBytes, half * 64, int32_t(h),
                                         int32_t(t0), int32_t(b));
          }
        }
      } else {
        // The tile reaching the context's end: row j holds key t0 + j of [context | block], zeros at or past k1.
        cutlass::arch::fence_view_async_shared();  // the consumers' wgmma reads of this stage came first
        for (int i = wtid; i < kTileN * 16; i += 128) {
          const int j = i / 16, c = i % 16;  // key row, 16-byte chunk of the 128 dims
          const int64_t key = t0 + j;
          const bool valid = key < k1;  // past it: nothing read (key 0's rows stand in), zeros written
          const T* const ksrc = rows.k(valid ? key : 0, c * 8);
          const T* const vsrc = rows.v(valid ? key : 0, c * 8);
          const uint32_t off = (c / 8) * kHalfBytes + swz(j, c % 8);
          cp_async_16(smem_addr(ks + off), ksrc, valid);
          cp_async_16(smem_addr(vs + off), vsrc, valid);
        }
        cp_async_commit();
        cp_async_wait<0>();
        cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> visible to wgmma (async proxy)
        named_barrier_sync(1, 128);
        if (wtid == 0) Barrier::arrive(&full[stage]);
      }
    }
    return;
  }

  // ------------------------------------------------------------------ consumers
  if constexpr (kConsumers > 1) cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int cw = wg - 1, warp = wtid / 32, lane = wtid % 32, grp = lane >> 2, tig = lane & 3;
  const int64_t row_base = w.row0 + cw * 64;  // this warpgroup's first packed row
  unsigned char* const qs = q_smem + cw * 2 * kQHalfBytes;
  for (int i = wtid; i < 64 * 16; i += 128) {  // Q rows (zeros past M) into the swizzled K-major layout
    const int r = i / 16, c = i % 16;
    const int64_t row = row_base + r;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (row < M)
      v = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + b * p.q_stride_b + (row / G) * p.q_stride_s +
                                          (h * G + row % G) * p.q_stride_h + c * 8);
    *reinterpret_cast<uint4*>(qs + (c / 8) * kQHalfBytes + swz(r, c % 8)) = v;
  }
  cutlass::arch::fence_view_async_shared();
  named_barrier_sync(2 + cw, 128);

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows grp, grp + 8 of this warp (log2 units)
  float l[2] = {0.f, 0.f};              // this thread's share of the running sums (quad-reduced at the end)
  float alpha[2] = {0.f, 0.f};          // rescale of O owed by the last softmax (applied before its P V)
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t q_addr = smem_addr(qs);
  const int64_t limit[2] = {ba_key_limit(p, w, row_base + warp * 16 + grp),
                            ba_key_limit(p, w, row_base + warp * 16 + grp + 8)};
  float s[64];
  uint32_t pa[8][4];  // P of the last softmaxed tile as wgmma A fragments

  // S = Q K^T over the 128 dims of `stage`: 8 k-steps of 16, 4 per 64-dim half (32 bytes apart in a swizzle row).
  auto issue_qk = [&](int stage) {
    const uint32_t k_addr = smem_addr(smem + stage * kStageBytes);
    fence_regs(s);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kd = 0; kd < kD / 16; ++kd) {
      const uint32_t koff = uint32_t(kd % 4) * 32;
      const uint64_t da = desc_sw128(q_addr + (kd / 4) * kQHalfBytes + koff, 16, 1024);
      const uint64_t db = desc_sw128(k_addr + (kd / 4) * kHalfBytes + koff, 16, 1024);
      Gmma<T>::SS::fma(da, db, TT_ACC64(s),
                       kd == 0 ? cute::SM90::GMMA::ScaleOut::Zero : cute::SM90::GMMA::ScaleOut::One);
    }
    cute::warpgroup_commit_batch();
  };
  // O += P V of `stage`: V's 16 keys of step kk are 16 rows of 128 bytes (2048 bytes) further; its halves LBO apart.
  auto issue_pv = [&](int stage) {
    const uint32_t v_addr = smem_addr(smem + stage * kStageBytes) + 2 * kHalfBytes;
    fence_regs(o);
    fence_regs(pa);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < kTileN / 16; ++kk) {
      const uint64_t dv = desc_sw128(v_addr + uint32_t(kk) * 16 * kRowBytes, kHalfBytes, 1024);
      Gmma<T>::RS::fma(pa[kk][0], pa[kk][1], pa[kk][2], pa[kk][3], dv, TT_ACC64(o), cute::SM90::GMMA::ScaleOut::One);
    }
    cute::warpgroup_commit_batch();
  };
  // Online softmax of the finished S of the tile at key t0 (keys at or past the split's end, or past the row's
  // own block position, masked); leaves the O rescale in alpha. Touches neither o nor pa (in flight).
  // The closing fences keep the softmax ahead of warpgroup_wait<0> in the PTX. (ptxas 13.0 still schedules the
  // wait right after the scaling and masking, so in the SASS only those overlap the P V in flight; the max,
  // exp and sum run after it, under the other consumer's GEMMs.)
  auto softmax = [&](int64_t t0) {
    fence_regs(s);
    int valid[2];
    tile_limits<kTileN>(valid, limit, t0);
    softmax_scores(s, m, l, alpha, valid, scale_log2, tig);
    fence_regs(s);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      cute::warpgroup_fence_operand(m[r]);
      cute::warpgroup_fence_operand(l[r]);
      cute::warpgroup_fence_operand(alpha[r]);
    }
  };
  // P as wgmma A fragments: score blocks 2kk, 2kk + 1 are the A operand of keys 16kk .. 16kk + 15.
  auto pack_p = [&] {
    fence_regs(pa);  // the P V that read the previous P has completed (after a wait): its registers are free
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  // Ping-pong: consumer cw issues its GEMMs of a phase once the other has issued its own of the previous one.
  // Both consumers run the same `tiles` phases; consumer 1 opens (the first arrive on consumer 0's barrier)
  // and skips its last hand-over, so every arrive meets a sync and no barrier is left half-arrived at exit.
  auto turn_wait = [&] {
    if constexpr (kConsumers == 2) named_barrier_sync(kSchedBarrier + cw, 256);
  };
  auto turn_pass = [&](bool last) {
    if constexpr (kConsumers == 2)
      if (!(last && cw == 1)) named_barrier_arrive(kSchedBarrier + (1 - cw), 256);
  };
  if constexpr (kConsumers == 2)
    if (cw == 1) named_barrier_arrive(kSchedBarrier, 256);

  Barrier::wait(&full[0], 0u);
  turn_wait();
  issue_qk(0);
  turn_pass(tiles == 1);
  cute::warpgroup_wait<0>();
  softmax(k0);
  pack_p();
  for (int64_t it = 1; it < tiles; ++it) {
    const int stage = int(it % kStages), prev = int((it - 1) % kStages);
    rescale_acc(o, alpha);  // O (tiles < it - 1) to the max of tile it - 1, before P(it - 1) V(it - 1) joins it
    Barrier::wait(&full[stage], uint32_t((it / kStages) & 1));
    turn_wait();
    issue_qk(stage);
    issue_pv(prev);
    turn_pass(it + 1 == tiles);
    cute::warpgroup_wait<1>();  // S(it) is done; P(it - 1) V(it - 1) may still run
    softmax(k0 + it * kTileN);
    cute::warpgroup_wait<0>();
    fence_regs(o);
    Barrier::arrive(&empty[prev]);  // this thread is done reading tile it - 1 (its K long ago, its V now)
    pack_p();
  }
  rescale_acc(o, alpha);
  const int last = int((tiles - 1) % kStages);
  issue_pv(last);
  cute::warpgroup_wait<0>();
  fence_regs(o);
  fence_regs(pa);
  Barrier::arrive(&empty[last]);

  write_result<T>(p, w, row_base + warp * 16, o, m, l, grp, tig);
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled without sm_90a features (sm_80 pass, PTX, plain sm_90): the launcher refuses first
#endif
}

#ifdef TT_SM90A_DEVICE
#undef TT_ACC64
#undef TT_SM90A_DEVICE
#endif

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
               : nullptr;
  }();
  return fn;
}

// A 4-D map over a context cache [B, L, H, 128] (element strides sb, sl, sh): boxes of 64 dims x 1 head x
// kTileN keys x 1 row, 128-byte swizzle. Size-1 dims get a harmless stride (torch leaves theirs arbitrary).
// nullptr on success, else why not.
const char* encode_kv_map(CUtensorMap& map, const void* base, DType dtype, int64_t B, int64_t L, int64_t H,
                          int64_t sb, int64_t sl, int64_t sh) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return "the CUDA driver has no cuTensorMapEncodeTiled (a driver for CUDA 12.0 or later is needed)";
  if (L <= 0 || L > (int64_t(1) << 31) - kTileN) return "the context cache is longer than a TMA tensor map can index";
  const int64_t bh = H == 1 ? 2 * kD : 2 * sh, bl = L == 1 ? bh * H : 2 * sl, bb = B == 1 ? bl * L : 2 * sb;
  const cuuint64_t dims[4] = {cuuint64_t(kD), cuuint64_t(H), cuuint64_t(L), cuuint64_t(B)};
  const cuuint64_t strides[3] = {cuuint64_t(bh), cuuint64_t(bl), cuuint64_t(bb)};
  const cuuint32_t box[4] = {64, 1, kTileN, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const auto type = dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = encode(&map, type, 4, const_cast<void*>(base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? nullptr
                           : "cuTensorMapEncodeTiled rejected the context cache (its address and strides must be "
                             "16-byte aligned and its strides below 2^40 bytes)";
}

// Both maps (none without a context: there are no TMA tiles then, the maps stay zero and are never used).
const char* encode_kv_maps(const BlockAttentionParams& p, CUtensorMap& tm_k, CUtensorMap& tm_v) {
  if (p.ctx_capacity <= 0) return nullptr;
  if (const char* why = encode_kv_map(tm_k, p.k_ctx, p.dtype, p.batch, p.ctx_capacity, p.num_kv_heads, p.kc_stride_b,
                                      p.kc_stride_l, p.kc_stride_h))
    return why;
  return encode_kv_map(tm_v, p.v_ctx, p.dtype, p.batch, p.ctx_capacity, p.num_kv_heads, p.vc_stride_b, p.vc_stride_l,
                       p.vc_stride_h);
}

template <typename T, int kConsumers>
Status launch(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream,
              std::string* launched) {
  constexpr auto kernel = wgmma_split_kernel<T, kConsumers>;
  if (ba_cuda::wgmma_smem(kConsumers, kStages) != plan.smem_bytes || plan.rows_per_cta != 64 * kConsumers ||
      plan.threads != (kConsumers + 1) * 128)
    return Status::kUnsupportedShape;  // the plan and the kernel disagree
  // Never a silent fallback: an image without the sm_90a body, or a cache TMA cannot describe, is an error
  // (the binding names it first through block_attention_cuda_device / block_attention_wgmma_refusal).
  if (!block_attention_wgmma_image_ok(-1)) return Status::kLaunchFailed;
  CUtensorMap tm_k{}, tm_v{};
  if (encode_kv_maps(p, tm_k, tm_v) != nullptr) return Status::kLaunchFailed;
  if (ba_ensure_dynamic_smem<kernel>(plan.smem_bytes) != cudaSuccess) return Status::kLaunchFailed;
  const dim3 grid(unsigned(plan.grid_x), unsigned(plan.grid_y), unsigned(plan.grid_z));
  kernel<<<grid, plan.threads, plan.smem_bytes, stream>>>(p, tm_k, tm_v, plan.split_unit);
  *launched = std::string("wgmma_split_kernel<") + (p.dtype == DType::kBFloat16 ? "bf16" : "fp16") +
              ",head_dim=128,consumers=" + std::to_string(kConsumers) + ",stages=" + std::to_string(kStages) + ">";
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace

bool block_attention_wgmma_image_ok(int device) {
#ifdef TT_BUILD_HAS_SM90A
  static int cached[64] = {};
  int cur = device;
  if (cur < 0 && cudaGetDevice(&cur) != cudaSuccess) return false;
  if (cur < 0 || cur >= 64) return false;
  // The body exists only in sm_90a SASS: the image loaded for this device must be SASS for 9.0 from 9.0 PTX
  // (a PTX JIT from compute_80 reports ptxVersion 80). A build listing plain 90 as well as 90a could still load
  // the plain sm_90 image, whose kernel traps; TT_BUILD_HAS_SM90A says 90a is in the build at all.
  if (cached[cur] == 0)
    cached[cur] = ba_kernel_image_at_least<wgmma_split_kernel<__nv_bfloat16, 2>>(90) ? 1 : -1;
  return cached[cur] > 0;
#else
  (void)device;
  return false;  // no sm_90a code in this build
#endif
}

const char* block_attention_wgmma_refusal(const BlockAttentionParams& p) {
  CUtensorMap tm_k{}, tm_v{};
  return encode_kv_maps(p, tm_k, tm_v);
}

Status block_attention_wgmma_split(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan,
                                   cudaStream_t stream, std::string* launched) {
  if (p.head_dim != kD) return Status::kUnsupportedShape;
  const bool two = plan.rows_per_cta == 128;
  switch (p.dtype) {
    case DType::kBFloat16:
      return two ? launch<__nv_bfloat16, 2>(p, plan, stream, launched) : launch<__nv_bfloat16, 1>(p, plan, stream, launched);
    case DType::kFloat16:
      return two ? launch<__half, 2>(p, plan, stream, launched) : launch<__half, 1>(p, plan, stream, launched);
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace tt
