// What the panel micro kernel families (linear_<isa>_cpu.cpp; torch-free) share: their entry points, operand
// addressing, the k loop with its prefetch, the output stores, and the register blocking.
//
// A family is a struct with kMaxMR, a constexpr nr(mr) (panels per block for mr rows: what its registers hold)
// and `template <int MR, int NR> static void run(const LinearParams&, int64_t m0, int64_t panel, int last_cols,
// const char* pf)`, which computes rows [m0, m0 + MR) x panels [panel, panel + NR) over all of K (last_cols: the
// columns of the block's last panel that exist, 1..16) and, as it goes, prefetches the same rows of the NR panels
// at pf.
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/simd_cpu.h"
#include "linear/linear.h"

namespace tt {

// Output panels [p0, p1) of every row, per instruction set (linear_cpu_panels dispatches).
void linear_scalar_panels(const LinearParams& p, int64_t p0, int64_t p1);
void linear_avx2_panels(const LinearParams& p, int64_t p0, int64_t p1);
void linear_avx512_panels(const LinearParams& p, int64_t p0, int64_t p1, bool vdpbf16ps);
void linear_amx_panels(const LinearParams& p, int64_t p0, int64_t p1);
// bf16 panels [p0, p1) back to W^T (linear_unpack_panels), AVX2.
void linear_avx2_unpack_bf16(const LinearParams& p, int64_t p0, int64_t p1, uint16_t* dst, int64_t ld);

inline int64_t linear_elem_bytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }
// Address of y[m, n].
inline void* linear_y_at(const LinearParams& p, int64_t m, int64_t n) {
  return static_cast<char*>(p.y) + (m * p.y_stride + n) * linear_elem_bytes(p.dtype);
}
// Rows of a panel: one per k (fp32) or per k pair (bf16), each 64 bytes (16 outputs).
inline int64_t linear_panel_steps(const LinearParams& p) { return p.dtype == DType::kFloat32 ? p.K : (p.K + 1) / 2; }

// One register block's operands: x from row m0 (rows xs apart), the weights from `panel` (panels steps x 16 x 2
// bf16 or steps x 16 fp32 elements apart: row s of panel j at w + (j * steps + s) * per_row).
template <class T> struct BlockOperands {
  const T* x;
  const T* w;
  int64_t xs, steps;
  static constexpr int64_t per_row = kLinearPanel * (sizeof(T) == 4 ? 1 : 2);
  BlockOperands(const LinearParams& p, int64_t m0, int64_t panel)
      : x(static_cast<const T*>(p.x) + m0 * p.x_stride), w(static_cast<const T*>(p.w)),
        xs(p.x_stride), steps(linear_panel_steps(p)) {
    w += panel * steps * per_row;
  }
  const T* row(int j, int64_t s) const { return w + (j * steps + s) * per_row; }
};

// Prefetch distance: the next group of panels while it fits in L2 (2 MB here) beside the current one; past that
// (long K: a group of 6 panels at K = 4096 is 1.5 MB) lines fetched a whole group ahead are evicted before use,
// so each panel is prefetched kPrefetchRows rows ahead of its own stream instead.
constexpr int64_t kPrefetchGroupBytes = 256 << 10;
constexpr int64_t kPrefetchRows = 32;

#ifdef TT_X86
// One 64-byte row of each of NR panels `steps` rows long, at row s of the panels at pf, into L2: the kernels fetch
// the next group of panels while they compute on this one, so the weights stream from memory at full rate even
// where a block's FMAs take longer than its loads (the hardware prefetcher alone runs only a few lines ahead).
template <int NR> inline void prefetch_panel_rows(const char* pf, int64_t steps, int64_t s) {
  _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) _mm_prefetch(pf + (j * steps + s) * 64, _MM_HINT_T1);
}

// The k loop of a register block over the panel rows: step(s, pair) after prefetching row s of the next group;
// `pair` (a std::bool_constant) is false only for an odd K's lone last k of a bf16 kernel. Always inlined into
// the family's run, so the step lambda, which carries the family's target attribute, inlines too.
template <int NR, class Step>
__attribute__((always_inline)) inline void k_loop(int64_t steps, bool lone_last, const char* pf, Step&& step) {
  const int64_t full = steps - (lone_last ? 1 : 0);
  for (int64_t s = 0; s < full; ++s) {
    prefetch_panel_rows<NR>(pf, steps, s);
    step(s, std::true_type{});
  }
  if (lone_last) step(full, std::false_type{});
}

// The 32-bit pair x[k], x[k + 1] of a bf16 row, or x[k] alone (high half zero) for a lone last k.
template <bool kPair> inline uint32_t bf16_pair(const uint16_t* xk) {
  return kPair ? uint32_t(xk[0]) | uint32_t(xk[1]) << 16 : xk[0];
}

// 16 fp32 results into y's dtype (bf16: round to nearest even), the lanes of `mask` only.
TT_AVX512 inline void store16_avx512(DType dt, void* y, __m512 v, __mmask16 mask) {
  if (dt == DType::kFloat32) _mm512_mask_storeu_ps(y, mask, v);
  else _mm256_mask_storeu_epi16(y, mask, _mm512_cvtepi32_epi16(bf16_rne_avx512(v)));
}
#endif

// Full unrolling of the MR / NR loops: without it GCC keeps accumulator arrays on the stack.
#define TT_LINEAR_UNROLL _Pragma("GCC unroll 16")

namespace linear_blocking {

using BlockFn = void (*)(const LinearParams&, int64_t, int64_t, int, const char*);

template <class F, int MR, int NR>
void call(const LinearParams& p, int64_t m0, int64_t panel, int last_cols, const char* pf) {
  F::template run<MR, NR>(p, m0, panel, last_cols, pf);
}

template <class F, int... I> constexpr auto make_table(std::integer_sequence<int, I...>) {
  constexpr int W = F::nr(1);  // the widest block
  struct Table {
    BlockFn fn[F::kMaxMR][W];
  } t{};
  ((t.fn[I / W][I % W] = (I % W) < F::nr(I / W + 1) ? &call<F, I / W + 1, (I % W) + 1> : nullptr), ...);
  return t;
}

// Rows in balanced blocks of at most kMaxMR (M = 9 with kMaxMR 8: 5 + 4, not 8 + 1); output panels in groups of
// nr(largest block), each group's weights in cache for all its row blocks: the first row block of a group
// prefetches the next group (the others re-prefetch their own group's lines, already cached: no branch).
template <class F> void drive(const LinearParams& p, int64_t p0, int64_t p1) {
  static constexpr auto table = make_table<F>(std::make_integer_sequence<int, F::kMaxMR * F::nr(1)>{});
  const int64_t blocks = (p.M + F::kMaxMR - 1) / F::kMaxMR;
  if (blocks == 0) return;
  const int64_t base = p.M / blocks, extra = p.M % blocks;
  const int64_t group = F::nr(int(base + (extra ? 1 : 0)));
  const int64_t last_panel = linear_panels(p.N) - 1;
  const int tail_cols = int(p.N - last_panel * kLinearPanel);
  const int64_t panel_bytes = linear_panel_steps(p) * 64;
  const char* w = static_cast<const char*>(p.w);
  for (int64_t g = p0; g < p1; g += group) {
    const int64_t nr = p1 - g < group ? p1 - g : group;
    const int last_cols = g + nr - 1 == last_panel ? tail_cols : int(kLinearPanel);
    const char* next = group * panel_bytes > kPrefetchGroupBytes ? w + g * panel_bytes + kPrefetchRows * 64
                                                                  : w + (g + nr < p1 ? g + nr : g) * panel_bytes;
    for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
      const int64_t mr = base + (b < extra ? 1 : 0);
      table.fn[mr - 1][nr - 1](p, m0, g, last_cols, b == 0 ? next : w + g * panel_bytes);
      m0 += mr;
    }
  }
}

}  // namespace linear_blocking
}  // namespace tt
