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
constexpr int64_t kTileE = 2;  // experts per micro-kernel call (kTileT x kTileE accumulators of 4 lanes)

// out[t][e] = xb[t] . r[e] for the tile's kTileT token rows (xb: [kTileT][hp] fp64, zero-padded to hp, a multiple
// of 4) and kTileE router rows of `hidden` elements. Every (t, e) gets the same arithmetic (4 lanes over h, the
// tail masked in, then (l0 + l1) + (l2 + l3)) whatever its place in the tile: equal rows give equal logits
// (exact ties stay ties), and a token's logits do not depend on which tokens share its tile.
#ifdef TT_X86
inline void dot_tile(const double* xb, int64_t hp, const double* const r[kTileE], int64_t hidden,
                     double out[kTileT][kTileE]) {
  __m256d acc[kTileT][kTileE];
  for (int64_t t = 0; t < kTileT; ++t)
    for (int64_t e = 0; e < kTileE; ++e) acc[t][e] = _mm256_setzero_pd();
  const int64_t h4 = hidden & ~int64_t(3);
  for (int64_t h = 0; h < h4; h += 4) {
    __m256d rv[kTileE];
    for (int64_t e = 0; e < kTileE; ++e) rv[e] = _mm256_loadu_pd(r[e] + h);
    for (int64_t t = 0; t < kTileT; ++t) {
      const __m256d xv = _mm256_loadu_pd(xb + t * hp + h);
      for (int64_t e = 0; e < kTileE; ++e) acc[t][e] = _mm256_fmadd_pd(xv, rv[e], acc[t][e]);
    }
  }
  if (h4 < hidden) {  // the x rows are zero past `hidden`; the router rows are not read there
    const int64_t n = hidden - h4;
    const __m256i mask = _mm256_set_epi64x(n > 3 ? -1 : 0, n > 2 ? -1 : 0, n > 1 ? -1 : 0, -1);
    __m256d rv[kTileE];
    for (int64_t e = 0; e < kTileE; ++e) rv[e] = _mm256_maskload_pd(r[e] + h4, mask);
    for (int64_t t = 0; t < kTileT; ++t) {
      const __m256d xv = _mm256_loadu_pd(xb + t * hp + h4);
      for (int64_t e = 0; e < kTileE; ++e) acc[t][e] = _mm256_fmadd_pd(xv, rv[e], acc[t][e]);
    }
  }
  for (int64_t t = 0; t < kTileT; ++t)
    for (int64_t e = 0; e < kTileE; ++e) {
      alignas(32) double l[4];
      _mm256_store_pd(l, acc[t][e]);
      out[t][e] = (l[0] + l[1]) + (l[2] + l[3]);
    }
}
#else
inline void dot_tile(const double* xb, int64_t hp, const double* const r[kTileE], int64_t hidden,
                     double out[kTileT][kTileE]) {
  for (int64_t t = 0; t < kTileT; ++t)
    for (int64_t e = 0; e < kTileE; ++e) {
      double l[4] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t h = 0; h < hidden; ++h) l[h & 3] += xb[t * hp + h] * r[e][h];
      out[t][e] = (l[0] + l[1]) + (l[2] + l[3]);
    }
}
#endif

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
  for (int64_t e = 0; e < E; ++e) {
    s.scores[e] = 1.0 / (1.0 + std::exp(-logits[e]));
    s.choice[e] = s.scores[e] + p.bias[e * p.bias_stride];
  }
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

template <typename T>
void route_tokens(const MoeRouteParams& p, int64_t token_begin, int64_t token_end) {
  const int64_t H = p.hidden, E = p.experts;
  const int64_t hp = (H + 3) & ~int64_t(3);
  Scratch s(p, hp);
  const T* x = static_cast<const T*>(p.x);
  for (int64_t t0 = token_begin; t0 < token_end; t0 += kTileT) {
    const int64_t nt = std::min(kTileT, token_end - t0);
    // The tile's rows in fp64, zero past `hidden`; rows past the last token stay zero (their logits are dropped).
    std::fill(s.xb.begin(), s.xb.end(), 0.0);
    for (int64_t t = 0; t < nt; ++t) {
      const T* src = x + (t0 + t) * p.x_row_stride;
      double* dst = s.xb.data() + t * hp;
      for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<double>(to_float(src[h]));
    }
    for (int64_t e0 = 0; e0 < E; e0 += kTileE) {
      const double* r[kTileE];
      for (int64_t e = 0; e < kTileE; ++e) r[e] = p.router + std::min(e0 + e, E - 1) * p.router_row_stride;
      double out[kTileT][kTileE];
      dot_tile(s.xb.data(), hp, r, H, out);
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t e = 0; e < kTileE && e0 + e < E; ++e) s.logits[t * E + e0 + e] = out[t][e];
    }
    for (int64_t t = 0; t < nt; ++t) select_token(p, s.logits.data() + t * E, t0 + t, s);
  }
}

}  // namespace

Status moe_route_cpu(const MoeRouteParams& p, int64_t token_begin, int64_t token_end) {
  if (p.experts < 1 || p.k < 1 || p.k > p.experts || p.n_group < 1 || p.experts % p.n_group != 0 ||
      p.topk_group < 1 || p.topk_group > p.n_group || (p.n_group > 1 && p.experts / p.n_group < 2) || p.hidden < 0)
    return Status::kUnsupportedShape;
  if (token_begin >= token_end) return Status::kOk;
  switch (p.dtype) {
    case DType::kFloat32: route_tokens<float>(p, token_begin, token_end); break;
    case DType::kBFloat16: route_tokens<bf16_t>(p, token_begin, token_end); break;
    case DType::kFloat16: route_tokens<fp16_t>(p, token_begin, token_end); break;
    default: return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

}  // namespace tt
