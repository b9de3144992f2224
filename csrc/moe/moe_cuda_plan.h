// Host plan of the CUDA MoE experts, torch-free and without the CUDA runtime (so the CPU build compiles it too and
// the op twotower::cuda_moe_path shows it on a machine without a GPU): the grouped GEMMs' tile geometry and which
// kernel (tensor-core mma.sync or SIMT) a call's shapes, strides, pointers and weight format get.
#pragma once
#include <cstdint>

#include "moe/moe.h"

namespace tt {

// Geometry shared by the plan and the kernels (moe_cuda.cu builds from these constants).
namespace moe_cuda {
constexpr int kBM = 64, kBN = 64, kBK = 64, kStages = 3, kThreads = 128;
constexpr int kPitch = kBK + 8;  // halves: a 144-byte row pitch makes ldmatrix's 8 row addresses conflict-free
// int4 on the mma path: every group scale of the CTA's 64 weight rows is staged in shared memory once (16-bit,
// rows scale_pitch(groups) apart: an odd number of 32-bit words, so the 4 rows one dequantisation step reads
// fall on different banks).
constexpr int kMaxGroups = 128;  // K <= 16384 at group 128
constexpr int64_t scale_pitch(int64_t groups) { return 4 * ((groups + 3) / 4) + 2; }

// Bytes of one weight row per k tile in the raw (quantised) shared-memory stages.
constexpr int raw_row_bytes(MoeWeightFormat f) { return f == MoeWeightFormat::kFp8 ? kBK : kBK / 2; }
// Dynamic shared memory of the mma kernel. Dense: A and B stages. Quantised: A stages, raw B stages (cp.async),
// one dequantised B tile (each warp dequantises exactly the 16 rows its ldmatrix reads), int4's scales for up to
// `groups` groups per row. Real model, int4 at group 128: 46 KB (dense: 54 KB, fp8: 48 KB).
constexpr int64_t mma_smem_bytes(MoeWeightFormat f, int64_t groups = 0) {
  const int64_t a = int64_t(kStages) * kBM * kPitch * 2;
  if (f == MoeWeightFormat::kDense) return a + int64_t(kStages) * kBN * kPitch * 2;
  const int64_t b = int64_t(kBN) * kPitch * 2 + int64_t(kStages) * kBN * raw_row_bytes(f);
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

}  // namespace tt
