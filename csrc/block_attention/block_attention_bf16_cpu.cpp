// The CPU attention's native bf16 tiles (block_attention.h): packing into the pair-interleaved layout and the two
// GEMMs on it, vdpbf16ps (avx512_bf16: each instruction multiplies 16 column pairs by one broadcast row pair, 32
// products into 16 fp32 sums) and AMX (tdpbf16ps: a 16 x 32 by 32 x 16 tile product). Both read the same packed
// tiles; every product is exact in fp32 and summed in fp32 (pairs first; denormal bf16 inputs count as 0).
//
// Why pack: the reduction dimension must come in adjacent pairs in B. For Q K^T it is the head dim, so K's rows are
// transposed by 16 x 16 blocks of pairs (one pass over the tile, ~0.4 instructions per pair); for P V it is the keys,
// so two value rows are interleaved. B is stored in panels of 32 columns, each contiguous over the depth, and both
// GEMMs walk a panel across all row blocks: the first version, with B's pair rows a whole tile wide (1 KB apart),
// re-read B from L2 at a stride per 8-row block and ran 1.7x slower than fp32 sgemm on the same tiles, although the
// microkernel alone (in L1) multiplies 1.4x faster than an fp32 FMA kernel of the same blocking on the Xeon.
// The widened path instead converts both tiles to fp32 and hands them to sgemm.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "block_attention/block_attention.h"
#include "common/cpu_isa.h"

namespace tt {
#ifdef TT_X86
namespace {

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

constexpr int64_t kPanel = kBaBf16Panel;

TT_AVX512 inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xffffffffu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// r[i] = 16 dwords of row i -> r[p] = dword p of rows 0..15.
TT_AVX512 inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], 128-bit lane L: column 4L + c of rows g .. g+3
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}

TT_AVX512 void pack_k(const uint16_t* k, int64_t ld, int64_t n, int64_t D, uint16_t* dst) {
  const int64_t dk = round_up(D, 32), cols = round_up(n, kPanel), panel = dk / 2 * 2 * kPanel;
  for (int64_t j0 = 0; j0 < cols; j0 += 16)
    for (int64_t d0 = 0; d0 < dk; d0 += 32) {
      const __mmask32 m = mask32(D - d0);
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < n ? _mm512_maskz_loadu_epi16(m, k + (j0 + i) * ld + d0) : _mm512_setzero_si512();
      transpose16(r);
      uint16_t* out = dst + (j0 / kPanel) * panel + (j0 % kPanel) * 2;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + (d0 / 2 + p) * 2 * kPanel, r[p]);
    }
}

TT_AVX512 void pack_v(const uint16_t* v, int64_t ld, int64_t n, int64_t D, uint16_t* dst) {
  const int64_t cols = round_up(D, kPanel), pairs = round_up(n, 32) / 2, panel = pairs * 2 * kPanel;
  alignas(64) uint16_t lo[32], hi[32];
  for (int i = 0; i < 16; ++i) {
    lo[2 * i] = uint16_t(i);
    lo[2 * i + 1] = uint16_t(32 + i);
    hi[2 * i] = uint16_t(16 + i);
    hi[2 * i + 1] = uint16_t(48 + i);
  }
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  for (int64_t jp = 0; jp < pairs; ++jp)
    for (int64_t d0 = 0; d0 < cols; d0 += kPanel) {
      const __mmask32 m = mask32(D - d0);
      const __m512i x = 2 * jp < n ? _mm512_maskz_loadu_epi16(m, v + 2 * jp * ld + d0) : _mm512_setzero_si512();
      const __m512i y =
          2 * jp + 1 < n ? _mm512_maskz_loadu_epi16(m, v + (2 * jp + 1) * ld + d0) : _mm512_setzero_si512();
      uint16_t* out = dst + (d0 / kPanel) * panel + jp * 2 * kPanel;
      _mm512_storeu_si512(out, _mm512_permutex2var_epi16(x, ilo, y));
      _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(x, ihi, y));
    }
}

// vdpbf16ps: 4 rows x NP panels (NP * 32 columns) of C in registers over the whole depth: 24 accumulators, 6 B
// vectors and the broadcast row pair at NP = 3, so each loaded B vector feeds 4 products and each row pair 6.
constexpr int kRows = 4;

template <int NP>
TT_AVX512BF16 void dp_block(int64_t pairs, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t panel, float* C,
                            int64_t ldc, bool accumulate) {
  __m512 c[kRows][2 * NP];
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < 2 * NP; ++j) c[i][j] = accumulate ? _mm512_loadu_ps(C + i * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh b[2 * NP];
    for (int q = 0; q < NP; ++q)
      for (int h = 0; h < 2; ++h) b[2 * q + h] = (__m512bh)_mm512_load_si512(B + q * panel + kp * 2 * kPanel + 32 * h);
    for (int i = 0; i < kRows; ++i) {
      int32_t pair;
      std::memcpy(&pair, A + i * lda + 2 * kp, sizeof pair);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < 2 * NP; ++j) c[i][j] = _mm512_dpbf16_ps(c[i][j], a, b[j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < 2 * NP; ++j) _mm512_storeu_ps(C + i * ldc + 16 * j, c[i][j]);
}

// Panels outer, rows inner: NP panels (depth x 32 x 2 bytes each, 8 KB at depth 128) stay in L1 across the row
// blocks.
void dp_gemm(int64_t rows, int64_t cols, int64_t depth, const uint16_t* A, int64_t lda, const uint16_t* B, float* C,
             int64_t ldc, bool accumulate) {
  const int64_t pairs = depth / 2, panel = pairs * 2 * kPanel;
  for (int64_t c0 = 0; c0 < cols; c0 += 3 * kPanel) {
    const int64_t np = std::min<int64_t>(3, (cols - c0) / kPanel);
    const uint16_t* b = B + (c0 / kPanel) * panel;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const uint16_t* a = A + r0 * lda;
      float* c = C + r0 * ldc + c0;
      if (np == 3) dp_block<3>(pairs, a, lda, b, panel, c, ldc, accumulate);
      else if (np == 2) dp_block<2>(pairs, a, lda, b, panel, c, ldc, accumulate);
      else dp_block<1>(pairs, a, lda, b, panel, c, ldc, accumulate);
    }
  }
}

// exp(x), 16 lanes: the same range reduction and polynomial as vec8_cpu.h's exp8 (with fused multiply-adds and
// vscalefps for the power of two), exactly 0 below -87 (also for -inf), NaN stays NaN (vminps / vmaxps return
// their second operand when one is NaN).
TT_AVX512BF16 inline __m512 exp16(__m512 x) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), _mm512_min_ps(_mm512_set1_ps(88.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(_knot_mask16(under), _mm512_scalef_ps(y, n));
}

TT_AVX512BF16 float softmax_row(const float* row, int64_t live_n, int64_t width, float scale, float m_old,
                                uint16_t* prow, float* m_new) {
  __m512 vmax = _mm512_set1_ps(-INFINITY), vmin = _mm512_set1_ps(INFINITY);
  for (int64_t j = 0; j < live_n; j += 16) {  // a NaN score leaves these alone (second operand) and NaNs pass 2
    const __mmask16 live = live_n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (live_n - j)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(live, row + j);
    vmax = _mm512_mask_max_ps(vmax, live, x, vmax);
    vmin = _mm512_mask_min_ps(vmin, live, x, vmin);
  }
  const float top = scale >= 0.f ? scale * _mm512_reduce_max_ps(vmax) : scale * _mm512_reduce_min_ps(vmin);
  const float m = std::max(m_old, top);
  const __m512 vm = _mm512_set1_ps(m), vc = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < width; j += 16) {
    const int64_t left = live_n - j;
    const __mmask16 live = left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), vc, vm)));
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  *m_new = m;
  return _mm512_reduce_add_ps(sum);
}

// AMX: every tile 16 rows x 64 bytes. C tiles 0-3 (2 x 2 blocks of 16 x 16), A tiles 4-5, B tiles 6-7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TT_AMX void amx_begin() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 does not see ldtilecfg read its operand and drops the stores above as dead without this barrier.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

TT_AMX void amx_end() { _tile_release(); }

TT_AMX void amx_gemm(int64_t rows, int64_t cols, int64_t depth, const uint16_t* A, int64_t lda, const uint16_t* B,
                     float* C, int64_t ldc, bool accumulate) {
  const int64_t lda_b = lda * 2, ldb_b = 2 * kPanel * 2, ldc_b = ldc * 4, panel = depth / 2 * 2 * kPanel;
  for (int64_t c0 = 0; c0 < cols; c0 += kPanel) {  // one panel: 2 column tiles
    const uint16_t* bp = B + (c0 / kPanel) * panel;
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const bool r2 = r0 + 16 < rows;
      float* c00 = C + r0 * ldc + c0;
      float* c10 = c00 + 16 * ldc;
      if (accumulate) {
        _tile_loadd(0, c00, ldc_b);
        _tile_loadd(1, c00 + 16, ldc_b);
        if (r2) {
          _tile_loadd(2, c10, ldc_b);
          _tile_loadd(3, c10 + 16, ldc_b);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < depth; k0 += 32) {
        const uint16_t* a = A + r0 * lda + k0;
        const uint16_t* b = bp + (k0 / 2) * 2 * kPanel;
        _tile_loadd(4, a, lda_b);
        _tile_loadd(6, b, ldb_b);
        _tile_loadd(7, b + 32, ldb_b);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (r2) {
          _tile_loadd(5, a + 16 * lda, lda_b);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c00, ldc_b);
      _tile_stored(1, c00 + 16, ldc_b);
      if (r2) {
        _tile_stored(2, c10, ldc_b);
        _tile_stored(3, c10 + 16, ldc_b);
      }
    }
  }
}

}  // namespace

void ba_pack_k_bf16(const uint16_t* k, int64_t ld, int64_t n, int64_t D, uint16_t* dst) { pack_k(k, ld, n, D, dst); }
void ba_pack_v_bf16(const uint16_t* v, int64_t ld, int64_t n, int64_t D, uint16_t* dst) { pack_v(v, ld, n, D, dst); }

void ba_bf16_gemm(BaCpuBf16 path, int64_t rows, int64_t cols, int64_t depth, const uint16_t* A, int64_t lda,
                  const uint16_t* B, float* C, int64_t ldc, bool accumulate) {
  if (path == BaCpuBf16::kAmx) amx_gemm(rows, cols, depth, A, lda, B, C, ldc, accumulate);
  else dp_gemm(rows, cols, depth, A, lda, B, C, ldc, accumulate);
}

float ba_softmax_row_bf16(const float* row, int64_t live_n, int64_t width, float scale, float m_old, uint16_t* prow,
                          float* m_new) {
  return softmax_row(row, live_n, width, scale, m_old, prow, m_new);
}

void ba_bf16_begin(BaCpuBf16 path) {
  if (path == BaCpuBf16::kAmx) amx_begin();
}

void ba_bf16_end(BaCpuBf16 path) {
  if (path == BaCpuBf16::kAmx) amx_end();
}
#endif  // TT_X86

}  // namespace tt
