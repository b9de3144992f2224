// The dense linear on the CPU (torch-free, see linear.h): the scalar kernel, the dispatch by instruction set and
// the plan.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/half_cpu.h"
#include "linear/linear_kernels_cpu.h"

namespace tt {
namespace {

// Element (n, k) of the packed weight (n < 16 * P), widened to fp32; panel_elems = the elements of one panel.
inline float w_at(const LinearParams& p, int64_t n, int64_t k) {
  const int64_t panel = n / kLinearPanel, c = n % kLinearPanel;
  if (p.dtype == DType::kFloat32)
    return static_cast<const float*>(p.w)[(panel * p.K + k) * kLinearPanel + c];
  const int64_t K2 = (p.K + 1) / 2;
  return to_float(static_cast<const bf16_t*>(p.w)[((panel * K2 + k / 2) * kLinearPanel + c) * 2 + k % 2]);
}

inline float x_at(const LinearParams& p, int64_t m, int64_t k) {
  if (p.dtype == DType::kFloat32) return static_cast<const float*>(p.x)[m * p.x_stride + k];
  return to_float(static_cast<const bf16_t*>(p.x)[m * p.x_stride + k]);
}

}  // namespace

// In k order with one FMA per k: the AVX2 / AVX-512 kernels' rounding exactly.
void linear_scalar_panels(const LinearParams& p, int64_t p0, int64_t p1) {
  for (int64_t n = p0 * kLinearPanel; n < p1 * kLinearPanel && n < p.N; ++n) {
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) acc = std::fma(x_at(p, m, k), w_at(p, n, k), acc);
      void* y = linear_y_at(p, m, n);
      if (p.dtype == DType::kFloat32) *static_cast<float*>(y) = acc;
      else *static_cast<bf16_t*>(y) = from_float<bf16_t>(acc);
    }
  }
}

void linear_cpu_panels(CpuIsa isa, const LinearParams& p, int64_t p0, int64_t p1) {
#ifdef TT_X86
  const bool bf16 = p.dtype == DType::kBFloat16;
  switch (isa) {
    case CpuIsa::kAmx: return bf16 ? linear_amx_panels(p, p0, p1) : linear_avx512_panels(p, p0, p1, false);
    case CpuIsa::kAvx512Bf16: return linear_avx512_panels(p, p0, p1, bf16);
    case CpuIsa::kAvx512: return linear_avx512_panels(p, p0, p1, false);
    case CpuIsa::kAvx2: return linear_avx2_panels(p, p0, p1);
    case CpuIsa::kScalar: break;
  }
#else
  (void)isa;
#endif
  linear_scalar_panels(p, p0, p1);
}

void linear_unpack_panels(CpuIsa isa, const LinearParams& p, int64_t p0, int64_t p1, void* dst, int64_t ld) {
  if (p.dtype == DType::kFloat32) {   // a panel row (one k, 16 outputs) is 64 contiguous bytes of W^T's row k
    const float* w = static_cast<const float*>(p.w);
    float* d = static_cast<float*>(dst);
    for (int64_t k = 0; k < p.K; ++k)   // rows of W^T front to back (see the AVX2 bf16 unpack)
      for (int64_t j = p0; j < p1; ++j)
        std::memcpy(d + k * ld + (j - p0) * kLinearPanel, w + (j * p.K + k) * kLinearPanel, kLinearPanel * 4);
    return;
  }
#ifdef TT_X86
  if (int32_t(isa) >= int32_t(CpuIsa::kAvx2)) return linear_avx2_unpack_bf16(p, p0, p1, static_cast<uint16_t*>(dst), ld);
#else
  (void)isa;
#endif
  const uint16_t* w = static_cast<const uint16_t*>(p.w);   // [P, K2, 16, 2]: the k pair of output c side by side
  uint16_t* d = static_cast<uint16_t*>(dst);
  const int64_t K2 = (p.K + 1) / 2;
  for (int64_t s = 0; s < K2; ++s)
    for (int64_t i = 0; i < 2 && 2 * s + i < p.K; ++i)
      for (int64_t j = p0; j < p1; ++j)
        for (int64_t c = 0; c < kLinearPanel; ++c)
          d[(2 * s + i) * ld + (j - p0) * kLinearPanel + c] = w[((j * K2 + s) * kLinearPanel + c) * 2 + i];
}

// The instruction set depends only on the CPU and the dtype, never on M, so a row's result does not depend on the
// other rows of its batch while the micro kernel runs (the engine's batch invariance). fp32 stays on the micro kernel
// at every M: the library's sums follow its own blocking, so a prefill row would change in its last bits with the
// rows batched beside it, and fp32 promises bit-for-bit batch invariance (docs/semantics.md). It costs fp32 little:
// measured on this project's Xeon (AVX-512, avx512_bf16, AMX), 1 thread, weights cycled through copies larger than
// the cache, micro kernel vs library path (which unpacks the weights back to W^T per call):
//   fp32 [M, 320] x [320, 1288]: M=128 0.94 vs 0.91 ms, 512 2.8 vs 3.0, 1024 5.2 vs 4.9;
//        [M, 4096] x [4096, 2688]: M=64 23 vs 32 ms, 256 35 vs 38, 512 104 vs 124, 1024 133 vs 136.
// bf16 promises tokens, not bits, across batches, and its prefill sizes go to the library, which wins there:
//   bf16 (AMX vs oneDNN) [M, 320] x [320, 1288]: M=256 0.26 vs 0.45 ms, 1024 0.94 vs 0.87;
//        [M, 4096] x [4096, 2688]: M=256 8.4 vs 8.8-13 ms, 512 18 vs 14-19, 1024 37 vs 25-30 (the library path
//        with the AVX2 unpack; it was 28 at 1024 with ATen's copy of the permuted view).
// Widened bf16 (CPUs without bf16 dot products) runs its FMAs at fp32's rate plus the widening, against a library
// path at sgemm's rate, so it switches earlier (not measured here: no such CPU). The micro kernel's threads split
// output panels (items of kLinearItemPanels); a matrix too narrow to give every thread an item leaves threads idle
// once the call is compute-bound (M > 64): bf16 then takes the library, which splits the rows too, and fp32 splits
// its rows into blocks (each row's sums are the same in any block).
LinearPlan linear_cpu_plan(int64_t M, int64_t N, int64_t K, DType dt, CpuIsa isa, int64_t threads) {
  (void)K;
  LinearPlan plan;
  plan.isa = dt == DType::kFloat32 && int32_t(isa) > int32_t(CpuIsa::kAvx512) ? CpuIsa::kAvx512 : isa;
  const bool native_bf16 = dt == DType::kBFloat16 && int32_t(isa) >= int32_t(CpuIsa::kAvx512Bf16);
  const int64_t items = (linear_panels(N) + kLinearItemPanels - 1) / kLinearItemPanels;
  const bool narrow = M > 64 && items < threads;
  if (dt == DType::kFloat32) {
    if (narrow) plan.row_blocks = std::min((threads + items - 1) / items, (M + 63) / 64);
    return plan;
  }
  if (M > (native_bf16 ? 512 : 128) || narrow) plan.path = LinearPath::kLibrary;
  return plan;
}

}  // namespace tt
