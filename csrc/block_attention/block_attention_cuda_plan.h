// Host plan of the CUDA block attention, torch-free and without the CUDA runtime (so the CPU build compiles
// it too and the op twotower::cuda_attention_plan can show it on a machine without a GPU): which split kernel
// a call gets on a given GPU, its launch shape and shared memory, and how each row sizes its splits.
//
// Flash-decoding: grid (split, kv head x row block, batch). The grid depends only on shapes known before
// capture (B, Hkv, Lmax, S, the device), never on ctx_lens values, so a captured graph replays with new
// ctx_lens. Each row then sizes its own splits on the device from its own length (ba_row_splits): a short
// row in a long cache still spreads over several splits, and a row that needs one split writes out / lse
// straight from the split epilogue (its merge is skipped; with a one-split grid there is no merge launch).
// At small batch the plan aims at a full wave of CTAs for every row from kWaveFromKeys keys up (a B = 1
// decode step would otherwise leave most SMs idle: 16 CTAs on 132 SMs at a 4K context with 1K-key splits).
#pragma once
#include <cstdint>
#include <initializer_list>

#include "common/platform.h"

namespace tt {

TT_HOST_DEVICE int64_t ba_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-pass kernels: the SIMT baseline (every dtype, head dims 1..256), the sm_80+ tensor-core kernel
// (mma.sync, bf16/fp16, head dims 16/32/64/128) and the sm_90a kernel (TMA + wgmma, bf16/fp16, head dim 128).
enum class BlockAttentionCudaPath : int32_t { kSimt = 0, kMma = 1, kWgmma = 2 };

// Kernel geometry shared by the plan and the kernels (the .cu files build from these constants).
namespace ba_cuda {
constexpr int kSimtWarps = 4, kSimtRowsPerWarp = 4, kSimtRows = kSimtWarps * kSimtRowsPerWarp;
constexpr int kSimtTile = 32;                   // keys per step: one per lane for the scores
constexpr int kSimtMaxDim = 256;                // per-lane width up to 8 (a template constant)
constexpr int kMmaTile = 64, kMmaPad = 8;       // keys per tile; 16-byte row padding of the smem ring
constexpr int kWgmmaDim = 128, kWgmmaTile = 128, kWgmmaStages = 3;
// CTAs per SM the mma kernel's registers allow (ptxas: ~180 registers at 4 warps, ~230 at 8): the smem ring
// gets a third stage only where that many CTAs still fit.
constexpr int kMmaCtasPerSm4Warps = 2, kMmaCtasPerSm8Warps = 1;
constexpr int kMaxGridYZ = 65535;
// Split boundaries fall on multiples of this many keys. The SIMT and mma kernels zero-fill and mask every key
// past their split's end, so any length runs; 8 is one mma score block. The wgmma kernel's splits stay whole
// TMA tiles (its full-context tiles are copied without a per-key mask).
constexpr int kSplitAlign = 8;
// From this many context keys up a B = 1 row alone fills a wave of CTAs (below it a layer's K/V is under
// ~1 MiB at the real shapes and streams in about a microsecond: finer splits would only add merge traffic).
constexpr int64_t kWaveFromKeys = 1024;

constexpr int simt_lane_width(int64_t d) { return d <= 32 ? 1 : d <= 64 ? 2 : d <= 128 ? 4 : 8; }
constexpr int64_t simt_smem(int64_t d) { return 4 * (kSimtRows * d + kSimtTile * (d + 1) + kSimtTile * d); }
constexpr int64_t mma_smem(int64_t d, int stages) { return int64_t(stages) * 2 * kMmaTile * (d + kMmaPad) * 2; }
constexpr bool mma_dim(int64_t d) { return d == 16 || d == 32 || d == 64 || d == 128; }
constexpr int64_t wgmma_smem(int consumers, int stages) {
  return 1024 /*alignment slack*/ + int64_t(stages) * 4 * kWgmmaTile * 128 + int64_t(consumers) * 2 * 64 * 128 +
         2 * int64_t(stages) * 8;
}
}  // namespace ba_cuda

// The device as the plan sees it.
struct BaCudaDevice {
  int cc = 0;                 // compute capability, 10 * major + minor
  int num_sms = 1;
  int64_t smem_optin = 0;     // largest dynamic shared memory a block may opt into
  int64_t smem_per_sm = 0;
  bool mma_image = true;      // this build's image for the device has the mma kernel's body (sm_80+ code)
  bool wgmma_image = true;    // ... and the wgmma kernel's (sm_90a SASS: not in PTX, not in plain sm_90)
};

// Shared-memory limits of the GPUs this project names (for the plan op without a device; a real call
// queries the device). Unknown newer parts get the smallest Blackwell figures.
inline BaCudaDevice ba_cuda_known_device(int cc, int num_sms) {
  BaCudaDevice d;
  d.cc = cc;
  d.num_sms = num_sms > 0 ? num_sms : 1;
  const int64_t kb = 1024;
  if (cc == 80) d.smem_optin = 163 * kb, d.smem_per_sm = 164 * kb;          // A100
  else if (cc == 90 || cc == 100 || cc == 103) d.smem_optin = 227 * kb, d.smem_per_sm = 228 * kb;  // H100/H200, B200
  else d.smem_optin = 99 * kb, d.smem_per_sm = 100 * kb;                  // sm_86/89, sm_120/121 (RTX, GB10), ...
  d.wgmma_image = cc == 90;  // the default build's sm_90a cubin loads on cc 9.0 only
  return d;
}

// What the inputs allow: dtype, head dim and the alignment of the tensor-core paths' vector loads.
struct BaCudaInputs {
  DType dtype = DType::kFloat32;
  int64_t head_dim = 0;
  bool kv_aligned16 = true;  // k/v pointers and strides (of dims longer than 1) multiples of 16 bytes
  bool q_aligned4 = true, q_aligned16 = true;
};

// Pointer and the strides (elements of `elem_bytes`) of every dim longer than 1 multiples of `align` bytes (a
// size-1 dim's stride never moves an address, and torch leaves it arbitrary).
struct BaDim {
  int64_t stride, size;
};
inline bool ba_aligned(const void* ptr, int64_t elem_bytes, int64_t align, std::initializer_list<BaDim> dims) {
  if (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(align) != 0) return false;
  for (const BaDim& d : dims)
    if (d.size > 1 && (d.stride * elem_bytes) % align != 0) return false;
  return true;
}

// nullptr if `path` can run these inputs on `dev`, else why not (one phrase, for an error message).
inline const char* ba_cuda_path_refusal(BlockAttentionCudaPath path, const BaCudaInputs& in, const BaCudaDevice& dev) {
  const bool lowp = in.dtype == DType::kBFloat16 || in.dtype == DType::kFloat16;
  switch (path) {
    case BlockAttentionCudaPath::kSimt:
      if (in.head_dim < 1 || in.head_dim > ba_cuda::kSimtMaxDim) return "simt takes head_dim 1..256";
      if (ba_cuda::simt_smem(in.head_dim) > dev.smem_optin) return "simt needs more shared memory than this GPU has";
      return nullptr;
    case BlockAttentionCudaPath::kMma:
      if (!lowp) return "mma needs bfloat16/float16 inputs";
      if (!ba_cuda::mma_dim(in.head_dim)) return "mma needs head_dim 16, 32, 64 or 128";
      if (!in.kv_aligned16 || !in.q_aligned4)
        return "mma needs 16-byte aligned k/v pointers and strides (4-byte for q)";
      if (dev.cc < 80) return "mma needs an sm_80+ device";
      if (!dev.mma_image) return "this build has no sm_80+ code of the mma kernel for this GPU";
      return nullptr;
    case BlockAttentionCudaPath::kWgmma:
      if (!lowp) return "wgmma needs bfloat16/float16 inputs";
      if (in.head_dim != ba_cuda::kWgmmaDim) return "wgmma needs head_dim 128";
      if (!in.kv_aligned16 || !in.q_aligned16) return "wgmma needs 16-byte aligned q/k/v pointers and strides";
      if (dev.cc != 90) return "wgmma needs an sm_90 (Hopper) device";
      if (!dev.wgmma_image)
        return "this build has no sm_90a code of the wgmma kernel (build with TWOTOWER_CUDA_ARCHS containing 90a-real "
               "and the CUTLASS headers)";
      return nullptr;
  }
  return "unknown path";
}

// The sm_90a wgmma kernel is compiled in CI but has not yet run on a Hopper GPU. An unverified kernel must not
// silently become what H100/H200 users get, so it runs only when TWOTOWER_ATTN_PATH=wgmma asks for it; set
// this to true once tools/gpu_check.sh passes on an sm_90 device.
constexpr bool kWgmmaByDefault = false;

// The default path: wgmma (once verified), else mma where it can run, else the SIMT kernel (which takes every
// dtype and head dim up to 256).
inline BlockAttentionCudaPath ba_cuda_default_path(const BaCudaInputs& in, const BaCudaDevice& dev) {
  if (kWgmmaByDefault && !ba_cuda_path_refusal(BlockAttentionCudaPath::kWgmma, in, dev))
    return BlockAttentionCudaPath::kWgmma;
  if (!ba_cuda_path_refusal(BlockAttentionCudaPath::kMma, in, dev)) return BlockAttentionCudaPath::kMma;
  return BlockAttentionCudaPath::kSimt;
}

struct BlockAttentionCudaPlan {
  BlockAttentionCudaPath path = BlockAttentionCudaPath::kSimt;
  int threads = 0;           // per CTA
  int rows_per_cta = 0;      // packed query rows (s * G + g) per CTA
  int tile_keys = 0;         // keys per step of the kernel
  int stages = 1;            // K/V ring depth (tensor-core paths)
  int64_t smem_bytes = 0;    // dynamic shared memory per CTA
  int64_t grid_x = 1;        // most splits a row can have
  int64_t grid_y = 1;        // kv heads x row blocks
  int64_t grid_z = 1;        // batch
  int64_t split_unit = 0;    // the shortest split (keys): a row has at most ceil(its keys / split_unit) splits
  int64_t split_align = 1;   // split boundaries are multiples of this many keys (ba_cuda::kSplitAlign or the tile)
  bool merge() const { return grid_x > 1; }
};

// Splits of one row of `keys` keys (context + block): as many as the grid allows, each of at least `unit` keys,
// equal chunks rounded up to a multiple of `align` (unit is one too). Split i covers keys
// [i * chunk, min(keys, (i + 1) * chunk)); splits >= `splits` of the grid are idle for this row.
struct BaRowSplits {
  int64_t splits, chunk;
};
TT_HOST_DEVICE BaRowSplits ba_row_splits(int64_t keys, int64_t max_splits, int64_t unit, int64_t align) {
  if (keys < 1) keys = 1;
  if (max_splits < 1) max_splits = 1;
  int64_t chunk = ba_ceil_div(ba_ceil_div(keys, max_splits), align) * align;
  if (chunk < unit) chunk = unit;
  return {ba_ceil_div(keys, chunk), chunk};
}

// The launch of `path` for these shapes on `dev`: nullptr and *out filled, or why it cannot launch.
// Row blocks: the tensor-core paths pack 128 rows per CTA (8 mma warps / 2 wgmma consumers: each K/V tile
// serves twice the rows) only when batch x kv heads x those row blocks fill a wave without splitting; at
// smaller batch 64 rows per CTA give twice the CTAs per split, so shorter rows reach a wave with half the
// splits (and half the partial states to merge).
// Splits: the grid has enough for ~2 waves of one CTA per SM; each split is at least split_unit keys, the
// smaller of 4 x max(M, tile) (a split writes an [M, D] fp32 partial while reading split x D of K and V, so
// longer rows keep splits at least that long) and the length that lets a row of kWaveFromKeys context keys
// fill a wave on its own.
inline const char* ba_cuda_make_plan(int64_t batch, int64_t block_len, int64_t q_heads, int64_t kv_heads,
                                     int64_t head_dim, int64_t ctx_capacity, BlockAttentionCudaPath path,
                                     const BaCudaDevice& dev, BlockAttentionCudaPlan* out) {
  BlockAttentionCudaPlan pl;
  pl.path = path;
  const int64_t M = block_len * (kv_heads > 0 ? q_heads / kv_heads : 0);
  const int64_t sms = dev.num_sms > 0 ? dev.num_sms : 1;
  // 128 rows per CTA only where that grid alone (no splits) fills a wave.
  const bool wide = M > 64 && batch * kv_heads * ba_ceil_div(M, 128) >= sms;
  pl.split_align = ba_cuda::kSplitAlign;
  switch (path) {
    case BlockAttentionCudaPath::kSimt:
      pl.threads = ba_cuda::kSimtWarps * 32;
      pl.rows_per_cta = ba_cuda::kSimtRows;
      pl.tile_keys = ba_cuda::kSimtTile;
      pl.smem_bytes = ba_cuda::simt_smem(head_dim);
      break;
    case BlockAttentionCudaPath::kMma: {
      const int warps = wide ? 8 : 4;
      pl.threads = warps * 32;
      pl.rows_per_cta = 16 * warps;
      pl.tile_keys = ba_cuda::kMmaTile;
      const int64_t ctas = warps == 8 ? ba_cuda::kMmaCtasPerSm8Warps : ba_cuda::kMmaCtasPerSm4Warps;
      const int64_t three = ba_cuda::mma_smem(head_dim, 3);
      // Three stages where they fit without costing a CTA per SM (always below head_dim 64: 30 KiB at most).
      pl.stages = head_dim < 64 || (three <= dev.smem_optin && ctas * (three + 1024) <= dev.smem_per_sm) ? 3 : 2;
      pl.smem_bytes = ba_cuda::mma_smem(head_dim, pl.stages);
      break;
    }
    case BlockAttentionCudaPath::kWgmma: {
      const int consumers = wide ? 2 : 1;
      pl.threads = (consumers + 1) * 128;
      pl.rows_per_cta = 64 * consumers;
      pl.tile_keys = ba_cuda::kWgmmaTile;
      pl.stages = ba_cuda::kWgmmaStages;
      pl.smem_bytes = ba_cuda::wgmma_smem(consumers, pl.stages);
      pl.split_align = ba_cuda::kWgmmaTile;
      break;
    }
  }
  if (pl.smem_bytes > dev.smem_optin) return "the kernel needs more shared memory per block than this GPU allows";
  const int64_t row_blocks = ba_ceil_div(M > 0 ? M : 1, pl.rows_per_cta);
  pl.grid_y = kv_heads * row_blocks;
  pl.grid_z = batch;
  if (pl.grid_z > ba_cuda::kMaxGridYZ) return "batch exceeds the CUDA grid limit of 65535 rows";
  if (pl.grid_y > ba_cuda::kMaxGridYZ) return "kv_heads x row blocks exceeds the CUDA grid limit of 65535";
  const int64_t keys = (ctx_capacity > 0 ? ctx_capacity : 0) + block_len;
  const int64_t align = pl.split_align;
  const int64_t ctas_per_split = batch * pl.grid_y > 0 ? batch * pl.grid_y : 1;
  const int64_t long_unit = ba_ceil_div(4 * (M > pl.tile_keys ? M : pl.tile_keys), align) * align;
  // Rounded down, so a row of kWaveFromKeys context keys gets at least a wave's splits.
  int64_t wave_unit = (ba_cuda::kWaveFromKeys + block_len) / ba_ceil_div(sms, ctas_per_split) / align * align;
  if (wave_unit < align) wave_unit = align;
  pl.split_unit = long_unit < wave_unit ? long_unit : wave_unit;
  int64_t splits = ba_ceil_div(2 * sms, ctas_per_split);
  const int64_t most = ba_ceil_div(keys, pl.split_unit);
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;
  pl.grid_x = splits;
  *out = pl;
  return nullptr;
}

}  // namespace tt
