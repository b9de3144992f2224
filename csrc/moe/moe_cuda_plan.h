// Host plan of the CUDA MoE experts, torch-free and without the CUDA runtime (so the CPU build compiles it too and
// the ops twotower::cuda_moe_path / cuda_moe_plan show it on a machine without a GPU): which kernel (tensor-core
// mma.sync or SIMT) a call's shapes, strides, pointers and weight format get, the grouped GEMMs' tile geometry,
// how a long prefill is cut into chunks, and whether the route runs in its own launch.
#pragma once
#include <cmath>
#include <cstdint>

#include "block_attention/block_attention_cuda_plan.h"  // BaCudaDevice: the GPU's SM count and shared memory
#include "moe/moe.h"

namespace tt {

// Geometry shared by the plan and the kernels (moe_cuda.cu builds from these constants).
namespace moe_cuda {
constexpr int kBN = 64, kThreads = 128;  // weight rows (output channels) per CTA, 4 warps of 16 rows
// Bytes of one weight row per k tile, in every format: a k tile is 64 bf16/fp16, 128 fp8 or 256 int4 weights, so
// each cp.async stage moves the same bytes whatever the format and quantised weights keep as many bytes in flight
// as dense ones (with a fixed 64-weight tile, fp8 and int4 had 1/2 and 1/4 of bf16's in flight and no faster T = 1).
constexpr int kTileRowBytes = 128;
constexpr int k_tile(MoeWeightFormat f) {
  return f == MoeWeightFormat::kDense ? kTileRowBytes / 2 : f == MoeWeightFormat::kFp8 ? kTileRowBytes
                                                                                        : 2 * kTileRowBytes;
}
// A and dense B tiles hold k_tile halves per row: a pitch of k_tile + 8 halves is 16 bytes mod 128, so
// ldmatrix's 8 row addresses are conflict-free.
constexpr int pitch(MoeWeightFormat f) { return k_tile(f) + 8; }
// Quantised: each warp dequantises the 16 rows its ldmatrix reads, 64 k at a time, into one shared tile of x's
// dtype (64 rows x kDequantK, pitch kDequantK + 8).
constexpr int kDequantK = 64;
// int4 on the mma path: every group scale of the CTA's 64 weight rows is staged in shared memory once (16-bit,
// rows scale_pitch(groups) apart: an odd number of 32-bit words, so the 4 rows one dequantisation step reads
// fall on different banks).
constexpr int kMaxGroups = 128;  // K <= 16384 at group 128
constexpr int64_t scale_pitch(int64_t groups) { return 4 * ((groups + 3) / 4) + 2; }
constexpr int kMaxStages = 6;
// Decode (A rows <= 16): enough stages for this many weight bytes in flight per CTA, 4 tiles of 64 x 128 bytes.
constexpr int64_t kInFlightPerCta = 32 * 1024;
// CTAs per SM the mma kernel's registers allow (128 threads; ptxas: at most 128 registers per thread).
constexpr int kMmaCtasPerSmRegs = 4;

// Dynamic shared memory of the mma kernel for `bm` A rows per pass and `stages` cp.async stages: A stages, then
// dense B stages, or raw (quantised) B stages + the dequantised tile + int4's scales for `groups` groups per row.
constexpr int64_t mma_smem_bytes(MoeWeightFormat f, int bm, int stages, int64_t groups = 0) {
  const int64_t a = int64_t(stages) * bm * pitch(f) * 2;
  if (f == MoeWeightFormat::kDense) return a + int64_t(stages) * kBN * pitch(f) * 2;
  const int64_t b = int64_t(stages) * kBN * kTileRowBytes + int64_t(kBN) * (kDequantK + 8) * 2;
  return a + b + (f == MoeWeightFormat::kInt4 ? int64_t(kBN) * scale_pitch(groups) * 2 : 0);
}
}  // namespace moe_cuda

// int4: groups per weight row, the larger of the two GEMMs' (w_up's rows have H elements, w_down's I).
inline int64_t moe_int4_groups(const MoeParams& p) {
  if (p.format != MoeWeightFormat::kInt4 || p.group < 1) return 0;
  const int64_t up = (p.hidden + p.group - 1) / p.group, down = (p.inter + p.group - 1) / p.group;
  return up > down ? up : down;
}

enum class MoeCudaPath : int32_t { kUnsupported = -1, kSimt = 0, kMma = 1 };

inline bool moe_aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// The kernel the grouped GEMMs get. The mma path reads every A row (x, hidden) and weight row in 16-byte
// cp.async chunks: bf16 / fp16 x, H and I multiples of 8, 16-byte aligned pointers and strides (the weight
// strides count bytes when quantised). Quantised weights on it also need: int4 groups that are a multiple of 8
// (the 8 consecutive k a thread dequantises share one scale) and at most kMaxGroups groups per row (the staged
// scales). Everything else (fp32 x, odd or unaligned shapes, an odd K's padded nibble, short groups) takes the
// SIMT kernel, which dequantises element by element. kUnsupported: a scale dtype that is not the format's.
inline MoeCudaPath moe_cuda_path(const MoeParams& p) {
  const bool int4 = p.format == MoeWeightFormat::kInt4, fp8 = p.format == MoeWeightFormat::kFp8;
  if (fp8 && p.scale_dtype != DType::kFloat32) return MoeCudaPath::kUnsupported;
  if (int4 && (p.group < 2 || p.scale_dtype == DType::kFloat32)) return MoeCudaPath::kUnsupported;
  if (p.dtype == DType::kFloat32) return MoeCudaPath::kSimt;
  // Storage units per 16 bytes: elements of x's dtype when dense, bytes when quantised.
  const int64_t wu = p.format == MoeWeightFormat::kDense ? 8 : 16;
  const bool a_ok = p.hidden % 8 == 0 && p.inter % 8 == 0 && p.x_stride % 8 == 0 && moe_aligned16(p.x);
  const bool w_ok = p.up_stride_n % wu == 0 && p.up_stride_e % wu == 0 && p.down_stride_n % wu == 0 &&
                    p.down_stride_e % wu == 0 && moe_aligned16(p.w_up) && moe_aligned16(p.w_down);
  const bool q_ok = !int4 || (p.group % 8 == 0 && moe_int4_groups(p) <= moe_cuda::kMaxGroups);
  return a_ok && w_ok && q_ok ? MoeCudaPath::kMma : MoeCudaPath::kSimt;
}

// ---------------------------------------------------------------------------------------------------
// Workspace of one launch sequence over `tokens` tokens (byte offsets; each array 256-byte aligned).
struct MoeCudaWorkspace {
  int64_t counts, offsets, active, n_active, err, slot_token, slot_of, slot_weight, hidden, out_slot, total;
};
inline MoeCudaWorkspace moe_cuda_workspace(const MoeParams& p, int64_t tokens) {
  const int64_t E = p.experts, n = tokens * p.topk, es = p.dtype == DType::kFloat32 ? 4 : 2;
  MoeCudaWorkspace w{};
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off = (off + bytes + 255) & ~int64_t(255);
    return at;
  };
  w.counts = take(E * 4);
  w.offsets = take((E + 1) * 4);
  w.active = take(E * 4);
  w.n_active = take(4);
  w.err = take(4);
  w.slot_token = take(n * 4);
  w.slot_of = take(n * 4);
  w.slot_weight = take(n * 8);
  w.hidden = take(n * p.inter * es);  // [n, I] in x's dtype
  w.out_slot = take(n * p.hidden * 4);  // [n, H] fp32
  w.total = off;
  return w;
}

// Prefill is cut into chunks of at most this many tokens, each a full launch sequence reusing one workspace: a
// 32K-token prompt would otherwise need ~2.8 GB of per-slot buffers per MoE layer at the real shapes. Past ~4K
// tokens every active expert already has hundreds of rows (the GEMMs are compute-bound), so longer chunks would
// only grow the workspace.
constexpr int64_t kMoeCudaChunkTokens = 4096;
constexpr int64_t kMoeCudaWorkspaceBudget = int64_t(256) << 20;  // bytes; the real model fits ~3000 tokens

// Tokens per launch sequence: all of them, or as many as keep the workspace within kMoeCudaWorkspaceBudget
// (at least one) and kMoeCudaChunkTokens.
inline int64_t moe_cuda_chunk_tokens(const MoeParams& p) {
  int64_t t = p.tokens < kMoeCudaChunkTokens ? p.tokens : kMoeCudaChunkTokens;
  if (t < 1) return p.tokens;
  // Per token: k slots of token id, slot index, fp64 weight, a hidden row in x's dtype and an fp32 output row;
  // the fixed part (per expert) plus each array's alignment padding.
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t one = p.topk * (16 + p.inter * es + p.hidden * 4);
  const int64_t fixed = moe_cuda_workspace(p, 0).total + 10 * 256;
  const int64_t fit = one > 0 ? (kMoeCudaWorkspaceBudget - fixed) / one : t;
  if (t > fit) t = fit > 1 ? fit : 1;
  return t;
}

// The up GEMM's CTAs route for themselves (each counts, scans and lists its own expert's tokens in shared
// memory; CTA (0, 0) also writes the lists the down GEMM and the combine read) when a chunk has at most this many
// (token, choice) slots and experts: one dependent launch fewer per MoE layer, at the price of every CTA reading
// all slots' ids (an AR step: 6, a 16-token pass: 96).
constexpr int64_t kMoeFusedRouteMaxSlots = 512;
constexpr int64_t kMoeFusedRouteMaxExperts = 1024;
// Shared ints of the route's scan (moe_route.cuh): warp sums and active counts, the two totals, n_active.
constexpr int kMoeScanScratch = 2 * 32 + 3;
// Shared memory of the fused route: counts (then cursors), offsets, active list, the CTA's own token list, scan.
constexpr int64_t moe_route_smem_bytes(int64_t experts, int64_t slots) {
  return ((3 * experts + 1 + slots + kMoeScanScratch) * 4 + 15) / 16 * 16;
}

struct MoeCudaPlan {
  MoeCudaPath path = MoeCudaPath::kUnsupported;
  int64_t chunk_tokens = 0, chunks = 0;  // tokens per launch sequence and how many sequences
  int64_t workspace_bytes = 0;           // of one sequence (every chunk reuses it)
  bool fused_route = false;              // the up GEMM routes (no route launch)
  int launches = 0;                      // kernel launches per chunk (route?, up, down, combine)
  int bm = 0;                            // A rows per pass of an expert's rows (16: decode, 64: prefill)
  int stages = 0;                        // cp.async stages of the mma kernel
  int k_tile = 0;                        // weights per k tile (mma)
  int64_t gemm_smem = 0;                 // dynamic shared memory of an mma GEMM CTA (without the route)
  int64_t route_smem = 0;                // added to the up GEMM's when the route is fused
  int ctas_per_sm = 0;                   // resident mma CTAs per SM (shared memory, registers, threads)
};

// The plan of a call with these params on `dev` (its path: moe_cuda_path's, or SIMT where the mma kernel's tiles do
// not fit the GPU's shared memory at all). Decode-sized chunks (mean rows per expert <= 4, so an expert
// rarely has more than 16 rows) stage 16 A rows per pass and as many stages as kInFlightPerCta needs; prefill
// chunks stage 64 rows and 3 stages where two CTAs still fit an SM, else 2 (compute-bound: the tiles are reused
// across the rows).
inline MoeCudaPlan moe_cuda_plan(const MoeParams& p, const BaCudaDevice& dev) {
  MoeCudaPlan pl;
  pl.path = moe_cuda_path(p);
  pl.chunk_tokens = moe_cuda_chunk_tokens(p);
  pl.chunks = pl.chunk_tokens > 0 ? (p.tokens + pl.chunk_tokens - 1) / pl.chunk_tokens : 0;
  pl.workspace_bytes = moe_cuda_workspace(p, pl.chunk_tokens).total;
  const int64_t slots = pl.chunk_tokens * p.topk;
  pl.fused_route = slots <= kMoeFusedRouteMaxSlots && p.experts <= kMoeFusedRouteMaxExperts;
  pl.route_smem = pl.fused_route ? moe_route_smem_bytes(p.experts, slots) : 0;
  pl.launches = pl.fused_route ? 3 : 4;
  if (pl.path != MoeCudaPath::kMma) return pl;
  const auto f = p.format;
  const int64_t groups = moe_int4_groups(p);
  pl.k_tile = moe_cuda::k_tile(f);
  pl.bm = slots <= 4 * p.experts ? 16 : 64;
  const int64_t per_sm = dev.smem_per_sm > 0 ? dev.smem_per_sm : dev.smem_optin;
  auto fits = [&](int stages, int ctas) {
    const int64_t s = moe_cuda::mma_smem_bytes(f, pl.bm, stages, groups) + pl.route_smem;
    return s <= dev.smem_optin && ctas * (s + 1024) <= per_sm;
  };
  if (pl.bm == 16) {
    int s = 2;
    while (s < moe_cuda::kMaxStages && int64_t(s - 1) * moe_cuda::kBN * moe_cuda::kTileRowBytes < moe_cuda::kInFlightPerCta)
      ++s;
    while (s > 2 && !fits(s, 1)) --s;
    pl.stages = s;
  } else {
    pl.stages = fits(3, 2) ? 3 : 2;
  }
  pl.gemm_smem = moe_cuda::mma_smem_bytes(f, pl.bm, pl.stages, groups);
  if (pl.gemm_smem + pl.route_smem > dev.smem_optin) {  // even 2 stages too big for this GPU (int4, very long K)
    pl.path = MoeCudaPath::kSimt;
    pl.bm = pl.stages = pl.k_tile = 0;
    pl.gemm_smem = 0;
    return pl;
  }
  const int64_t by_smem = per_sm / (pl.gemm_smem + pl.route_smem + 1024);
  int64_t c = 2048 / moe_cuda::kThreads;
  if (c > moe_cuda::kMmaCtasPerSmRegs) c = moe_cuda::kMmaCtasPerSmRegs;
  if (c > by_smem) c = by_smem;
  pl.ctas_per_sm = int(c);
  return pl;
}

// Expected weight bytes in flight per SM in the up (or down) GEMM of one chunk on the mma path: resident CTAs
// per SM (the plan's occupancy, or fewer when the grid of expected active experts x N tiles is smaller than a
// full wave) x the stages a CTA has in flight. Active experts: k at T = 1, else E (1 - (1 - k/E)^T) (uniform
// routing; a 16-token pass of the real model touches ~69 of 128).
inline double moe_cuda_bytes_in_flight_per_sm(const MoeParams& p, const MoeCudaPlan& pl, const BaCudaDevice& dev,
                                              bool up) {
  if (pl.path != MoeCudaPath::kMma || p.experts < 1 || p.topk < 1) return 0.0;
  const double E = double(p.experts), k = double(p.topk);
  const double active = pl.chunk_tokens == 1 ? k : E * (1.0 - std::pow(1.0 - k / E, double(pl.chunk_tokens)));
  const int64_t N = up ? p.inter : p.hidden;
  const double ctas = active * double((N + moe_cuda::kBN - 1) / moe_cuda::kBN);
  double resident = ctas / double(dev.num_sms > 0 ? dev.num_sms : 1);
  if (resident > pl.ctas_per_sm) resident = pl.ctas_per_sm;
  return resident * double(pl.stages - 1) * moe_cuda::kBN * moe_cuda::kTileRowBytes;
}

}  // namespace tt
