// Vector helpers shared by the x86 CPU kernels (torch-free): fp32 -> bf16 rounding and tail masks. AVX2 ones need
// no attribute (the objects' baseline); AVX-512 ones carry TT_AVX512 (common/cpu_isa.h).
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"

#ifdef TT_X86
namespace tt {

// fp32 -> bf16 bits in the low half of each lane, round to nearest even, NaN quietened (half_cpu.h's rule).
inline __m256i bf16_rne_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(hi, _mm256_set1_epi32(1)))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}

inline __m128i narrow16_avx2(__m256i r) {  // the low 16 bits of 8 lanes (each < 2^16)
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

TT_AVX512 inline __m512i bf16_rne_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(hi, _mm512_set1_epi32(1)))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

}  // namespace tt
#endif  // TT_X86
