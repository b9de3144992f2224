// Tensor-core split pass of block attention for bf16/fp16 (sm_80 and later; the same SASS path runs on
// sm_90a), FlashAttention-2 style with raw PTX: mma.sync m16n8k16 (fp32 accumulators), ldmatrix, cp.async.
//
// CTA = (split, kv head x row block, batch) as in the SIMT kernel. GQA packing: the CTA's kRows = 16 * kWarps
// packed query rows (row m = s * G + g) all use every K/V tile; warp w owns rows [16w, 16w + 16) and keeps
// their Q as mma A fragments in registers for the whole split. K/V tiles of kTileN keys are copied with
// cp.async into a kStages-deep shared-memory ring (3 where the plan finds room, else 2), so the copies of the
// next tiles overlap the math of this one.
// A tile is kTileN consecutive keys of the row's virtual sequence [context | block]: each key picks its
// source tensor (k_ctx/v_ctx or k_blk/v_blk), so the block's S keys are simply the last keys of the same
// loop. Keys past the split's end are zero-filled (no NaN from stale memory can reach P V) and masked; with
// causal masking a row's block keys past its own position are masked too.
// Softmax: online, fp32, in log2 units (exp2 of score * scale * log2 e); P is rounded to the input dtype
// for the P V product, as FlashAttention does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "block_attention/block_attention.h"
#include "block_attention/block_attention_cuda.cuh"
#include "block_attention/block_attention_ptx.cuh"

namespace tt {
namespace {

constexpr int kTileN = ba_cuda::kMmaTile;  // keys per tile
// Shared-memory rows are padded by 16 bytes so the 8 rows one ldmatrix phase reads start in 8 different
// 4-bank groups (row pitch = 16 mod 128 bytes): conflict-free without a swizzle.
constexpr int kPad = ba_cuda::kMmaPad;

// Fragment conventions (PTX ISA, mma.m16n8k16; lane = 4 * grp + tig):
//   A (16x16): a0 (row grp, cols 2tig..+1), a1 (row grp+8, same cols), a2 (row grp, cols 8+2tig..+1),
//              a3 (row grp+8, cols 8+2tig..+1)
//   B (16x8):  b0 (k rows 2tig..+1, col grp), b1 (k rows 8+2tig..+1, col grp)
//   C (16x8):  c0,c1 (row grp, cols 2tig..+1), c2,c3 (row grp+8, same cols)
// In this kernel a thread's C element e of any 8-column block belongs to row grp + 8 * (e >> 1).
template <typename T, int D, int kWarps, int kStages>
__global__ void __launch_bounds__(kWarps * 32) mma_split_kernel(BlockAttentionParams p, int64_t split_unit) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kThreads = kWarps * 32;
  constexpr int kRows = 16 * kWarps;             // packed query rows per CTA
  constexpr int kPitch = D + kPad;               // shared-memory row pitch (elements)
  constexpr int kTileElems = kTileN * kPitch;    // one K or V tile
  constexpr int kRowChunks = D / 8;              // 16-byte chunks per K/V row
  constexpr int kRowStep = kThreads / kRowChunks;  // K/V rows one pass of the CTA copies
  constexpr int kLoadIters = (kTileN + kRowStep - 1) / kRowStep;  // 1 with threads to spare (head_dim 16, 8 warps)
  constexpr int kNB = kTileN / 8;                // 8-key column blocks of the score tile
  constexpr int kDB = D / 8;                     // 8-wide column blocks of the output
  constexpr int kDK = D / 16;                    // k-steps of Q K^T
  static_assert(kThreads % kRowChunks == 0 && (kTileN % kRowStep == 0 || kRowStep % kTileN == 0),
                "tile copy must divide evenly");
  static_assert(kStages >= 2, "the ring needs two stages");
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);  // [stage][K, V][kTileN][kPitch]

  const int64_t G = ba_group(p), M = ba_rows(p);
  const BaSplitWork w = ba_split_work(p, kRows, split_unit, ba_cuda::kSplitAlign);
  if (w.k0 >= w.k1) return;  // a split this row does not use
  const int64_t b = w.b, h = w.h, row0 = w.row0, k0 = w.k0, k1 = w.k1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, grp = lane >> 2, tig = lane & 3;

  const BaKvRows<T> rows(p, w);

  // Copy keys [t0, t0 + kTileN) of the virtual sequence into `stage`; keys at or past k1 are zero-filled.
  // Thread tid copies chunk d of rows j0, j0 + kRowStep, ... (consecutive threads: consecutive 16 bytes).
  const int j0 = tid / kRowChunks, d = (tid % kRowChunks) * 8;
  auto load_tile = [&](int stage, int64_t t0) {
    T* const ks = smem + stage * 2 * kTileElems;
    T* const vs = ks + kTileElems;
#pragma unroll
    for (int i = 0; i < kLoadIters; ++i) {
      const int j = j0 + i * kRowStep;
      if (kRowStep > kTileN && j >= kTileN) break;
      const int64_t key = t0 + j;
      const bool valid = key < k1;  // past it: nothing read (key 0's rows stand in), zeros written
      const T* const ksrc = rows.k(valid ? key : 0, d);
      const T* const vsrc = rows.v(valid ? key : 0, d);
      cp_async_16(smem_addr(ks + j * kPitch + d), ksrc, valid);
      cp_async_16(smem_addr(vs + j * kPitch + d), vsrc, valid);
    }
  };

  const int64_t tiles = (k1 - k0 + kTileN - 1) / kTileN;
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {  // tiles 0 .. kStages - 2 in flight
    if (i < tiles) load_tile(i, k0 + i * kTileN);
    cp_async_commit();
  }

  // This warp's Q rows as A fragments, straight from global memory (read once per split; 4-byte loads).
  // Rows past M are zero: their scores are 0 and they are never written.
  const bool warp_active = row0 + warp * 16 < M;  // warps whose 16 rows are all padding skip the math
  uint32_t qa[kDK][4];
  {
    const T* qrow[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t r = row0 + warp * 16 + grp + 8 * i;
      qrow[i] = r < M ? static_cast<const T*>(p.q) + b * p.q_stride_b + (r / G) * p.q_stride_s +
                            (h * G + r % G) * p.q_stride_h
                      : nullptr;
    }
#pragma unroll
    for (int kd = 0; kd < kDK; ++kd)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int i = 0; i < 2; ++i)
          qa[kd][i + 2 * half] =
              qrow[i] ? *reinterpret_cast<const uint32_t*>(qrow[i] + kd * 16 + half * 8 + 2 * tig) : 0u;
  }

  float o[kDB][4];
#pragma unroll
  for (int nb = 0; nb < kDB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nb][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows grp, grp + 8 (log2 units)
  float l[2] = {0.f, 0.f};              // this thread's share of the running sums (quad-reduced at the end)
  const float scale_log2 = p.scale * kLog2e;
  const int64_t limit[2] = {ba_key_limit(p, w, row0 + warp * 16 + grp), ba_key_limit(p, w, row0 + warp * 16 + grp + 8)};

  // ldmatrix lane offsets inside a 16x16 sub-tile. K (non-transposed): matrices (keys 0-7, d 0-7),
  // (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15) -> B fragments of two 8-key column blocks.
  // V (transposed): (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15) -> B
  // fragments of two 8-wide output column blocks.
  const int k_ld_row = (lane & 7) + ((lane >> 4) << 3), k_ld_col = ((lane >> 3) & 1) * 8;
  const int v_ld_row = (lane & 7) + (((lane >> 3) & 1) << 3), v_ld_col = (lane >> 4) * 8;

  for (int64_t it = 0; it < tiles; ++it) {
    const int64_t t0 = k0 + it * kTileN;
    cp_async_wait<kStages - 2>();  // this thread's copies of tile `it` have landed (one group per tile)
    __syncthreads();  // everyone's have; and every warp is done with tile it - 1, whose stage is refilled now
    const int64_t next = it + kStages - 1;
    if (next < tiles) load_tile(int(next % kStages), k0 + next * kTileN);
    cp_async_commit();  // possibly empty: keeps one group per tile

    if (warp_active) {
      const T* const ks = smem + int(it % kStages) * 2 * kTileElems;
      const T* const vs = ks + kTileElems;

      float s[kNB][4];
#pragma unroll
      for (int j = 0; j < kNB; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
      for (int kd = 0; kd < kDK; ++kd) {
#pragma unroll
        for (int jj = 0; jj < kNB / 2; ++jj) {
          uint32_t kf[4];
          ldmatrix_x4(kf, smem_addr(ks + (jj * 16 + k_ld_row) * kPitch + kd * 16 + k_ld_col));
          mma_16816<T>(s[2 * jj], qa[kd], kf[0], kf[1]);
          mma_16816<T>(s[2 * jj + 1], qa[kd], kf[2], kf[3]);
        }
      }

      // Online softmax (keys past the split's end, or past the row's own block position, masked).
      int valid[2];
      tile_limits<kTileN>(valid, limit, t0);
      float alpha[2];
      softmax_scores(reinterpret_cast<float(&)[kNB * 4]>(s), m, l, alpha, valid, scale_log2, tig);
      rescale_acc(reinterpret_cast<float(&)[kDB * 4]>(o), alpha);

      // O += P V: the C fragments of score blocks 2kk, 2kk+1 are exactly the A fragment of keys 16kk..16kk+15.
#pragma unroll
      for (int kk = 0; kk < kNB / 2; ++kk) {
        const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < kDB / 2; ++dd) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, smem_addr(vs + (kk * 16 + v_ld_row) * kPitch + dd * 16 + v_ld_col));
          mma_16816<T>(o[2 * dd], pa, vf[0], vf[1]);
          mma_16816<T>(o[2 * dd + 1], pa, vf[2], vf[3]);
        }
      }
    }
  }

  if (warp_active)
    write_result<T>(p, w, row0 + warp * 16, reinterpret_cast<const float(&)[kDB * 4]>(o), m, l, grp, tig);
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled for an arch without mma.sync: the launcher refuses before this can run
#endif
}

const char* dtype_name(DType t) { return t == DType::kBFloat16 ? "bf16" : "fp16"; }

template <typename T, int D, int kWarps, int kStages>
Status launch(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream,
              std::string* launched) {
  constexpr auto kernel = mma_split_kernel<T, D, kWarps, kStages>;
  if (ba_cuda::mma_smem(D, kStages) != plan.smem_bytes || plan.rows_per_cta != 16 * kWarps ||
      plan.threads != 32 * kWarps)
    return Status::kUnsupportedShape;  // the plan and the kernel disagree
  if (!block_attention_mma_image_ok(-1)) return Status::kLaunchFailed;
  if (ba_ensure_dynamic_smem<kernel>(plan.smem_bytes) != cudaSuccess) return Status::kLaunchFailed;
  const dim3 grid(unsigned(plan.grid_x), unsigned(plan.grid_y), unsigned(plan.grid_z));
  kernel<<<grid, kWarps * 32, plan.smem_bytes, stream>>>(p, plan.split_unit);
  *launched = "mma_split_kernel<" + std::string(dtype_name(p.dtype)) + ",head_dim=" + std::to_string(D) +
              ",warps=" + std::to_string(kWarps) + ",stages=" + std::to_string(kStages) + ">";
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

// 8 warps (128 rows share each K/V tile) or 4 (small groups waste less of the MMA's M), and the ring depth,
// as the plan chose; three stages are built for every head dim, two from 64 up (where a third may not fit).
template <typename T, int D>
Status launch_variant(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream,
                      std::string* launched) {
  const bool eight = plan.rows_per_cta == 128;
  if (plan.stages == 3)
    return eight ? launch<T, D, 8, 3>(p, plan, stream, launched) : launch<T, D, 4, 3>(p, plan, stream, launched);
  if constexpr (D >= 64) {
    if (plan.stages == 2)
      return eight ? launch<T, D, 8, 2>(p, plan, stream, launched) : launch<T, D, 4, 2>(p, plan, stream, launched);
  }
  return Status::kUnsupportedShape;
}

template <typename T>
Status launch_dim(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan, cudaStream_t stream,
                  std::string* launched) {
  switch (p.head_dim) {
    case 16: return launch_variant<T, 16>(p, plan, stream, launched);
    case 32: return launch_variant<T, 32>(p, plan, stream, launched);
    case 64: return launch_variant<T, 64>(p, plan, stream, launched);
    case 128: return launch_variant<T, 128>(p, plan, stream, launched);
    default: return Status::kUnsupportedShape;
  }
}

}  // namespace

bool block_attention_mma_image_ok(int device) {
  static int cached[64] = {};
  int cur = device;
  if (cur < 0 && cudaGetDevice(&cur) != cudaSuccess) return false;
  if (cur < 0 || cur >= 64) return false;
  if (cached[cur] == 0)  // the body exists for __CUDA_ARCH__ >= 800 (one variant stands for all)
    cached[cur] = ba_kernel_image_at_least<mma_split_kernel<__nv_bfloat16, 64, 4, 3>>(80) ? 1 : -1;
  return cached[cur] > 0;
}

Status block_attention_mma_split(const BlockAttentionParams& p, const BlockAttentionCudaPlan& plan,
                                 cudaStream_t stream, std::string* launched) {
  switch (p.dtype) {
    case DType::kBFloat16: return launch_dim<__nv_bfloat16>(p, plan, stream, launched);
    case DType::kFloat16: return launch_dim<__half>(p, plan, stream, launched);
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace tt
