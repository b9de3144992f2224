// Dense linear layers on the CPU (torch-free): y[M, N] = x[M, K] @ W[N, K]^T with fp32 accumulation, y rounded
// once to x's dtype (F.linear's result), for the small M of a decode pass (1..16 tokens per row, times the batch:
// up to a few hundred), with W packed once at load into 16-column panels:
//   fp32: [P, K, 16]             element (n, k) at ((n / 16) * K + k) * 16 + n % 16
//   bf16: [P, ceil(K / 2), 16, 2] element (n, k) at (((n / 16) * ceil(K / 2) + k / 2) * 16 + n % 16) * 2 + k % 2
// P = ceil(N / 16); the padding (columns n >= N, and k = K of an odd K in bf16) is zero. The reference of both
// layouts is python/twotower_ext/packed.py.
//
// Why panels: one panel row (16 outputs at one k) is one AVX-512 vector (two AVX2 ones), so the kernels broadcast
// x[m, k] into FMAs over whole output rows: no horizontal sums, every weight read once per call from one
// sequential stream per panel, and an MR x NR block of outputs in registers reuses each weight vector MR times.
// The bf16 k-pairs are the operand layout of vdpbf16ps and of AMX's B tiles (16 pair-rows of a panel are one
// 1 KB tile), so one packed layout serves every instruction set.
//
// Numerics: each output is an fp32 sum over k in order: one FMA per k (fp32; bf16 widened exactly by a shift),
// or per pair of k with the pair's products summed first (vdpbf16ps, AMX: the products of two bf16 are exact in
// fp32; these two flush bf16 denormals, < 1.2e-38). The scalar, AVX2 and AVX-512 paths round identically (same
// order, FMA in each), so they agree bit for bit. NaN or inf anywhere in a row's inputs reaches its outputs.
//
// Threads split the output panels (linear_cpu_panels over [p0, p1)), and the rows too where the panels are too few
// for the threads; see linear_cpu_plan for when the matrix library runs (bf16 prefill) and which instruction set.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/platform.h"

namespace tt {

constexpr int64_t kLinearPanel = 16;
// Output panels per work item of the threads' split: a multiple of every kernel family's block width (6, 4, 3, 2),
// so an item has no narrow block.
constexpr int64_t kLinearItemPanels = 12;
inline int64_t linear_panels(int64_t n) { return (n + kLinearPanel - 1) / kLinearPanel; }

struct LinearParams {
  const void* x;                    // [M, K] in dtype, rows x_stride apart
  const void* w;                    // packed as above, in dtype
  void* y;                          // [M, N] in dtype, rows y_stride apart
  int64_t M, N, K, x_stride, y_stride;
  DType dtype;                      // kFloat32 | kBFloat16
  const uint16_t* x_amx = nullptr;  // the AMX path's x: linear_amx_pad_x's copy
};

// Output columns [n0, n0 + n) of a packed weight (n0 a multiple of 16) are a packed weight of n outputs in the
// same layout (whole panels, zero padded past N): p with w moved to panel n0 / 16 and N = n (y unchanged: column
// j of the range is written at y[m, j]). Each output is the same sum over k in the same order wherever its panel
// sits and whichever rows a call covers, so the range computed on its own gives the bits of the whole call.
inline int64_t linear_panel_bytes(const LinearParams& p) {  // one packed panel: 16 outputs over all of K
  return (p.dtype == DType::kFloat32 ? p.K : (p.K + 1) / 2) * kLinearPanel * 4;
}
inline LinearParams linear_columns(const LinearParams& p, int64_t n0, int64_t n) {
  LinearParams q = p;
  q.w = static_cast<const char*>(p.w) + n0 / kLinearPanel * linear_panel_bytes(p);
  q.N = n;
  return q;
}

// The micro kernel of `isa` for output panels [p0, p1) of every row. The instruction set must run here and have
// code for the dtype: fp32 runs on scalar, avx2 and avx512 (kAvx512Bf16 and kAmx mean avx512 for it); bf16 on
// every one (scalar, avx2 and avx512 widen it to fp32, avx512_bf16 runs vdpbf16ps, amx tiles).
void linear_cpu_panels(CpuIsa isa, const LinearParams& p, int64_t p0, int64_t p1);

// AMX reads x as whole 16-row x 32-column tiles: a zero-padded copy [ceil(M / 16) * 16, linear_amx_ld(K)] (bf16),
// made once per call before the threads start (so no tile ever reads past x, and a NaN past K cannot reach a sum).
inline int64_t linear_amx_ld(int64_t K) { return (K + 31) / 32 * 32; }
inline int64_t linear_amx_x_elems(int64_t M, int64_t K) { return (M + 15) / 16 * 16 * linear_amx_ld(K); }
void linear_amx_pad_x(const LinearParams& p, uint16_t* dst);

// Panels [p0, p1) of the packed weight back to W^T for the matrix-library path: dst[k * ld + n - 16 p0] = W[n, k]
// for k < K and every column of those panels (the zero padding included), in the weight's dtype. A permutation, at
// memory speed (AVX2 where the CPU has it: ATen's copy of the permuted view ran at ~3 GB/s).
void linear_unpack_panels(CpuIsa isa, const LinearParams& p, int64_t p0, int64_t p1, void* dst, int64_t ld);

// The plan of one call (pure: unit-tested through the linear_cpu_plan op).
enum class LinearPath : int32_t { kMicro = 0, kLibrary = 1 };
struct LinearPlan {
  LinearPath path = LinearPath::kMicro;
  CpuIsa isa = CpuIsa::kScalar;   // the micro kernel's instruction set
  int64_t row_blocks = 1;         // the micro kernel's threads split the rows too, into this many blocks
};
// Rows of one block of the micro kernel's row split (a multiple of 16: AMX's x tiles never straddle two blocks).
inline int64_t linear_block_rows(int64_t M, int64_t row_blocks) {
  return ((M + row_blocks - 1) / row_blocks + 15) / 16 * 16;
}
// isa: the best instruction set allowed (this CPU's, or the one TWOTOWER_LINEAR_CPU_ISA forces), which the micro
// kernel runs as it is (fp32 at most avx512: the bf16 units do not take it); threads: the intra-op threads the call
// may use. The library path multiplies in bf16 where the CPU has bf16 dot products (isa avx512_bf16 or amx), else
// in fp32 (bf16 widened).
LinearPlan linear_cpu_plan(int64_t M, int64_t N, int64_t K, DType dt, CpuIsa isa, int64_t threads);

}  // namespace tt
