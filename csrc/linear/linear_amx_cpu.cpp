// The AMX panel kernel of the dense linear (linear.h; torch-free), bf16: per step two panels (two 16 x 16 fp32
// output tiles) of up to two 16-row blocks (four tiles, each weight tile used twice), each k block of 32 one tile
// product of x's 16 x 32 tile (linear_amx_pad_x's copy: padded rows and columns are zero) with a panel's 16
// pair-rows (1 KB, contiguous in the packed layout). The last k block of a K that is not a multiple of 32 comes
// from a zero-padded copy of the panels' last pair-rows, so every tile is 16 x 64 bytes, no weight is read past
// its panel, and the weights need no padding beyond linear.h's. With M <= 16 each weight byte is read once; more
// rows re-read a panel pair from the cache per 32 rows.
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

// The 64-byte tile configuration (palette 1): all 8 tiles 16 rows x 64 bytes. Tiles 0-3: outputs (row block r,
// panel t in tile 2 r + t); 4, 5: x of row blocks 0, 1; 6, 7: weights of panels 0, 1.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

constexpr int64_t kTileElems = 16 * 32;  // bf16 elements of one 16 x 64-byte tile

// One k block: weight tiles from w0 (and w1 when kTwo), x tiles of kRows row blocks (ldx elements apart).
template <int kRows, bool kTwo>
TT_AMX inline void k_block(const uint16_t* x, int64_t ldx, const uint16_t* w0, const uint16_t* w1) {
  _tile_loadd(6, w0, 64);
  if (kTwo) _tile_loadd(7, w1, 64);
  _tile_loadd(4, x, ldx * 2);
  _tile_dpbf16ps(0, 4, 6);
  if (kTwo) _tile_dpbf16ps(1, 4, 7);
  if constexpr (kRows == 2) {
    _tile_loadd(5, x + 16 * ldx, ldx * 2);
    _tile_dpbf16ps(2, 5, 6);
    if (kTwo) _tile_dpbf16ps(3, 5, 7);
  }
}

// Row blocks [m0, m0 + 16 kRows) x panels w0 (and w1) over all of K into out[2 r + t], prefetching the same rows
// of the two panels at pf (linear_kernels_cpu.h's prefetch_panel_rows: 16 pair-rows per k block); tail: the
// zero-padded last k block of each panel, or null.
template <int kRows, bool kTwo>
TT_AMX void tile_block(const uint16_t* x, int64_t ldx, const uint16_t* w0, const uint16_t* w1, int64_t K2,
                       const uint16_t* tail, float (*out)[16][16], const char* pf) {
  const int64_t blocks = K2 / 16;
  _tile_zero(0);
  if (kTwo) _tile_zero(1);
  if constexpr (kRows == 2) {
    _tile_zero(2);
    if (kTwo) _tile_zero(3);
  }
  for (int64_t kb = 0; kb < blocks; ++kb) {
    for (int r = 0; r < 16; ++r) prefetch_panel_rows<2>(pf, K2, kb * 16 + r);
    k_block<kRows, kTwo>(x + kb * 32, ldx, w0 + kb * kTileElems, w1 + kb * kTileElems);
  }
  if (tail != nullptr) k_block<kRows, kTwo>(x + blocks * 32, ldx, tail, tail + kTileElems);
  // Only the tiles this block used (one row block and one panel skip half or three quarters of the stores).
  _tile_stored(0, out[0], 64);
  if (kTwo) _tile_stored(1, out[1], 64);
  if constexpr (kRows == 2) {
    _tile_stored(2, out[2], 64);
    if (kTwo) _tile_stored(3, out[3], 64);
  }
}

using TileBlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*,
                             float (*)[16][16], const char*);
constexpr TileBlockFn kTileBlocks[2][2] = {{&tile_block<1, false>, &tile_block<1, true>},
                                           {&tile_block<2, false>, &tile_block<2, true>}};

}  // namespace

TT_AMX void linear_amx_panels(const LinearParams& p, int64_t p0, int64_t p1) {
  const int64_t K2 = (p.K + 1) / 2, ldx = linear_amx_ld(p.K), last_panel = linear_panels(p.N) - 1;
  const int64_t tail_rows = K2 % 16, panel_elems = K2 * 2 * kLinearPanel;
  const int tail_cols = int(p.N - last_panel * kLinearPanel);
  TileConfig cfg;
  if (p.M < 16) {  // one row block of fewer than 16 rows: its x and output tiles only that tall (the padding rows
                   // were loaded, multiplied and stored for nothing: M = 1 moved 16 x tile rows per weight tile)
    cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = uint8_t(p.M);
  }
  _tile_loadconfig(&cfg);
  alignas(64) float out[4][16][16];
  alignas(64) uint16_t tail[2][kTileElems] = {};
  const uint16_t* w = static_cast<const uint16_t*>(p.w);
  for (int64_t g = p0; g < p1; g += 2) {
    const bool two = g + 1 < p1;
    const uint16_t* w0 = w + g * panel_elems;
    const uint16_t* w1 = two ? w0 + panel_elems : w0;
    if (tail_rows)
      for (int t = 0; t < 2; ++t)
        std::memcpy(tail[t], (t ? w1 : w0) + (K2 - tail_rows) * 32, size_t(tail_rows) * 64);
    const auto* next = reinterpret_cast<const char*>(w0) +
                       (2 * panel_elems * 2 > kPrefetchGroupBytes ? kPrefetchRows * 64
                                                                   : (g + 2 < p1 ? 2 : 0) * panel_elems * 2);
    for (int64_t m0 = 0; m0 < p.M; m0 += 32) {
      const int64_t rows = p.M - m0 < 32 ? p.M - m0 : 32;
      const char* pf = m0 == 0 ? next : reinterpret_cast<const char*>(w0);
      kTileBlocks[rows > 16][two](p.x_amx + m0 * ldx, ldx, w0, w1, K2, tail_rows ? tail[0] : nullptr, out, pf);
      for (int t = 0; t < (two ? 2 : 1); ++t) {
        const __mmask16 mask = mask16(g + t == last_panel ? tail_cols : kLinearPanel);
        for (int64_t r = 0; r < rows; ++r)
          store16_avx512(p.dtype, linear_y_at(p, m0 + r, (g + t) * kLinearPanel),
                         _mm512_load_ps(out[2 * (r / 16) + t][r % 16]), mask);
      }
    }
  }
  _tile_release();
}
#endif  // TT_X86

}  // namespace tt
