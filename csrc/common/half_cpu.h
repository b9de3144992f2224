// Host-side bf16 / fp16 <-> fp32 conversions (round to nearest even), torch-free. bf16 and fp16 are
// carried as raw uint16_t bits so the CPU kernels need no framework type.
#pragma once
#include <cstdint>
#include <cstring>

namespace tt {

struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };

inline float to_float(float x) { return x; }

inline float to_float(bf16_t x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(fp16_t x) {
  const uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);            // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);    // normal
  } else if (man == 0) {
    u = sign;                                        // zero
  } else {                                           // subnormal: renormalise
    int e = -1;
    uint32_t m = man;
    do { m <<= 1; ++e; } while (!(m & 0x400u));
    u = sign | uint32_t(112 - e) << 23 | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T from_float(float f);

template <> inline float from_float<float>(float f) { return f; }

template <> inline bf16_t from_float<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

template <> inline fp16_t from_float<fp16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};        // nan
  if (u >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};       // overflow -> inf
  if (u < 0x38800000u) {                                               // subnormal or zero
    float a;
    std::memcpy(&a, &u, 4);
    // Adding 0.5 aligns the fp16 subnormal grid with the fp32 mantissa; the FPU rounds to nearest even.
    float t = a + 0.5f;
    uint32_t tu;
    std::memcpy(&tu, &t, 4);
    return fp16_t{uint16_t(sign | (tu - 0x3f000000u))};
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;                                              // rebias exponent, round
  return fp16_t{uint16_t(sign | (u >> 13))};
}

}  // namespace tt
