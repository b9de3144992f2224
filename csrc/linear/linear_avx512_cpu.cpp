// The AVX-512 panel micro kernels of the dense linear (linear.h; torch-free): fp32 FMA, bf16 widened to fp32 by
// a shift (the even k) and a mask (the odd k) for CPUs without avx512_bf16, and bf16 on vdpbf16ps (32 products
// per instruction, no widening).
#include <cstdint>

#include "linear/linear_kernels_cpu.h"

#ifdef TT_X86
namespace tt {
namespace {

using linear_blocking::drive;

template <int MR, int NR>
TT_AVX512 inline void store_block(const LinearParams& p, int64_t m0, int64_t panel, int last_cols,
                                  const __m512 (&acc)[MR][NR]) {
  TT_LINEAR_UNROLL for (int m = 0; m < MR; ++m)
    TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j)
      store16_avx512(p.dtype, linear_y_at(p, m0 + m, (panel + j) * kLinearPanel), acc[m][j],
                     mask16(j == NR - 1 ? last_cols : kLinearPanel));
}

// Up to 8 rows per block: 16 rows in one block (16 x 1 panels) stream the weights no faster than two blocks of
// 8 x 3 with the next group prefetched, and are a third slower on cached weights (17 loads per 16 FMAs; measured
// on the Xeon, [16 .. 64, 320] x [320, 1288]). Every nr divides kLinearItemPanels.
struct Rows8 {
  static constexpr int kMaxMR = 8;
};

// 32 zmm: MR x NR accumulators + NR weight vectors + the broadcast.
struct F32 : Rows8 {
  static constexpr int nr(int mr) { return mr <= 4 ? 6 : mr <= 6 ? 4 : 3; }

  template <int MR, int NR>
  TT_AVX512 static void run(const LinearParams& p, int64_t m0, int64_t panel, int last_cols, const char* pf) {
    const BlockOperands<float> o(p, m0, panel);
    __m512 acc[MR][NR] = {};
    k_loop<NR>(o.steps, false, pf, [&](int64_t k, auto) TT_AVX512 {
      __m512 b[NR];
      TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_ps(o.row(j, k));
      TT_LINEAR_UNROLL for (int m = 0; m < MR; ++m) {
        const __m512 a = _mm512_set1_ps(o.x[m * o.xs + k]);
        TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(a, b[j], acc[m][j]);
      }
    });
    store_block<MR, NR>(p, m0, panel, last_cols, acc);
  }
};

// bf16 widened: a pair row (16 outputs x k, k + 1) splits into the even-k and the odd-k values; the FMAs go in k
// order. MR x NR accumulators + 2 NR weight vectors + the broadcasts.
struct Bf16Widened : Rows8 {
  static constexpr int nr(int mr) { return mr <= 2 ? 6 : mr <= 4 ? 4 : mr <= 7 ? 3 : 2; }

  template <int MR, int NR>
  TT_AVX512 static void run(const LinearParams& p, int64_t m0, int64_t panel, int last_cols, const char* pf) {
    const BlockOperands<uint16_t> o(p, m0, panel);
    const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
    __m512 acc[MR][NR] = {};
    k_loop<NR>(o.steps, p.K % 2, pf, [&](int64_t kk, auto pair) TT_AVX512 {
      __m512 even[NR], odd[NR];
      TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j) {
        const __m512i v = _mm512_loadu_si512(o.row(j, kk));
        even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        odd[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      }
      TT_LINEAR_UNROLL for (int m = 0; m < MR; ++m) {
        const __m512i a = _mm512_set1_epi32(int32_t(bf16_pair<decltype(pair)::value>(o.x + m * o.xs + 2 * kk)));
        const __m512 a0 = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
        TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(a0, even[j], acc[m][j]);
        if constexpr (decltype(pair)::value) {
          const __m512 a1 = _mm512_castsi512_ps(_mm512_and_si512(a, high));
          TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(a1, odd[j], acc[m][j]);
        }
      }
    });
    store_block<MR, NR>(p, m0, panel, last_cols, acc);
  }
};

// bf16 on vdpbf16ps: acc += x[k] w[k] + x[k+1] w[k+1] per lane; registers (and so the blocks) as F32's.
struct Bf16Dot : F32 {
  template <int MR, int NR>
  TT_AVX512BF16 static void run(const LinearParams& p, int64_t m0, int64_t panel, int last_cols, const char* pf) {
    const BlockOperands<uint16_t> o(p, m0, panel);
    __m512 acc[MR][NR] = {};
    k_loop<NR>(o.steps, p.K % 2, pf, [&](int64_t kk, auto pair) TT_AVX512BF16 {
      __m512i b[NR];
      TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_si512(o.row(j, kk));
      TT_LINEAR_UNROLL for (int m = 0; m < MR; ++m) {
        const __m512i a = _mm512_set1_epi32(int32_t(bf16_pair<decltype(pair)::value>(o.x + m * o.xs + 2 * kk)));
        TT_LINEAR_UNROLL for (int j = 0; j < NR; ++j)
          acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)a, (__m512bh)b[j]);
      }
    });
    store_block<MR, NR>(p, m0, panel, last_cols, acc);
  }
};

}  // namespace

void linear_avx512_panels(const LinearParams& p, int64_t p0, int64_t p1, bool vdpbf16ps) {
  if (p.dtype == DType::kFloat32) return drive<F32>(p, p0, p1);
  if (vdpbf16ps) return drive<Bf16Dot>(p, p0, p1);
  drive<Bf16Widened>(p, p0, p1);
}

}  // namespace tt
#endif  // TT_X86
