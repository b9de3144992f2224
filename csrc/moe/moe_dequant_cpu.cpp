// Dequantisation of fp8 / int4 expert weight rows on the CPU (torch-free), for the MoE kernel's tiles (moe.h).
// The contract is python/twotower_ext/quant.py's dequantize, bit for bit: w' = round_to(dt, float(q) * float(scale)),
// one fp32 product rounded once (round to nearest even) to x's dtype; no FMA, no flush of denormals.
//   - fp8 e4m3fn -> fp32 exactly through fp16: the byte's 7 magnitude bits shifted left by 7 are the fp16 with the
//     same mantissa and an exponent 8 lower (bias 15 vs 7, subnormals included), so fp16 -> fp32 (vcvtph2ps)
//     times 2^8 is exact; e4m3fn has no infinities and its NaN is |b| = 0x7F, patched in.
//   - int4: the nibble (even k low) minus 8, as an integer converted to fp32, times its group's scale.
// Paths by the CPU instruction set (the same switch as the GEMM's): AVX-512 16 wide with masked tails (bf16 / fp16 outputs by
// a per-row / per-group table of the results instead, built with that arithmetic), AVX2 + F16C 8 wide with the
// scalar tail (int4 to bf16 / fp16 by table too), scalar.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half_cpu.h"
#include "common/simd_cpu.h"
#include "moe/moe.h"

namespace tt {
namespace {

// What a dequantised row is stored as: x's dtype, or fp32 holding x's dtype's values (the library path).
enum class Out { kF32, kBF16, kF16, kF32RoundBF16, kF32RoundF16 };

constexpr int64_t out_bytes(Out o) { return o == Out::kBF16 || o == Out::kF16 ? 2 : 4; }

float scale_value(DType dt, const void* s, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(s)[i];
    case DType::kBFloat16: return to_float(static_cast<const bf16_t*>(s)[i]);
    case DType::kFloat16: return to_float(static_cast<const fp16_t*>(s)[i]);
  }
  return NAN;
}

// ---------------------------------------------------------------------------------------------------
// Scalar

inline float fp8_value(uint8_t b) {
  if ((b & 0x7F) == 0x7F) return NAN;
  return to_float(fp16_t{uint16_t((b & 0x7F) << 7 | (b & 0x80) << 8)}) * 256.f;
}

inline float int4_value(const uint8_t* d, int64_t k) { return float(int((d[k >> 1] >> ((k & 1) * 4)) & 0xF) - 8); }

template <Out O> inline void store1(void* dst, int64_t i, float v) {
  if constexpr (O == Out::kF32) static_cast<float*>(dst)[i] = v;
  else if constexpr (O == Out::kBF16) static_cast<bf16_t*>(dst)[i] = from_float<bf16_t>(v);
  else if constexpr (O == Out::kF16) static_cast<fp16_t*>(dst)[i] = from_float<fp16_t>(v);
  else if constexpr (O == Out::kF32RoundBF16) static_cast<float*>(dst)[i] = to_float(from_float<bf16_t>(v));
  else static_cast<float*>(dst)[i] = to_float(from_float<fp16_t>(v));
}

// Elements [k0, k1) of one row; for int4 all of them in one group of scale s.
template <Out O> void fp8_scalar(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {
  for (int64_t k = k0; k < k1; ++k) store1<O>(dst, k, fp8_value(d[k]) * s);
}

template <Out O> void int4_scalar(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {
  for (int64_t k = k0; k < k1; ++k) store1<O>(dst, k, int4_value(d, k) * s);
}

#ifdef TT_X86
// ---------------------------------------------------------------------------------------------------
// AVX2 + F16C (the objects' baseline, no attributes needed)

inline __m256 fp8x8_avx2(const uint8_t* p) {
  const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i mag = _mm_and_si128(w, _mm_set1_epi16(0x7F));
  const __m128i h = _mm_or_si128(_mm_slli_epi16(mag, 7), _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
  const __m256 f = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
  const __m256 nan = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7F))));
  return _mm256_blendv_ps(f, _mm256_set1_ps(NAN), nan);
}

inline __m256 int4x8_avx2(const uint8_t* p) {  // 8 elements from 4 bytes
  int32_t v;
  std::memcpy(&v, p, 4);
  const __m128i b = _mm_cvtsi32_si128(v), m = _mm_set1_epi8(0x0F);
  const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), _mm256_set1_epi32(8)));
}

constexpr int kRneF16 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// 8 fp32 values rounded to a 16-bit output dtype (bf16 / fp16 bits).
template <Out O> inline __m128i round16_avx2(__m256 v) {
  if constexpr (O == Out::kBF16) return narrow16_avx2(bf16_rne_avx2(v));
  else return _mm256_cvtps_ph(v, kRneF16);
}

template <Out O> inline void store8_avx2(void* dst, int64_t k, __m256 v) {
  if constexpr (O == Out::kF32) {
    _mm256_storeu_ps(static_cast<float*>(dst) + k, v);
  } else if constexpr (O == Out::kBF16 || O == Out::kF16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(dst) + k), round16_avx2<O>(v));
  } else if constexpr (O == Out::kF32RoundBF16) {
    _mm256_storeu_ps(static_cast<float*>(dst) + k, _mm256_castsi256_ps(_mm256_slli_epi32(bf16_rne_avx2(v), 16)));
  } else {
    _mm256_storeu_ps(static_cast<float*>(dst) + k, _mm256_cvtph_ps(_mm256_cvtps_ph(v, kRneF16)));
  }
}

template <Out O> void fp8_avx2(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) store8_avx2<O>(dst, k, _mm256_mul_ps(fp8x8_avx2(d + k), sv));
  fp8_scalar<O>(d, s, k, k1, dst);
}

template <Out O> void int4_avx2(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {  // k0 even
  const __m256 sv = _mm256_set1_ps(s);
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) store8_avx2<O>(dst, k, _mm256_mul_ps(int4x8_avx2(d + k / 2), sv));
  int4_scalar<O>(d, s, k, k1, dst);
}

// int4 to 16-bit outputs by table lookup (see the AVX-512 versions below): the group's 16 results split into a
// low-byte and a high-byte table, each looked up with vpshufb by the nibbles, then interleaved back into words.
template <Out O> void int4_lut_avx2(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {  // k0 even
  const __m256 sv = _mm256_set1_ps(s);
  const __m128i w0 = round16_avx2<O>(_mm256_mul_ps(_mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), sv));
  const __m128i w1 = round16_avx2<O>(_mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), sv));
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i tlo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(_mm_shuffle_epi8(w0, even), _mm_shuffle_epi8(w1, even)));
  const __m256i thi = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(_mm_shuffle_epi8(w0, odd), _mm_shuffle_epi8(w1, odd)));
  const __m128i nib = _mm_set1_epi8(0x0F);
  uint16_t* out = static_cast<uint16_t*>(dst);
  int64_t k = k0;
  for (; k + 32 <= k1; k += 32) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + k / 2));
    const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
    const __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));  // k order
    const __m256i L = _mm256_shuffle_epi8(tlo, idx), H = _mm256_shuffle_epi8(thi, idx);
    const __m256i a = _mm256_unpacklo_epi8(L, H), c = _mm256_unpackhi_epi8(L, H);  // words 0-7 | 16-23, 8-15 | 24-31
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_permute2x128_si256(a, c, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k + 16), _mm256_permute2x128_si256(a, c, 0x31));
  }
  int4_scalar<O>(d, s, k, k1, dst);
}

// ---------------------------------------------------------------------------------------------------
// AVX-512 (16 wide, masked tails)

TT_AVX512 inline __m512 fp8x16_avx512(const uint8_t* p, __mmask16 m) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p));
  const __m256i mag = _mm256_and_si256(w, _mm256_set1_epi16(0x7F));
  const __m256i h = _mm256_or_si256(_mm256_slli_epi16(mag, 7),
                                    _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
  const __m512 f = _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
  return _mm512_mask_mov_ps(f, _mm256_cmpeq_epi16_mask(mag, _mm256_set1_epi16(0x7F)), _mm512_set1_ps(NAN));
}

TT_AVX512 inline __m512 int4x16_avx512(const uint8_t* p, __mmask16 bytes) {  // 16 elements from 8 bytes
  const __m128i b = _mm_maskz_loadu_epi8(bytes, p), m = _mm_set1_epi8(0x0F);
  const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(nib), _mm512_set1_epi32(8)));
}

// 16 fp32 values rounded to a 16-bit output dtype (bf16 / fp16 bits).
template <Out O> TT_AVX512 inline __m256i round16_avx512(__m512 v) {
  if constexpr (O == Out::kBF16) return _mm512_cvtepi32_epi16(bf16_rne_avx512(v));
  else return _mm512_cvtps_ph(v, kRneF16);
}

template <Out O> TT_AVX512 inline void store16_avx512(void* dst, int64_t k, __m512 v, __mmask16 m) {
  if constexpr (O == Out::kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(dst) + k, m, v);
  } else if constexpr (O == Out::kBF16 || O == Out::kF16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst) + k, m, round16_avx512<O>(v));
  } else if constexpr (O == Out::kF32RoundBF16) {
    _mm512_mask_storeu_ps(static_cast<float*>(dst) + k, m,
                          _mm512_castsi512_ps(_mm512_slli_epi32(bf16_rne_avx512(v), 16)));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(dst) + k, m, _mm512_cvtph_ps(_mm512_cvtps_ph(v, kRneF16)));
  }
}

template <Out O> TT_AVX512 void fp8_avx512(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t k = k0; k < k1; k += 16) {
    const __mmask16 m = mask16(k1 - k);
    store16_avx512<O>(dst, k, _mm512_mul_ps(fp8x16_avx512(d + k, m), sv), m);
  }
}

template <Out O> TT_AVX512 void int4_avx512(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {  // k0 even
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t k = k0; k < k1; k += 16) {
    const int64_t n = std::min<int64_t>(16, k1 - k);
    const __mmask16 m = mask16(n);
    store16_avx512<O>(dst, k, _mm512_mul_ps(int4x16_avx512(d + k / 2, mask16((n + 1) / 2)), sv), m);
  }
}

// 16-bit outputs by table lookup (about 3x fewer instructions per weight than the arithmetic above, which is the
// whole cost of a T = 1 pass): one scale covers a row (fp8) or a group (int4), so each distinct stored value has
// one result, computed once with the arithmetic above (the same bits) and looked up by the stored value.
inline __mmask32 mask32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1); }

// fp8: a 128-entry table of the magnitudes' results (4 x 32 words, two vpermt2w for 64 entries each); the sign
// bit is applied by xor (float(-q) * s = -(float(q) * s) exactly, and round to nearest even is symmetric).
template <Out O> TT_AVX512 void fp8_lut_avx512(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {
  alignas(64) uint16_t tab[128];
  const __m512 sv = _mm512_set1_ps(s);
  for (int j = 0; j < 128; j += 16) {
    const __m128i b = _mm_add_epi8(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                   _mm_set1_epi8(char(j)));
    alignas(16) uint8_t bytes[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes), b);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tab + j), round16_avx512<O>(_mm512_mul_ps(fp8x16_avx512(bytes, 0xFFFF), sv)));
  }
  const __m512i t0 = _mm512_load_si512(tab), t1 = _mm512_load_si512(tab + 32), t2 = _mm512_load_si512(tab + 64),
                t3 = _mm512_load_si512(tab + 96);
  for (int64_t k = k0; k < k1; k += 32) {
    const __mmask32 m = mask32(k1 - k);
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(m, d + k));
    const __m512i lo = _mm512_permutex2var_epi16(t0, b, t1), hi = _mm512_permutex2var_epi16(t2, b, t3);
    const __m512i r = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(b, _mm512_set1_epi16(0x40)), lo, hi);
    const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8);
    _mm512_mask_storeu_epi16(static_cast<uint16_t*>(dst) + k, m, _mm512_xor_si512(r, sign));
  }
}

// int4: the group's 16 results (nibble n -> float(n - 8) * s), one vpermw per 32 weights.
template <Out O> TT_AVX512 void int4_lut_avx512(const uint8_t* d, float s, int64_t k0, int64_t k1, void* dst) {  // k0 even
  const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i t = _mm512_castsi256_si512(round16_avx512<O>(_mm512_mul_ps(q, _mm512_set1_ps(s))));
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t k = k0; k < k1; k += 32) {
    const int64_t n = std::min<int64_t>(32, k1 - k);
    const __m128i b = _mm_maskz_loadu_epi8(mask16((n + 1) / 2), d + k / 2);
    const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
    const __m512i idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)));
    _mm512_mask_storeu_epi16(static_cast<uint16_t*>(dst) + k, mask32(n), _mm512_permutexvar_epi16(idx, t));
  }
}
#endif  // TT_X86

// ---------------------------------------------------------------------------------------------------
// Rows: per row, fp8 has one scale; int4 one per group of `group` k (group even, so each group starts on a byte).

using SpanFn = void (*)(const uint8_t*, float, int64_t, int64_t, void*);

template <Out O> void dequant_rows(MoeCpuIsa isa, const MoeQuantRows& q, void* dst) {
  const bool fp8 = q.format == MoeWeightFormat::kFp8;
  SpanFn fn = fp8 ? &fp8_scalar<O> : &int4_scalar<O>;
#ifdef TT_X86
  if (isa == MoeCpuIsa::kAvx512 || isa == MoeCpuIsa::kAvx512Bf16) {
    if constexpr (O == Out::kBF16 || O == Out::kF16) fn = fp8 ? &fp8_lut_avx512<O> : &int4_lut_avx512<O>;
    else fn = fp8 ? &fp8_avx512<O> : &int4_avx512<O>;
  }
  else if (isa == MoeCpuIsa::kAvx2) {
    if constexpr (O == Out::kBF16 || O == Out::kF16) fn = fp8 ? &fp8_avx2<O> : &int4_lut_avx2<O>;
    else fn = fp8 ? &fp8_avx2<O> : &int4_avx2<O>;
  }
#else
  (void)isa;
#endif
  const int64_t K = q.k, groups = fp8 ? 1 : (K + q.group - 1) / q.group, gk = fp8 ? K : q.group;
  for (int64_t r = 0; r < q.rows; ++r) {
    const uint8_t* d = q.data + r * q.ld;
    void* out = static_cast<char*>(dst) + r * K * out_bytes(O);
    for (int64_t g = 0; g < groups; ++g)
      fn(d, scale_value(q.scale_dtype, q.scale, r * groups + g), g * gk, std::min(K, (g + 1) * gk), out);
  }
}

}  // namespace

void moe_dequant_rows(MoeCpuIsa isa, const MoeQuantRows& q, DType dt, bool wide, void* dst) {
  switch (dt) {
    case DType::kFloat32: return dequant_rows<Out::kF32>(isa, q, dst);
    case DType::kBFloat16:
      return wide ? dequant_rows<Out::kF32RoundBF16>(isa, q, dst) : dequant_rows<Out::kBF16>(isa, q, dst);
    case DType::kFloat16:
      return wide ? dequant_rows<Out::kF32RoundF16>(isa, q, dst) : dequant_rows<Out::kF16>(isa, q, dst);
  }
}

int64_t moe_weight_bytes(const MoeParams& p, int64_t n, int64_t k) {
  switch (p.format) {
    case MoeWeightFormat::kDense: return n * k * (p.dtype == DType::kFloat32 ? 4 : 2);
    case MoeWeightFormat::kFp8: return n * k + n * 4;
    case MoeWeightFormat::kInt4: return n * ((k + 1) / 2) + n * ((k + p.group - 1) / p.group) * 2;
  }
  return 0;
}

}  // namespace tt
