// The AMX panel kernel of the dense linear (linear.h; torch-free), bf16: two 16 x 16 fp32 output tiles (two
// panels) per step, each k block of 32 one tile product of x's 16 x 32 tile (linear_amx_pad_x's copy: padded
// rows and columns are zero) with a panel's 16 pair-rows (1 KB, contiguous in the packed layout). An odd number
// of pair-rows (K not a multiple of 32) ends in tail tiles configured with fewer rows, so the weights need no
// padding beyond linear.h's. With M <= 16 each weight byte is read once; more rows re-read a panel pair from
// the cache per 16 rows.
#include <cstdint>
#include <cstring>

#include "linear/linear_kernels_cpu.h"

namespace tt {

void linear_amx_pad_x(const LinearParams& p, uint16_t* dst) {
  const int64_t ld = linear_amx_ld(p.K), rows = (p.M + 15) / 16 * 16;
  std::memset(dst, 0, size_t(rows * ld) * 2);
  for (int64_t m = 0; m < p.M; ++m)
    std::memcpy(dst + m * ld, static_cast<const uint16_t*>(p.x) + m * p.x_stride, size_t(p.K) * 2);
}

#ifdef TT_X86
namespace {

// The 64-byte tile configuration (palette 1): bytes per row and rows of each of the 8 tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0, 1 outputs; 2 x; 3, 4 weights; 5 x's tail columns, 6, 7 the weights' tail pair-rows.
TileConfig tile_config(int64_t tail_pairs) {
  TileConfig c;
  for (int t : {0, 1, 2, 3, 4}) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  if (tail_pairs) {
    c.rows[5] = 16;
    c.colsb[5] = uint16_t(tail_pairs * 4);
    c.rows[6] = c.rows[7] = uint8_t(tail_pairs);
    c.colsb[6] = c.colsb[7] = 64;
  }
  return c;
}

// One k block: x tile X times weight tiles W0 (and W1 when two) into output tiles 0 (and 1); the tile numbers are
// literals (they are part of the instruction).
#define TT_AMX_K_BLOCK(X, W0, W1, x, w0, w1, ldx, two) \
  do {                                                 \
    _tile_loadd(X, x, (ldx) * 2);                      \
    _tile_loadd(W0, w0, 64);                           \
    _tile_dpbf16ps(0, X, W0);                          \
    if (two) {                                         \
      _tile_loadd(W1, w1, 64);                         \
      _tile_dpbf16ps(1, X, W1);                        \
    }                                                  \
  } while (0)

// Rows [m0, m0 + 16) x panels g (and g + 1 when kTwo) over all of K into out [2][16][16], prefetching the same
// rows of the two panels at pf (linear_kernels_cpu.h's prefetch_panel_rows: 16 pair-rows per k block).
template <bool kTwo>
TT_AMX void tile_block(const uint16_t* x, int64_t ldx, const uint16_t* w0, int64_t K2, float (*out)[16][16],
                       const char* pf) {
  const uint16_t* w1 = w0 + K2 * 2 * kLinearPanel;
  const int64_t blocks = K2 / 16;
  _tile_zero(0);
  if (kTwo) _tile_zero(1);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    for (int r = 0; r < 16; ++r) prefetch_panel_rows<2>(pf, K2, kb * 16 + r);
    TT_AMX_K_BLOCK(2, 3, 4, x + kb * 32, w0 + kb * 512, w1 + kb * 512, ldx, kTwo);
  }
  if (K2 % 16) TT_AMX_K_BLOCK(5, 6, 7, x + blocks * 32, w0 + blocks * 512, w1 + blocks * 512, ldx, kTwo);
  _tile_stored(0, out[0], 64);
  if (kTwo) _tile_stored(1, out[1], 64);
}
#undef TT_AMX_K_BLOCK

}  // namespace

TT_AMX void linear_amx_panels(const LinearParams& p, int64_t p0, int64_t p1) {
  const int64_t K2 = (p.K + 1) / 2, ldx = linear_amx_ld(p.K), last_panel = linear_panels(p.N) - 1;
  const int tail_cols = int(p.N - last_panel * kLinearPanel);
  const TileConfig cfg = tile_config(K2 % 16);
  _tile_loadconfig(&cfg);
  alignas(64) float out[2][16][16];
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  const int64_t panel_elems = K2 * 2 * kLinearPanel;
  for (int64_t g = p0; g < p1; g += 2) {
    const bool two = g + 1 < p1;
    const auto* next = reinterpret_cast<const char*>(w + (g + 2 < p1 ? g + 2 : g) * panel_elems);
    for (int64_t m0 = 0; m0 < p.M; m0 += 16) {
      const uint16_t* x = p.x_amx + m0 * ldx;
      const char* pf = m0 == 0 ? next : reinterpret_cast<const char*>(w + g * panel_elems);
      if (two) tile_block<true>(x, ldx, w + g * panel_elems, K2, out, pf);
      else tile_block<false>(x, ldx, w + g * panel_elems, K2, out, pf);
      const int64_t rows = p.M - m0 < 16 ? p.M - m0 : 16;
      for (int t = 0; t < (two ? 2 : 1); ++t) {
        const __mmask16 mask = mask16(g + t == last_panel ? tail_cols : kLinearPanel);
        for (int64_t r = 0; r < rows; ++r)
          store16_avx512(p.dtype, linear_y_at(p, m0 + r, (g + t) * kLinearPanel), _mm512_load_ps(out[t][r]), mask);
      }
    }
  }
  _tile_release();
}
#endif  // TT_X86

}  // namespace tt
