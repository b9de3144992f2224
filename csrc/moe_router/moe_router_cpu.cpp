// CPU MoE router (moe_router.h): per tile of 4 tokens the x rows widened to fp64 once, the router read once per
// tile in dot tiles (AVX-512: 4 tokens x 4 experts x 8 lanes; AVX2 and scalar: 4 x 2 x 4), then per token the fp64
// sigmoid (4 lanes), the optional group limit and ATen's own top-k algorithm on (value, index) pairs, so the
// selection and its order, ties included, are torch.topk's.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common/cpu_isa.h"
#include "common/half_cpu.h"
#include "moe_router/moe_router.h"

namespace tt {
namespace {

constexpr int64_t kTileT = 4;  // tokens per tile: the router is read once per tile of tokens

// out[t][e] = xb[t] . r[e] for the tile's first NT token rows (NT = kTileT, or 1 for a lone token; xb: [kTileT][hp]
// fp64, zero-padded to hp, a multiple of 8) and NE router rows of `hidden` elements. Every (t, e) gets the same
// arithmetic (lanes over h, the tail masked in, then a fixed pairwise sum of the lanes) whatever its place in the tile
// and the tile's NT: equal router rows give equal logits (exact ties stay ties), and a token's logits do not depend on
// which tokens share its tile. The instruction sets differ in their lane count (and so round differently), never
// between tokens or experts.
constexpr int64_t kTileE = 2;     // experts per call: scalar and AVX2 (4 x 2 x 4 lanes of accumulators)
constexpr int64_t kTileE512 = 4;  // AVX-512 (4 x 4 x 8 lanes)

// The router's rows are fp64 or fp32 (R): fp32 values widen to fp64 exactly, so both give the same bits.
template <int NT, typename R>
void dot_tile_scalar(const double* xb, int64_t hp, const R* const r[kTileE], int64_t hidden,
                     double out[kTileT][kTileE512]) {
  for (int64_t t = 0; t < NT; ++t)
    for (int64_t e = 0; e < kTileE; ++e) {
      double l[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t h = 0; h < hidden; ++h) l[h & 3] += xb[t * hp + h] * double(r[e][h]);
      out[t][e] = (l[0] + l[1]) + (l[2] + l[3]);
    }
}

#ifdef TT_X86
inline __m256d load4d(const double* p) { return _mm256_loadu_pd(p); }
inline __m256d load4d(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
// The first n (1..3) elements, the rest 0 (and not read).
inline __m256d maskload4d(const double* p, int64_t n) {
  return _mm256_maskload_pd(p, _mm256_set_epi64x(n > 3 ? -1 : 0, n > 2 ? -1 : 0, n > 1 ? -1 : 0, -1));
}
inline __m256d maskload4d(const float* p, int64_t n) {
  return _mm256_cvtps_pd(_mm_maskload_ps(p, _mm_set_epi32(n > 3 ? -1 : 0, n > 2 ? -1 : 0, n > 1 ? -1 : 0, -1)));
}

template <int NT, typename R>
void dot_tile_avx2(const double* xb, int64_t hp, const R* const r[kTileE], const R* const pf[kTileE512],
                   int64_t hidden, double out[kTileT][kTileE512]) {
  __m256d acc[kTileT][kTileE];
  for (int64_t t = 0; t < NT; ++t)
    for (int64_t e = 0; e < kTileE; ++e) acc[t][e] = _mm256_setzero_pd();
  const int64_t h4 = hidden & ~int64_t(3);
  for (int64_t h = 0; h < h4; h += 4) {
    __m256d rv[kTileE];
    for (int64_t e = 0; e < kTileE; ++e) {
      rv[e] = load4d(r[e] + h);
      _mm_prefetch(reinterpret_cast<const char*>(pf[e] + h), _MM_HINT_T1);
    }
    for (int64_t t = 0; t < NT; ++t) {
      const __m256d xv = _mm256_loadu_pd(xb + t * hp + h);
      for (int64_t e = 0; e < kTileE; ++e) acc[t][e] = _mm256_fmadd_pd(xv, rv[e], acc[t][e]);
    }
  }
  if (h4 < hidden) {  // the x rows are zero past `hidden`; the router rows are not read there
    __m256d rv[kTileE];
    for (int64_t e = 0; e < kTileE; ++e) rv[e] = maskload4d(r[e] + h4, hidden - h4);
    for (int64_t t = 0; t < NT; ++t) {
      const __m256d xv = _mm256_loadu_pd(xb + t * hp + h4);
      for (int64_t e = 0; e < kTileE; ++e) acc[t][e] = _mm256_fmadd_pd(xv, rv[e], acc[t][e]);
    }
  }
  for (int64_t t = 0; t < NT; ++t)
    for (int64_t e = 0; e < kTileE; ++e) {
      alignas(32) double l[4];
      _mm256_store_pd(l, acc[t][e]);
      out[t][e] = (l[0] + l[1]) + (l[2] + l[3]);
    }
}

TT_AVX512 inline __m512d load8d(const double* p) { return _mm512_loadu_pd(p); }
TT_AVX512 inline __m512d load8d(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
TT_AVX512 inline __m512d maskload8d(const double* p, __mmask8 m) { return _mm512_maskz_loadu_pd(m, p); }
TT_AVX512 inline __m512d maskload8d(const float* p, __mmask8 m) { return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, p)); }

template <int NT, typename R>
TT_AVX512 void dot_tile_avx512(const double* xb, int64_t hp, const R* const r[kTileE512],
                               const R* const pf[kTileE512], int64_t hidden, double out[kTileT][kTileE512]) {
  __m512d acc[kTileT][kTileE512];
  for (int64_t t = 0; t < NT; ++t)
    for (int64_t e = 0; e < kTileE512; ++e) acc[t][e] = _mm512_setzero_pd();
  const int64_t h8 = hidden & ~int64_t(7);
  for (int64_t h = 0; h < h8; h += 8) {
    __m512d rv[kTileE512];
    for (int64_t e = 0; e < kTileE512; ++e) {
      rv[e] = load8d(r[e] + h);
      _mm_prefetch(reinterpret_cast<const char*>(pf[e] + h), _MM_HINT_T1);
    }
    for (int64_t t = 0; t < NT; ++t) {
      const __m512d xv = _mm512_loadu_pd(xb + t * hp + h);
      for (int64_t e = 0; e < kTileE512; ++e) acc[t][e] = _mm512_fmadd_pd(xv, rv[e], acc[t][e]);
    }
  }
  if (h8 < hidden) {
    const __mmask8 mask = __mmask8((1u << (hidden - h8)) - 1);
    __m512d rv[kTileE512];
    for (int64_t e = 0; e < kTileE512; ++e) rv[e] = maskload8d(r[e] + h8, mask);
    for (int64_t t = 0; t < NT; ++t) {
      const __m512d xv = _mm512_loadu_pd(xb + t * hp + h8);
      for (int64_t e = 0; e < kTileE512; ++e) acc[t][e] = _mm512_fmadd_pd(xv, rv[e], acc[t][e]);
    }
  }
  for (int64_t t = 0; t < NT; ++t)
    for (int64_t e = 0; e < kTileE512; ++e) {
      alignas(64) double l[8];
      _mm512_store_pd(l, acc[t][e]);
      out[t][e] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
}
#endif

// out's first NT token rows on the instruction set `isa` (rows past NT are left untouched). pf: the router rows of
// the next call, prefetched into L2 as these stream (the router is cold in a pass: the experts streamed since its
// last call; without it a 16-token call at 2 threads took ~49 us of a pass against 27 us hot).
template <int NT, typename R>
void dot_tile(CpuIsa isa, const double* xb, int64_t hp, const R* const r[kTileE512], const R* const pf[kTileE512],
              int64_t hidden, double out[kTileT][kTileE512]) {
#ifdef TT_X86
  if (isa >= CpuIsa::kAvx512) return dot_tile_avx512<NT>(xb, hp, r, pf, hidden, out);
  if (isa == CpuIsa::kAvx2) return dot_tile_avx2<NT>(xb, hp, r, pf, hidden, out);
#else
  (void)pf;
#endif
  dot_tile_scalar<NT>(xb, hp, r, hidden, out);
}

// The sigmoid 1 / (1 + exp(-l)), 4 logits at a time (the C library's exp, one call per element, cost more than the
// dot products): exp by Cody-Waite reduction to |r| <= ln2 / 2 and the degree-13 Taylor polynomial (truncation
// < 1e-17 relative, ~1-2 ulp of rounding), scaled by 2^n through the exponent bits. Lanes with |l| > 700 (where
// 2^n would leave the normal range) or NaN take the scalar formula instead. Either way each score is a function
// of its logit alone (not of its neighbours in the vector), so equal logits give equal scores.
typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

inline f64x4 splat4(double v) { return f64x4{v, v, v, v}; }

inline f64x4 sigmoid4(f64x4 l) {
  const f64x4 x = -l;
  const i64x4 ok = (x <= splat4(700.0)) & (x >= splat4(-700.0));  // false for NaN
  const f64x4 xc = ok ? x : splat4(0.0);
  const f64x4 shifter = splat4(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  const f64x4 t = xc * splat4(1.4426950408889634074) + shifter;
  const f64x4 n = t - shifter;
  f64x4 r = xc - n * splat4(6.93145751953125e-1);  // ln2 in two parts (Cephes): n * hi is exact for |n| < 2^11
  r = r - n * splat4(1.42860682030941723212e-6);
  f64x4 p = splat4(1.0 / 6227020800.0);            // 1/13!
  p = p * r + splat4(1.0 / 479001600.0);
  p = p * r + splat4(1.0 / 39916800.0);
  p = p * r + splat4(1.0 / 3628800.0);
  p = p * r + splat4(1.0 / 362880.0);
  p = p * r + splat4(1.0 / 40320.0);
  p = p * r + splat4(1.0 / 5040.0);
  p = p * r + splat4(1.0 / 720.0);
  p = p * r + splat4(1.0 / 120.0);
  p = p * r + splat4(1.0 / 24.0);
  p = p * r + splat4(1.0 / 6.0);
  p = p * r + splat4(0.5);
  p = p * r + splat4(1.0);
  p = p * r + splat4(1.0);
  const i64x4 ni = __builtin_bit_cast(i64x4, t) - __builtin_bit_cast(i64x4, shifter);
  const f64x4 e = p * __builtin_bit_cast(f64x4, (ni + 1023) << 52);
  f64x4 s = splat4(1.0) / (splat4(1.0) + e);
  for (int i = 0; i < 4; ++i)
    if (!ok[i]) s[i] = 1.0 / (1.0 + std::exp(x[i]));
  return s;
}

// torch.topk(v, k, largest=True, sorted=False) on the CPU, as ATen's topk_impl_loop (ATen/native/TopKImpl.h) does
// it: a queue of (value, index) in index order, std::partial_sort of the first k when k * 64 <= n, else
// std::nth_element at k - 1, with its comparator (NaN above everything, then value only; the index never
// compared). Same algorithm, same comparator, same input order: the same selection and the same order of the
// first k, ties included. The first k entries of `queue` are the result.
using Entry = std::pair<double, int64_t>;

inline void topk_unsorted(std::vector<Entry>& queue, int64_t k) {
  auto larger = [](const Entry& a, const Entry& b) -> bool {
    return (std::isnan(a.first) && !std::isnan(b.first)) || (a.first > b.first);
  };
  const int64_t n = static_cast<int64_t>(queue.size());
  if (k * 64 <= n) {
    std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), larger);
  } else {
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), larger);
  }
}

// The two largest of v[0..n) (n >= 2) by torch.topk's order (NaN largest), summed: a group's score.
inline double top2_sum(const double* v, int64_t n) {
  auto larger = [](double a, double b) { return (std::isnan(a) && !std::isnan(b)) || a > b; };
  double m1 = v[0], m2 = v[1];
  if (larger(m2, m1)) std::swap(m1, m2);
  for (int64_t i = 2; i < n; ++i) {
    if (larger(v[i], m1)) {
      m2 = m1;
      m1 = v[i];
    } else if (larger(v[i], m2)) {
      m2 = v[i];
    }
  }
  return m1 + m2;
}

struct Scratch {
  std::vector<double> xb, logits, scores, choice;
  std::vector<Entry> queue, groups;
  std::vector<char> keep;
  Scratch(const MoeRouteParams& p, int64_t hp)
      : xb(kTileT * hp), logits(kTileT * p.experts), scores(p.experts), choice(p.experts), queue(p.experts),
        groups(p.n_group), keep(p.n_group) {}
};

// Scores to ids and weights for one token from its logits.
void select_token(const MoeRouteParams& p, const double* logits, int64_t token, Scratch& s) {
  const int64_t E = p.experts;
  for (int64_t e0 = 0; e0 < E; e0 += 4) {
    f64x4 l = splat4(0.0);
    for (int64_t i = 0; i < 4 && e0 + i < E; ++i) l[i] = logits[e0 + i];
    const f64x4 sc = sigmoid4(l);
    for (int64_t i = 0; i < 4 && e0 + i < E; ++i) s.scores[e0 + i] = sc[i];
  }
  for (int64_t e = 0; e < E; ++e) s.choice[e] = s.scores[e] + p.bias[e * p.bias_stride];
  if (p.n_group > 1) {
    const int64_t per = E / p.n_group;
    for (int64_t g = 0; g < p.n_group; ++g) s.groups[g] = {top2_sum(s.choice.data() + g * per, per), g};
    topk_unsorted(s.groups, p.topk_group);
    std::fill(s.keep.begin(), s.keep.end(), 0);
    for (int64_t j = 0; j < p.topk_group; ++j) s.keep[s.groups[j].second] = 1;
    for (int64_t g = 0; g < p.n_group; ++g)
      if (!s.keep[g]) std::fill(s.choice.begin() + g * per, s.choice.begin() + (g + 1) * per, 0.0);
  }
  for (int64_t e = 0; e < E; ++e) s.queue[e] = {s.choice[e], e};
  topk_unsorted(s.queue, p.k);
  int64_t* ids = p.ids + token * p.k;
  double* w = p.weights + token * p.k;
  double sum = 0.0;
  for (int64_t j = 0; j < p.k; ++j) {
    ids[j] = s.queue[j].second;
    w[j] = s.scores[ids[j]];
    sum += w[j];
  }
  const double denom = sum + 1e-20;
  for (int64_t j = 0; j < p.k; ++j) w[j] = (p.norm_topk_prob ? w[j] / denom : w[j]) * p.scaling;
}

template <typename T, typename R>
void route_tokens(const MoeRouteParams& p, const R* router, int64_t token_begin, int64_t token_end) {
  const int64_t H = p.hidden, E = p.experts;
  const int64_t hp = (H + 7) & ~int64_t(7);
  Scratch s(p, hp);
  const T* x = static_cast<const T*>(p.x);
#ifdef TT_X86
  const int64_t ne = p.isa >= CpuIsa::kAvx512 ? kTileE512 : kTileE;
#else
  const int64_t ne = kTileE;
#endif
  for (int64_t t0 = token_begin; t0 < token_end; t0 += kTileT) {
    const int64_t nt = std::min(kTileT, token_end - t0);
    // The tile's rows in fp64, zero past `hidden`; rows past the last token stay zero (their logits are dropped).
    std::fill(s.xb.begin(), s.xb.end(), 0.0);
    for (int64_t t = 0; t < nt; ++t) {
      const T* src = x + (t0 + t) * p.x_row_stride;
      double* dst = s.xb.data() + t * hp;
      for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<double>(to_float(src[h]));
    }
    for (int64_t e0 = 0; e0 < E; e0 += ne) {
      const R* r[kTileE512];  // experts past the last repeat it (their logits are dropped)
      const R* pf[kTileE512];  // the next group's rows, clamped alike (the last group: its own, already cached)
      const int64_t next = e0 + ne < E ? e0 + ne : e0;
      for (int64_t e = 0; e < ne; ++e) {
        r[e] = router + std::min(e0 + e, E - 1) * p.router_row_stride;
        pf[e] = router + std::min(next + e, E - 1) * p.router_row_stride;
      }
      double out[kTileT][kTileE512];
      // A lone token (an AR step's) takes a one-row tile: the same arithmetic per (token, expert), a quarter of it.
      if (nt == 1) dot_tile<1>(p.isa, s.xb.data(), hp, r, pf, H, out);
      else dot_tile<kTileT>(p.isa, s.xb.data(), hp, r, pf, H, out);
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t e = 0; e < ne && e0 + e < E; ++e) s.logits[t * E + e0 + e] = out[t][e];
    }
    for (int64_t t = 0; t < nt; ++t) select_token(p, s.logits.data() + t * E, t0 + t, s);
  }
}

template <typename T> void route_with(const MoeRouteParams& p, int64_t token_begin, int64_t token_end) {
  if (p.router_f32) route_tokens<T>(p, static_cast<const float*>(p.router), token_begin, token_end);
  else route_tokens<T>(p, static_cast<const double*>(p.router), token_begin, token_end);
}

}  // namespace

Status moe_route_cpu(const MoeRouteParams& p, int64_t token_begin, int64_t token_end) {
  if (p.experts < 1 || p.k < 1 || p.k > p.experts || p.n_group < 1 || p.experts % p.n_group != 0 ||
      p.topk_group < 1 || p.topk_group > p.n_group || (p.n_group > 1 && p.experts / p.n_group < 2) || p.hidden < 0)
    return Status::kUnsupportedShape;
  if (token_begin >= token_end) return Status::kOk;
  switch (p.dtype) {
    case DType::kFloat32: route_with<float>(p, token_begin, token_end); break;
    case DType::kBFloat16: route_with<bf16_t>(p, token_begin, token_end); break;
    case DType::kFloat16: route_with<fp16_t>(p, token_begin, token_end); break;
    default: return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

}  // namespace tt
