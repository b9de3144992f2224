// 8-lane fp32 vectors for the CPU kernels' elementwise work (softmax, SiLU): GCC vector extensions, so the same
// source is AVX2 code here (the kernel objects are compiled for AVX2) and generic code elsewhere; no intrinsics.
// Every operation rounds like its scalar fp32 counterpart (no contraction: the objects use -ffp-contract=off).
#pragma once
#include <cstdint>
#include <cstring>

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

}  // namespace tt
