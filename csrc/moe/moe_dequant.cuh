// Device dequantisation of the quantised expert weights (python/twotower_ext/quant.py is the reference):
// w' = round_to_T(float(q) * float(scale)), bit for bit, on sm_80 and later (no native fp8 needed).
//
// Exactness notes (the build uses --use_fast_math, i.e. flush-to-zero fp32 arithmetic):
// - The fp32 products use mul.rn.f32 without .ftz (mul_rn), so a tiny product rounds like PyTorch's instead of
//   flushing to 0; they are never contracted into an FMA (nothing is added to them).
// - fp8 e4m3fn -> fp16 by bits: sign << 15 | (b & 0x7F) << 7 is the e4m3 value times 2^-8 exactly (normals and
//   subnormals alike: e4m3's 4-bit exponent field lands in fp16's 5-bit one with the bias 15 - 7 = 8 absorbed),
//   fp16 -> fp32 is exact, and the 2^8 is folded into the scale (s * 256 is exact, and (v / 256) * (256 s) is
//   the same real product, so it rounds to the same fp32). The NaN codes 0x7F / 0xFF become fp16 NaNs.
// - int4 with a scale of T's own type (bf16 x with bf16 scales, fp16 with fp16): q * s has at most 3 + 11
//   significant bits, so the fp32 product is exact and rounding it to T equals one correctly rounded T multiply
//   (fma.rn with -0 as the addend); q itself comes from the magic-number trick (T(M + n) - (M + 8), exact).
//   Mixed scale / x types go through fp32 like fp8.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "block_attention/block_attention_ptx.cuh"  // pack2
#include "common/half_cuda.cuh"

namespace tt {

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Two fp8 e4m3fn codes (bytes 0 and 1 of `lo16`'s low half-word pair, see fp8x4_to_half2) as fp16 values / 256.
// Four codes w = b0 | b1 << 8 | b2 << 16 | b3 << 24 -> (h(b0), h(b1)) and (h(b2), h(b3)), low half first.
__device__ __forceinline__ void fp8x4_to_half2(uint32_t w, uint32_t& h01, uint32_t& h23) {
  // Byte i of w into the high byte of a 16-bit lane: sign at bit 15, magnitude at bits 8..14 (>> 1: 7..13).
  const uint32_t v01 = __byte_perm(w, 0u, 0x1404), v23 = __byte_perm(w, 0u, 0x3424);
  // NaN codes (magnitude 0x7F): exponent bits all set, mantissa non-zero.
  const uint32_t nan = __vcmpeq4(w & 0x7F7F7F7Fu, 0x7F7F7F7Fu);
  const uint32_t n01 = __byte_perm(nan, 0u, 0x1404) & 0x7E007E00u, n23 = __byte_perm(nan, 0u, 0x3424) & 0x7E007E00u;
  h01 = (v01 & 0x80008000u) | ((v01 & 0x7F007F00u) >> 1) | n01;
  h23 = (v23 & 0x80008000u) | ((v23 & 0x7F007F00u) >> 1) | n23;
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t h) {
  __half2 v;
  *reinterpret_cast<uint32_t*>(&v) = h;
  return __half22float2(v);
}

// One fp8 code as the exact float value / 256 (the scalar form of fp8x4_to_half2, for the SIMT kernel).
__device__ __forceinline__ float fp8_to_float_div256(uint32_t b) {
  uint32_t h01, h23;
  fp8x4_to_half2(b & 0xFFu, h01, h23);
  return half2_bits_to_float2(h01).x;
}

// Eight fp8 codes (k order, byte i = element i) with the row's scale * 256 -> eight T values (16 bytes, k order).
template <typename T>
__device__ __forceinline__ uint4 dequant_fp8x8(uint2 raw, float scale256) {
  uint32_t h[4];
  fp8x4_to_half2(raw.x, h[0], h[1]);
  fp8x4_to_half2(raw.y, h[2], h[3]);
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = half2_bits_to_float2(h[i]);
    o[i] = pack2<T>(mul_rn(f.x, scale256), mul_rn(f.y, scale256));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// The int4 code n (0..15, stored q + 8) as the float q = n - 8 (exact: 2^23 + n - (2^23 + 8)).
__device__ __forceinline__ float int4_to_float(uint32_t n) { return __uint_as_float(0x4B000000u | n) - 8388616.f; }

// 16-bit scale bits of type S as float.
template <typename S>
__device__ __forceinline__ float scale_bits_to_float(uint16_t bits) {
  S s;
  *reinterpret_cast<uint16_t*>(&s) = bits;
  return to_float(s);
}

// d = a * b + c per 16-bit lane, one rounding (fma.rn: never re-associated or fused further).
template <typename T>
__device__ __forceinline__ uint32_t fma2_rn(uint32_t a, uint32_t b, uint32_t c);
template <>
__device__ __forceinline__ uint32_t fma2_rn<__nv_bfloat16>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
template <>
__device__ __forceinline__ uint32_t fma2_rn<__half>(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Eight int4 codes (4 bytes, k order: element 2i in byte i's low nibble) sharing one scale (16-bit bits of S)
// -> eight T values (16 bytes, k order).
template <typename T, typename S>
__device__ __forceinline__ uint4 dequant_int4x8(uint32_t raw, uint16_t scale_bits) {
  uint32_t o[4];
  if constexpr (std::is_same_v<T, S>) {
    // Magic M: 128 (bf16) / 1024 (fp16), where the 16-bit type's ulp is 1, so the bits M | n are the value M + n.
    constexpr bool kBf = std::is_same_v<T, __nv_bfloat16>;
    constexpr uint32_t kMagic = kBf ? 0x43004300u : 0x64006400u;      // M, M
    constexpr uint32_t kOne = kBf ? 0x3F803F80u : 0x3C003C00u;        // 1, 1
    constexpr uint32_t kNegBias = kBf ? 0xC308C308u : 0xE408E408u;    // -(M + 8): -136 / -1032
    constexpr uint32_t kNegZero = 0x80008000u;
    const uint32_t s2 = uint32_t(scale_bits) * 0x10001u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = raw >> (8 * i);  // element 2i in bits 0..3, 2i + 1 in bits 4..7
      const uint32_t m = (byte & 0xFu) | ((byte << 12) & 0xF0000u) | kMagic;
      const uint32_t q = fma2_rn<T>(m, kOne, kNegBias);  // n - 8, exact
      o[i] = fma2_rn<T>(q, s2, kNegZero);                // round_T(q * s): the one rounding of the exact product
    }
  } else {
    const float s = scale_bits_to_float<S>(scale_bits);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = raw >> (8 * i);
      o[i] = pack2<T>(mul_rn(int4_to_float(byte & 0xFu), s), mul_rn(int4_to_float((byte >> 4) & 0xFu), s));
    }
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

}  // namespace tt
