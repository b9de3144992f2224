// CPU threshold unmasking. Phase 1 scans (position, vocabulary slice) work items in two passes over the
// slice (max/argmax [+ Gumbel argmax], then the sum of exps against the slice max; the second pass finds
// the slice in cache) in kLanes lanes: lane j takes entries v = lo + j (mod kLanes) in increasing order.
// With AVX2 the lanes are 4 vectors of 8 (explicit intrinsics: the compiler does not vectorise the
// select/argmax chains); pass 1, the Gumbel noise included, performs the same IEEE operations per lane as
// the scalar code, so both pick identical tokens; pass 2 uses a faster FMA exp for the sums (exp8_sum).
// Phase 2 merges each position's slices in order and applies the commit rule.
#if defined(__AVX2__) && defined(__FMA__)
#define TT_UNMASK_AVX2 1
#include <immintrin.h>
#endif

#include "common/half_cpu.h"
#include "threshold_unmask/threshold_unmask.h"

namespace tt {
namespace {

constexpr int kLanes = 32;  // 4 x 8 floats; a multiple of 4 (one Philox call covers 4 consecutive entries)

inline float load_logit(const float* p, int64_t i) { return p[i]; }
inline float load_logit(const bf16_t* p, int64_t i) { return bits_float(uint32_t(p[i].bits) << 16); }

// Lanes hold (value, lowest index) with a strict '>' in increasing index order; reduce them with the
// tie rule (lower index wins).
inline void reduce_lanes(const float* v, const int32_t* i, float* best_v, int32_t* best_i) {
  float bv = -INFINITY;
  int32_t bi = -1;
  for (int j = 0; j < kLanes; ++j) {
    if (unmask_beats(v[j], i[j], bv, bi)) {
      bv = v[j];
      bi = i[j];
    }
  }
  *best_v = bv;
  *best_i = bi;
}

struct Lanes {
  float mv[kLanes], gv[kLanes], sv[kLanes];
  int32_t mi[kLanes], gi[kLanes];
  bool nan = false;
  Lanes() {
    for (int j = 0; j < kLanes; ++j) {
      mv[j] = gv[j] = -INFINITY;
      sv[j] = 0.f;
      mi[j] = gi[j] = -1;
    }
  }
};

// Context of one slice scan: the row's parameters and the position.
struct SliceScan {
  int32_t mask;
  float temperature;
  uint64_t seed, block;
  int64_t s;
  int32_t lo;   // the slice's first entry: the scanned logits are slice[v - lo]
};

#if defined(TT_UNMASK_AVX2)
inline __m256 set1(float f) { return _mm256_set1_ps(f); }
inline __m256 vmul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 vsub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
inline __m256 vneg(__m256 a) { return _mm256_xor_ps(a, set1(-0.f)); }

inline __m256 load8(const float* row, int32_t v) { return _mm256_loadu_ps(row + v); }
inline __m256 load8(const bf16_t* row, int32_t v) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + v));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// exp(x) for x <= 0 in the slice sums: 2^(x log2 e) with a degree-6 FMA polynomial (~2e-7 relative, and
// exactly 0 below -87, so the mask entry adds nothing). Only sums use it: no result bit depends on
// matching another implementation there, so it trades tt_exp's separately rounded steps for speed.
inline __m256 exp8_sum(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, set1(-87.f), _CMP_GE_OQ);
  const __m256 t = vmul(_mm256_max_ps(x, set1(-87.f)), set1(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = vsub(t, n);                                   // [-0.5, 0.5]
  __m256 p = set1(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, set1(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, set1(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, set1(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, set1(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, set1(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, set1(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, vmul(p, _mm256_castsi256_ps(e)));
}

// tt_log, lane by lane, on 4 vectors at once: each step is issued for all 4 before the next, so the four
// long Horner chains overlap instead of running back to back.
inline void log8x4(const __m256* x, __m256* out) {
  __m256 m[4], fe[4], z[4], y[4];
  for (int j = 0; j < 4; ++j) {
    const __m256i bits = _mm256_castps_si256(x[j]);
    m[j] = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)),
                                               _mm256_set1_epi32(0x3f000000)));
    const __m256 low = _mm256_cmp_ps(m[j], set1(float(0.707106781186547524)), _CMP_LT_OQ);
    const __m256i e = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)),
                                       _mm256_and_si256(_mm256_castps_si256(low), _mm256_set1_epi32(1)));
    fe[j] = _mm256_cvtepi32_ps(e);
    m[j] = _mm256_blendv_ps(vsub(m[j], set1(1.f)), vsub(vadd(m[j], m[j]), set1(1.f)), low);
    z[j] = vmul(m[j], m[j]);
    y[j] = set1(float(7.0376836292e-2));
  }
  static constexpr double kPoly[] = {-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                                     -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1};
  for (double c : kPoly) {
    for (int j = 0; j < 4; ++j) y[j] = vadd(vmul(y[j], m[j]), set1(float(c)));
  }
  for (int j = 0; j < 4; ++j) {
    y[j] = vmul(vmul(y[j], m[j]), z[j]);
    y[j] = vadd(y[j], vmul(fe[j], set1(float(-2.12194440e-4))));
    y[j] = vsub(y[j], vmul(set1(0.5f), z[j]));
    out[j] = vadd(vadd(m[j], y[j]), vmul(fe[j], set1(0.693359375f)));
  }
}

// High and low words of the 8 lane products a * c (32 x 32 -> 64 bits).
inline void mulhilo8(__m256i a, __m256i c, __m256i* hi, __m256i* lo) {
  const __m256i pe = _mm256_mul_epu32(a, c), po = _mm256_mul_epu32(a, _mm256_srli_epi64(c, 32));
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}

// Gumbel noise for the 32 entries 4*g0 .. 4*g0+31 (8 Philox calls side by side), as 4 vectors of 8
// consecutive entries.
inline void gumbel32(const SliceScan& sc, int32_t g0, __m256 out[4]) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(g0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(int32_t(uint32_t(sc.s)));
  __m256i c2 = _mm256_set1_epi32(int32_t(uint32_t(sc.block)));
  __m256i c3 = _mm256_set1_epi32(int32_t(uint32_t(sc.block >> 32)));
  __m256i k0 = _mm256_set1_epi32(int32_t(uint32_t(sc.seed))), k1 = _mm256_set1_epi32(int32_t(uint32_t(sc.seed >> 32)));
  const __m256i m0 = _mm256_set1_epi32(int32_t(0xD2511F53u)), m1 = _mm256_set1_epi32(int32_t(0xCD9E8D57u));
  const __m256i w0 = _mm256_set1_epi32(int32_t(0x9E3779B9u)), w1 = _mm256_set1_epi32(int32_t(0xBB67AE85u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, &hi0, &lo0);
    mulhilo8(m1, c2, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
    c1 = lo1;
    c3 = lo0;
    k0 = _mm256_add_epi32(k0, w0);
    k1 = _mm256_add_epi32(k1, w1);
  }
  // Lane q of word t is entry 4q + t: transpose so vector j holds entries 8j .. 8j+7.
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i e[4] = {_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u2, u3, 0x20),
                        _mm256_permute2x128_si256(u0, u1, 0x31), _mm256_permute2x128_si256(u2, u3, 0x31)};
  __m256 u[4], l[4];
  for (int j = 0; j < 4; ++j) {
    const __m256i k = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(e[j], 9), 1), _mm256_set1_epi32(1));
    u[j] = vmul(_mm256_cvtepi32_ps(k), set1(5.9604644775390625e-8f));
  }
  log8x4(u, l);
  for (int j = 0; j < 4; ++j) l[j] = vneg(l[j]);
  log8x4(l, out);
  for (int j = 0; j < 4; ++j) out[j] = vneg(out[j]);
}

// The mask entry -> -inf, +inf -> FLT_MAX (NaN is flagged separately and the result discarded).
inline __m256 sanitise8(__m256 x, __m256i idx, __m256i mask) {
  const __m256 is_mask = _mm256_castsi256_ps(_mm256_cmpeq_epi32(idx, mask));
  return _mm256_blendv_ps(_mm256_min_ps(x, set1(FLT_MAX)), set1(-INFINITY), is_mask);
}

// Pass 1 over whole kLanes chunks from v; returns where it stopped.
template <typename T, bool kSample>
int32_t pass1_simd(const T* slice, int32_t v, int32_t hi, const SliceScan& sc, Lanes& ln) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), mask = _mm256_set1_epi32(sc.mask);
  const __m256 temp = set1(sc.temperature);
  __m256 mv[4], gv[4], nan = _mm256_setzero_ps();
  __m256i mi[4], gi[4];
  for (int a = 0; a < 4; ++a) {
    mv[a] = _mm256_loadu_ps(ln.mv + 8 * a);
    gv[a] = _mm256_loadu_ps(ln.gv + 8 * a);
    mi[a] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ln.mi + 8 * a));
    gi[a] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ln.gi + 8 * a));
  }
  for (; v + kLanes <= hi; v += kLanes) {
    __m256 g[4];
    if constexpr (kSample) gumbel32(sc, v >> 2, g);
    for (int a = 0; a < 4; ++a) {
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(v + 8 * a), iota);
      __m256 x = load8(slice, v - sc.lo + 8 * a);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      x = sanitise8(x, idx, mask);
      const __m256 gt = _mm256_cmp_ps(x, mv[a], _CMP_GT_OQ);
      mv[a] = _mm256_blendv_ps(mv[a], x, gt);
      mi[a] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mi[a]), _mm256_castsi256_ps(idx), gt));
      if constexpr (kSample) {
        const __m256 s = vadd(_mm256_div_ps(x, temp), g[a]);
        const __m256 ggt = _mm256_cmp_ps(s, gv[a], _CMP_GT_OQ);
        gv[a] = _mm256_blendv_ps(gv[a], s, ggt);
        gi[a] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(gi[a]), _mm256_castsi256_ps(idx), ggt));
      }
    }
  }
  for (int a = 0; a < 4; ++a) {
    _mm256_storeu_ps(ln.mv + 8 * a, mv[a]);
    _mm256_storeu_ps(ln.gv + 8 * a, gv[a]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ln.mi + 8 * a), mi[a]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ln.gi + 8 * a), gi[a]);
  }
  ln.nan |= _mm256_movemask_ps(nan) != 0;
  return v;
}

template <typename T>
int32_t pass2_simd(const T* slice, int32_t v, int32_t hi, float max, const SliceScan& sc, Lanes& ln) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), mask = _mm256_set1_epi32(sc.mask);
  const __m256 m = set1(max);
  __m256 s[4];
  for (int a = 0; a < 4; ++a) s[a] = _mm256_loadu_ps(ln.sv + 8 * a);
  for (; v + kLanes <= hi; v += kLanes) {
    for (int a = 0; a < 4; ++a) {
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(v + 8 * a), iota);
      const __m256 x = sanitise8(load8(slice, v - sc.lo + 8 * a), idx, mask);
      s[a] = vadd(s[a], exp8_sum(vsub(x, m)));
    }
  }
  for (int a = 0; a < 4; ++a) _mm256_storeu_ps(ln.sv + 8 * a, s[a]);
  return v;
}
#endif  // TT_UNMASK_AVX2

inline float sanitise(float x, int32_t v, int32_t mask) { return v == mask ? -INFINITY : clamp_pos_inf(x); }

template <typename T, bool kSample>
UnmaskState scan_slice(const T* slice, int32_t hi, const SliceScan& sc, bool* has_nan) {
  const int32_t lo = sc.lo;
  Lanes ln;
  // Pass 1: max / argmax (+ the Gumbel-score argmax). lo is a multiple of 4, so every whole chunk starts
  // on a Philox group.
  int32_t v = lo;
#if defined(TT_UNMASK_AVX2)
  v = pass1_simd<T, kSample>(slice, v, hi, sc, ln);
#endif
  for (; v + kLanes <= hi; v += kLanes) {
    float g[kLanes];
    if constexpr (kSample) {
      for (int q = 0; q < kLanes / 4; ++q) {
        const Philox4 w = unmask_noise_words(sc.seed, sc.block, sc.s, (v >> 2) + q);
        for (int t = 0; t < 4; ++t) g[4 * q + t] = gumbel_from_bits(w.w[t]);
      }
    }
    for (int j = 0; j < kLanes; ++j) {
      float x = load_logit(slice, v + j - lo);
      ln.nan |= x != x;
      x = sanitise(x, v + j, sc.mask);
      if (x > ln.mv[j]) {
        ln.mv[j] = x;
        ln.mi[j] = v + j;
      }
      if constexpr (kSample) {
        const float score = gumbel_score(x, sc.temperature, g[j]);
        if (score > ln.gv[j]) {
          ln.gv[j] = score;
          ln.gi[j] = v + j;
        }
      }
    }
  }
  for (; v < hi; ++v) {  // tail in lane 0: its indices exceed every earlier one, so '>' still keeps the first
    float x = load_logit(slice, v - lo);
    ln.nan |= x != x;
    x = sanitise(x, v, sc.mask);
    if (x > ln.mv[0]) {
      ln.mv[0] = x;
      ln.mi[0] = v;
    }
    if constexpr (kSample) {
      const Philox4 w = unmask_noise_words(sc.seed, sc.block, sc.s, v >> 2);
      const float score = gumbel_score(x, sc.temperature, gumbel_from_bits(w.w[v & 3]));
      if (score > ln.gv[0]) {
        ln.gv[0] = score;
        ln.gi[0] = v;
      }
    }
  }
  UnmaskState st = unmask_empty_state();
  reduce_lanes(ln.mv, ln.mi, &st.max, &st.arg);
  if constexpr (kSample) {
    reduce_lanes(ln.gv, ln.gi, &st.gmax, &st.garg);
    if (st.garg >= 0) st.gval = clamp_pos_inf(load_logit(slice, st.garg - lo));
  }
  *has_nan = ln.nan;
  if (st.arg < 0) return st;  // all -inf: the sum stays 0
  // Pass 2: sum of exp(x - slice max); the mask entry maps to -inf and adds exactly 0.
  v = lo;
#if defined(TT_UNMASK_AVX2)
  v = pass2_simd<T>(slice, v, hi, st.max, sc, ln);
#endif
  for (; v + kLanes <= hi; v += kLanes) {
    for (int j = 0; j < kLanes; ++j)
      ln.sv[j] += tt_exp(sanitise(load_logit(slice, v + j - lo), v + j, sc.mask) - st.max);
  }
  for (; v < hi; ++v) ln.sv[0] += tt_exp(sanitise(load_logit(slice, v - lo), v, sc.mask) - st.max);
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += ln.sv[j];
  st.sum = sum;
  return st;
}

template <typename T>
UnmaskState scan_one(const ThresholdUnmaskParams& p, const T* slice, int64_t b, int64_t s, int64_t lo, int64_t hi,
                     bool* has_nan) {
  const SliceScan sc{int32_t(p.mask_id), p.temperature.at(b), uint64_t(p.seed.at(b)), uint64_t(p.block.at(b)), s,
                     int32_t(lo)};
  return sc.temperature > 0.f ? scan_slice<T, true>(slice, int32_t(hi), sc, has_nan)
                              : scan_slice<T, false>(slice, int32_t(hi), sc, has_nan);
}

}  // namespace

UnmaskState threshold_unmask_scan_slice_cpu(const ThresholdUnmaskParams& p, const void* slice, int64_t b, int64_t s,
                                            int64_t lo, int64_t hi, bool* has_nan) {
  return p.dtype == DType::kFloat32 ? scan_one(p, static_cast<const float*>(slice), b, s, lo, hi, has_nan)
                                    : scan_one(p, static_cast<const bf16_t*>(slice), b, s, lo, hi, has_nan);
}

Status threshold_unmask_scan_cpu(const ThresholdUnmaskParams& p, UnmaskState* states, uint8_t* bad,
                                 int64_t item_begin, int64_t item_end) {
  if (p.seq > kUnmaskMaxSeq || p.vocab > INT32_MAX || p.slice_width % 4 != 0) return Status::kUnsupportedShape;
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16) return Status::kUnsupportedDType;
  const int64_t ns = unmask_num_slices(p), elem = p.dtype == DType::kFloat32 ? 4 : 2;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t r = item / ns, slice = item % ns, b = r / p.seq, s = r % p.seq;
    bad[item] = 0;
    if (p.x[b * p.x_batch_stride + s] != p.mask_id) {  // committed position: nothing to read
      states[item] = unmask_empty_state();
      continue;
    }
    const int64_t lo = slice * p.slice_width, hi = lo + p.slice_width < p.vocab ? lo + p.slice_width : p.vocab;
    const int64_t at = b * p.logits_batch_stride + s * p.logits_seq_stride + lo;
    bool has_nan = false;
    states[item] = threshold_unmask_scan_slice_cpu(p, static_cast<const char*>(p.logits) + at * elem, b, s, lo, hi,
                                                   &has_nan);
    bad[item] = has_nan;
  }
  return Status::kOk;
}

Status threshold_unmask_commit_cpu(const ThresholdUnmaskParams& p, const UnmaskState* states, int64_t b_begin,
                                   int64_t b_end) {
  if (p.seq > kUnmaskMaxSeq) return Status::kUnsupportedShape;
  const int64_t ns = unmask_num_slices(p);
  const int32_t S = int32_t(p.seq);
  for (int64_t b = b_begin; b < b_end; ++b) {
    if (unmask_row_errors(p, b) & kUnmaskErrSkipRow) {  // as on CUDA (the binding has raised before this)
      p.counts[b] = -1;
      p.done[b] = false;
      continue;
    }
    int64_t* xr = p.x + b * p.x_batch_stride;
    const bool sample = p.temperature.at(b) > 0.f;
    const float gamma = p.gamma.at(b);
    float conf[kUnmaskMaxSeq], logp[kUnmaskMaxSeq];
    int64_t pred[kUnmaskMaxSeq];
    bool masked[kUnmaskMaxSeq];
    int32_t n = 0, n_above = 0;
    for (int32_t s = 0; s < S; ++s) {
      masked[s] = xr[s] == p.mask_id;
      conf[s] = 0.f;
      if (!masked[s]) continue;
      const UnmaskState* ps = states + (b * S + s) * ns;
      UnmaskState st = ps[0];
      for (int64_t i = 1; i < ns; ++i) st = unmask_merge(st, ps[i]);
      unmask_finalize(st, sample, p.mask_id, &pred[s], &logp[s]);
      conf[s] = tt_exp(logp[s]);
      ++n;
      n_above += conf[s] > gamma;
    }
    const int32_t k = unmask_commit_count(n, n_above, p.step.at(b), p.steps_per_block.at(b));
    const int32_t kept = unmask_kept(p, b);
    int32_t count = 0, left = 0;
    for (int32_t s = 0; s < S; ++s) {
      if (!masked[s]) continue;
      const bool commit = unmask_rank(conf, masked, S, s) < k;
      if (commit) {
        xr[s] = pred[s];
        if (p.logprob != nullptr) p.logprob[b * p.logprob_batch_stride + s] = logp[s];
      }
      count += commit && s < kept;
      left += !commit && s < kept;
    }
    p.counts[b] = count;
    p.done[b] = left == 0;
  }
  return Status::kOk;
}

}  // namespace tt
