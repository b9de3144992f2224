// The AVX2 + FMA panel micro kernels of the dense linear (linear.h; torch-free), for CPUs without AVX-512: a
// panel row is two 8-wide vectors; fp32 FMA, bf16 widened to fp32 by a shift (the even k) and a mask (the odd k).
#include <cstdint>
#include <cstring>

#include "linear/linear_kernels_cpu.h"

#ifdef TT_X86
namespace tt {
namespace {

using linear_blocking::drive;

// 8 results into y's dtype; only the first `cols` (1..8) exist.
inline void store8(DType dt, void* y, __m256 v, int cols) {
  if (dt == DType::kFloat32) {
    if (cols == 8) return _mm256_storeu_ps(static_cast<float*>(y), v);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskstore_ps(static_cast<float*>(y), _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lanes), v);
  }
  const __m128i h = narrow16_avx2(bf16_rne_avx2(v));
  if (cols == 8) return _mm_storeu_si128(static_cast<__m128i*>(y), h);
  alignas(16) uint16_t tmp[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
  std::memcpy(y, tmp, size_t(cols) * 2);
}

// acc[m][2 j + h]: half h (columns 8 h .. 8 h + 7) of panel j.
template <int MR, int NR>
inline void store_block(const LinearParams& p, int64_t m0, int64_t panel, int last_cols, const __m256 (&acc)[MR][2 * NR]) {
  TT_LINEAR_UNROLL for (int m = 0; m < MR; ++m)
    TT_LINEAR_UNROLL for (int j = 0; j < 2 * NR; ++j) {
      const int cols = (j / 2 == NR - 1 ? last_cols : int(kLinearPanel)) - 8 * (j % 2);
      if (cols > 0) store8(p.dtype, linear_y_at(p, m0 + m, panel * kLinearPanel + 8 * j), acc[m][j], cols > 8 ? 8 : cols);
    }
}

// 16 ymm: 2 MR NR accumulators + 2 NR weight vectors + the broadcast.
struct F32 {
  static constexpr int kMaxMR = 6;
  static constexpr int nr(int mr) { return mr == 1 ? 3 : mr == 2 ? 2 : 1; }

  template <int MR, int NR> static void run(const LinearParams& p, int64_t m0, int64_t panel, int last_cols, const char* pf) {
    const BlockOperands<float> o(p, m0, panel);
    __m256 acc[MR][2 * NR] = {};
    k_loop<NR>(o.steps, false, pf, [&](int64_t k, auto) {
      __m256 b[2 * NR];
      TT_LINEAR_UNROLL for (int j = 0; j < 2 * NR; ++j) b[j] = _mm256_loadu_ps(o.row(j / 2, k) + 8 * (j % 2));
      TT_LINEAR_UNROLL for (int m = 0; m < MR; ++m) {
        const __m256 a = _mm256_broadcast_ss(o.x + m * o.xs + k);
        TT_LINEAR_UNROLL for (int j = 0; j < 2 * NR; ++j) acc[m][j] = _mm256_fmadd_ps(a, b[j], acc[m][j]);
      }
    });
    store_block<MR, NR>(p, m0, panel, last_cols, acc);
  }
};

// bf16: 2 MR NR accumulators + 4 NR widened weight vectors (even / odd k per half panel) + the broadcasts; the
// FMAs go in k order.
struct Bf16Widened {
  static constexpr int kMaxMR = 4;
  static constexpr int nr(int mr) { return mr == 1 ? 2 : 1; }

  template <int MR, int NR> static void run(const LinearParams& p, int64_t m0, int64_t panel, int last_cols, const char* pf) {
    const BlockOperands<uint16_t> o(p, m0, panel);
    const __m256i high = _mm256_set1_epi32(int32_t(0xFFFF0000u));
    __m256 acc[MR][2 * NR] = {};
    k_loop<NR>(o.steps, p.K % 2, pf, [&](int64_t kk, auto pair) {
      __m256 even[2 * NR], odd[2 * NR];
      TT_LINEAR_UNROLL for (int j = 0; j < 2 * NR; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o.row(j / 2, kk) + 16 * (j % 2)));
        even[j] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        odd[j] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      }
      TT_LINEAR_UNROLL for (int m = 0; m < MR; ++m) {
        const __m256i a = _mm256_set1_epi32(int32_t(bf16_pair<decltype(pair)::value>(o.x + m * o.xs + 2 * kk)));
        const __m256 a0 = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
        TT_LINEAR_UNROLL for (int j = 0; j < 2 * NR; ++j) acc[m][j] = _mm256_fmadd_ps(a0, even[j], acc[m][j]);
        if constexpr (decltype(pair)::value) {
          const __m256 a1 = _mm256_castsi256_ps(_mm256_and_si256(a, high));
          TT_LINEAR_UNROLL for (int j = 0; j < 2 * NR; ++j) acc[m][j] = _mm256_fmadd_ps(a1, odd[j], acc[m][j]);
        }
      }
    });
    store_block<MR, NR>(p, m0, panel, last_cols, acc);
  }
};

}  // namespace

// One panel row of bf16 pairs (16 x 32 bits: output c's k and k + 1) into two 16-element rows of W^T: the low
// halves to row k, the high halves to row k + 1 (when it exists). packus works in 128-bit lanes, hence the permute.
// k pairs outside, panels inside: each row of W^T is written front to back (whole cache lines), the panels read as
// parallel streams of 64-byte rows.
void linear_avx2_unpack_bf16(const LinearParams& p, int64_t p0, int64_t p1, uint16_t* dst, int64_t ld) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  const int64_t K2 = (p.K + 1) / 2, panel_elems = K2 * kLinearPanel * 2;
  const __m256i low = _mm256_set1_epi32(0xFFFF);
  for (int64_t s = 0; s < K2; ++s) {
    uint16_t* even_row = dst + 2 * s * ld;
    uint16_t* odd_row = 2 * s + 1 < p.K ? even_row + ld : nullptr;
    const uint16_t* src_row = w + s * kLinearPanel * 2;
    for (int64_t j = p0; j < p1; ++j) {
      const __m256i* src = reinterpret_cast<const __m256i*>(src_row + j * panel_elems);
      const __m256i a = _mm256_loadu_si256(src), b = _mm256_loadu_si256(src + 1);
      const int64_t col = (j - p0) * kLinearPanel;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(even_row + col),
                          _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_and_si256(a, low),
                                                                       _mm256_and_si256(b, low)), 0xD8));
      if (odd_row != nullptr)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(odd_row + col),
                            _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_srli_epi32(a, 16),
                                                                         _mm256_srli_epi32(b, 16)), 0xD8));
    }
  }
}

void linear_avx2_panels(const LinearParams& p, int64_t p0, int64_t p1) {
  if (p.dtype == DType::kFloat32) return drive<F32>(p, p0, p1);
  drive<Bf16Widened>(p, p0, p1);
}

}  // namespace tt
#endif  // TT_X86
