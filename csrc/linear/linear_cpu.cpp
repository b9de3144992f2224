// The dense linear on the CPU (torch-free, see linear.h): the scalar kernel, the dispatch by instruction set, the
// matrix library's unpacked panels, and the plan.
#include <cmath>
#include <cstdint>

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

void linear_unpack_panels(const LinearParams& p, int64_t p0, int64_t p1, float* dst) {
  const int64_t cols = (p1 - p0) * kLinearPanel;
  if (p.dtype == DType::kFloat32) {
    const float* w = static_cast<const float*>(p.w);
    for (int64_t panel = p0; panel < p1; ++panel)
      for (int64_t k = 0; k < p.K; ++k)
        for (int64_t c = 0; c < kLinearPanel; ++c)
          dst[k * cols + (panel - p0) * kLinearPanel + c] = w[(panel * p.K + k) * kLinearPanel + c];
    return;
  }
  const int64_t K2 = (p.K + 1) / 2;
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  for (int64_t panel = p0; panel < p1; ++panel)
    for (int64_t k = 0; k < p.K; ++k)
      for (int64_t c = 0; c < kLinearPanel; ++c)
        dst[k * cols + (panel - p0) * kLinearPanel + c] =
            to_float(bf16_t{w[((panel * K2 + k / 2) * kLinearPanel + c) * 2 + k % 2]});
}

// The instruction set depends only on the dtype and the CPU, never on M, so a row's result does not depend on the
// other rows of its batch (the engine's batch invariance) while the micro kernel runs; only prefill-sized M goes
// to the matrix library. Measured on this project's Xeon (AVX-512, avx512_bf16, AMX; bench/bench_linear.py): TODO
LinearPlan linear_cpu_plan(int64_t M, int64_t N, int64_t K, DType dt, CpuIsa isa, bool forced, int64_t threads) {
  (void)N;
  (void)K;
  (void)threads;
  (void)forced;
  LinearPlan plan;
  plan.isa = dt == DType::kFloat32 && int32_t(isa) > int32_t(CpuIsa::kAvx512) ? CpuIsa::kAvx512 : isa;
  const bool native_bf16 = dt == DType::kBFloat16 && int32_t(isa) >= int32_t(CpuIsa::kAvx512Bf16);
  if (!native_bf16 && M > 128) plan.path = LinearPath::kLibrary;
  return plan;
}

}  // namespace tt
