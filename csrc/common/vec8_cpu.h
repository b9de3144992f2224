// 8-lane fp32 vectors for the CPU kernels' elementwise work (softmax, SiLU, norms): GCC vector extensions, so the
// same source is AVX2 code here (the kernel objects are compiled for AVX2) and generic code elsewhere; intrinsics
// only for fp16 <-> fp32 (F16C). Every operation rounds like its scalar fp32 counterpart (no contraction: the
// objects use -ffp-contract=off).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_isa.h"
#include "common/half_cpu.h"

namespace tt {

constexpr int kLanes8 = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x8 splat8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }
inline f32x8 load8(const float* p) { f32x8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// exp(x): Cephes-style range reduction + degree-6 polynomial, ~2 ulp; exactly 0 below -87 (also for -inf), where
// expf is subnormal or 0 anyway, and exp(88) above 88 (so x > 88 gives a large finite value, not inf). NaN stays NaN.
inline f32x8 exp8(f32x8 x) {
  const i32x8 under = x < splat8(-87.f);
  x = under ? splat8(-87.f) : x;
  x = x > splat8(88.f) ? splat8(88.f) : x;
  const f32x8 shifter = splat8(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const f32x8 t = x * splat8(1.44269504088896341f) + shifter;
  const f32x8 n = t - shifter;
  f32x8 r = x - n * splat8(0.693359375f);
  r = r - n * splat8(-2.12194440e-4f);
  f32x8 y = splat8(1.9875691500e-4f);
  y = y * r + splat8(1.3981999507e-3f);
  y = y * r + splat8(8.3334519073e-3f);
  y = y * r + splat8(4.1665795894e-2f);
  y = y * r + splat8(1.6666665459e-1f);
  y = y * r + splat8(5.0000001201e-1f);
  y = y * (r * r) + r + splat8(1.f);
  const i32x8 ni = __builtin_bit_cast(i32x8, t) - __builtin_bit_cast(i32x8, shifter);
  const f32x8 pow2 = __builtin_bit_cast(f32x8, (ni + 127) << 23);
  const f32x8 e = y * pow2;
  return under ? splat8(0.f) : e;
}

// v rounded to bf16 (round to nearest even, NaN quietened: half_cpu.h's from_float) into dst[0..8).
inline void store_bf16x8(uint16_t* dst, f32x8 v) {
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  const u32x8 u = __builtin_bit_cast(u32x8, v), hi = u >> 16;
  const u32x8 r = v != v ? (hi | 0x40u) : (u + 0x7fffu + (hi & 1u)) >> 16;
  const u16x8 h = __builtin_convertvector(r, u16x8);
  std::memcpy(dst, &h, sizeof h);
}

// 8 elements of a T row widened to fp32 (exact).
template <typename T> inline f32x8 widen8(const T* src);
template <> inline f32x8 widen8<float>(const float* src) { return load8(src); }
template <> inline f32x8 widen8<bf16_t>(const bf16_t* src) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 h;
  std::memcpy(&h, src, sizeof h);
  return __builtin_bit_cast(f32x8, __builtin_convertvector(h, u32x8) << 16);
}
template <> inline f32x8 widen8<fp16_t>(const fp16_t* src) {
#ifdef TT_X86
  return __builtin_bit_cast(f32x8, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
#else
  f32x8 v;
  for (int i = 0; i < kLanes8; ++i) v[i] = to_float(src[i]);
  return v;
#endif
}

// v rounded to T (round to nearest even, like from_float), back in fp32.
template <typename T> inline f32x8 round8(f32x8 v);
template <> inline f32x8 round8<float>(f32x8 v) { return v; }
template <> inline f32x8 round8<bf16_t>(f32x8 v) {
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  const u32x8 u = __builtin_bit_cast(u32x8, v);
  const u32x8 r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return v != v ? v : __builtin_bit_cast(f32x8, r);  // NaN stays NaN (the carry could reach the sign)
}
template <> inline f32x8 round8<fp16_t>(f32x8 v) {
#ifdef TT_X86
  const __m256 x = __builtin_bit_cast(__m256, v);
  return __builtin_bit_cast(f32x8, _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)));
#else
  for (int i = 0; i < kLanes8; ++i) v[i] = to_float(from_float<fp16_t>(v[i]));
  return v;
#endif
}

// The first n (<= 8) elements of a T row widened, the other lanes 0; and v's first n lanes stored as T (rounded).
template <typename T> inline f32x8 widen8_n(const T* src, int64_t n) {
  if (n >= kLanes8) return widen8<T>(src);
  T tmp[kLanes8] = {};
  std::copy(src, src + n, tmp);
  return widen8<T>(tmp);
}
template <typename T> inline void narrow8(T* dst, f32x8 v);
template <> inline void narrow8<float>(float* dst, f32x8 v) { store8(dst, v); }
template <> inline void narrow8<bf16_t>(bf16_t* dst, f32x8 v) { store_bf16x8(reinterpret_cast<uint16_t*>(dst), v); }
template <> inline void narrow8<fp16_t>(fp16_t* dst, f32x8 v) {
#ifdef TT_X86
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm256_cvtps_ph(__builtin_bit_cast(__m256, v), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kLanes8; ++i) dst[i] = from_float<fp16_t>(v[i]);
#endif
}
template <typename T> inline void narrow8_n(T* dst, f32x8 v, int64_t n) {
  if (n >= kLanes8) return narrow8<T>(dst, v);
  T tmp[kLanes8];
  narrow8<T>(tmp, v);
  std::copy(tmp, tmp + n, dst);
}

// Sum of the 8 lanes, as a tree (k + k+4, k + k+2, k + k+1).
inline float hsum8(f32x8 v) {
  const float a0 = v[0] + v[4], a1 = v[1] + v[5], a2 = v[2] + v[6], a3 = v[3] + v[7];
  return (a0 + a2) + (a1 + a3);
}

// x / (1 + exp(-x)) (exp8 saturates at exp(88): a SiLU of x < -88 is a tiny negative number, not -0).
inline f32x8 silu8(f32x8 x) { return x / (splat8(1.f) + exp8(-x)); }

}  // namespace tt
