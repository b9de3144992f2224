// The MoE kernel's inner GEMM on the CPU (torch-free): C[m, n] = sum_k A[row(m), k] * B[n, k], fp32
// accumulate, for the few rows (tokens routed to one expert) of a decode or denoiser pass.
//
// Why a microkernel of our own: at M <= 16 the matrix library is far from the memory bound (1 thread, the AMD
// EPYC of earlier sessions: MKL sgemm [16 x 2688] @ [2688 x 1856] read the weights at 2.7 GB/s against a
// 10.6 GB/s pure read), and bf16 weights first have to be widened into an fp32 copy (on the Xeon: 2.5x slower
// than this kernel at M = 16, see moe_micro_max_rows; bench/bench_moe.py has the whole-layer numbers).
// This kernel streams each weight row once per call straight from memory in its own dtype: B (the weights,
// rows contiguous in k) is never repacked; an MR x NR block of dot products lives in registers (one vector
// accumulator per (m, n), reduced horizontally at the end of k), so each loaded weight vector feeds MR FMAs
// and each activation vector NR. Paths, chosen at run time from cpuid (the object is compiled for AVX2 +
// FMA + F16C; the AVX-512 functions carry target attributes):
//   - avx512_bf16 (bf16 only): vdpbf16ps, 32 bf16 products per instruction, no widening at all. The products
//     of two bf16 values are exact in fp32; the instruction flushes denormal inputs/outputs (bf16 denormals
//     are < 1.2e-38) and sums each pair before accumulating, which is within fp32 rounding of the plain sum.
//   - avx512 (fp32, bf16, fp16): 16-wide fp32 FMA, bf16 widened by a shift, fp16 by vcvtph2ps, in registers.
//   - avx2 (fp32, bf16, fp16): the same 8 wide (the AMD EPYC CI machines: no AVX-512).
//   - scalar: other architectures.
// Each k step also prefetches (into L2) the same k of the next NR weight rows, one column block ahead, one prefetch
// per cache line: with short rows (an expert of the width-1/8 model is 320 x 232: 10 cache lines a bf16 row) the
// hardware streamer barely starts on one before the block moves on. Measured on the Xeon, 1 thread, 32 real-size
// experts from DRAM, T=1: bf16 9.3-9.5 ms (no prefetch) -> 8.0-8.1. With fp32 weights it cost ~5% at the real size
// (10.5 KB rows), so fp32 prefetches only rows up to kPrefetchF32MaxRowBytes: the width-1/8 model's fp32 experts
// (1-1.3 KB rows), the 23 MoE calls of a denoiser pass replayed from memory, 59.0-60.4 -> 51.5-53.1 ms at 1 thread,
// 34.2-34.4 -> 29.4-30.2 at 2; the AVX2 kernel (forced on the Xeon) 64.7-66.8 -> 51.4-51.6 and 38.0-38.4 -> 29.7-30.7.
// For many rows per expert the matrix library (MKL sgemm, oneDNN brgemm) is faster: it packs panels and runs
// a compute-bound blocking that this streaming kernel does not; moe_micro_max_rows says where the switch is.
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "common/cpu_isa.h"
#include "common/half_cpu.h"
#include "moe/moe.h"

namespace tt {
namespace {

constexpr int64_t kPrefetchF32MaxRowBytes = 4096;

// Full unrolling of the MR / NR loops before scalar replacement: without it GCC keeps the accumulator array
// on the stack (a store per FMA and ~1.5x slower at M = 16).
#define TT_UNROLL _Pragma("GCC unroll 8")

struct F32 { using raw = float; };
struct BF16 { using raw = uint16_t; };
struct F16 { using raw = uint16_t; };

template <class Tag> inline float scalar_widen(typename Tag::raw v) {
  if constexpr (std::is_same_v<Tag, F32>) return v;
  else if constexpr (std::is_same_v<Tag, BF16>) return to_float(bf16_t{v});
  else return to_float(fp16_t{v});
}

// The k tail [k0, K) of one dot product, in order (used by the AVX2 and scalar paths).
template <class Tag>
inline float dot_tail(const typename Tag::raw* a, const typename Tag::raw* b, int64_t k0, int64_t K) {
  float s = 0.f;
  for (int64_t k = k0; k < K; ++k) s += scalar_widen<Tag>(a[k]) * scalar_widen<Tag>(b[k]);
  return s;
}

template <class Tag, int MR, int NR>
void kernel_scalar(int64_t K, const typename Tag::raw* const* a, const typename Tag::raw* b, int64_t ldb, float* c,
                   int64_t ldc, bool) {
  TT_UNROLL for (int m = 0; m < MR; ++m)
    TT_UNROLL for (int n = 0; n < NR; ++n) c[m * ldc + n] = dot_tail<Tag>(a[m], b + n * ldb, 0, K);
}

#ifdef TT_X86
// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA: 16 ymm registers hold MR*NR accumulators + NR weight vectors + 1 activation vector.

template <class Tag> inline __m256 load8(const typename Tag::raw* p) {
  if constexpr (std::is_same_v<Tag, F32>) return _mm256_loadu_ps(p);
  else if constexpr (std::is_same_v<Tag, BF16>)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  else return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <class Tag, int MR, int NR>
void kernel_avx2(int64_t K, const typename Tag::raw* const* a, const typename Tag::raw* b, int64_t ldb, float* c,
                 int64_t ldc, bool pf) {
  __m256 acc[MR][NR];
  TT_UNROLL for (int m = 0; m < MR; ++m)
    TT_UNROLL for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 bv[NR];
    TT_UNROLL for (int n = 0; n < NR; ++n) bv[n] = load8<Tag>(b + n * ldb + k);
    if (pf && (k * sizeof(*b)) % 64 == 0)  // one prefetch per line
      TT_UNROLL for (int n = 0; n < NR; ++n) _mm_prefetch(reinterpret_cast<const char*>(b + (NR + n) * ldb + k), _MM_HINT_T1);
    TT_UNROLL for (int m = 0; m < MR; ++m) {
      const __m256 av = load8<Tag>(a[m] + k);
      TT_UNROLL for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(av, bv[n], acc[m][n]);
    }
  }
  TT_UNROLL for (int m = 0; m < MR; ++m)
    TT_UNROLL for (int n = 0; n < NR; ++n) c[m * ldc + n] = hsum8(acc[m][n]) + dot_tail<Tag>(a[m], b + n * ldb, k, K);
}

// ---------------------------------------------------------------------------------------------------
// AVX-512: 32 zmm registers; k tails by masked loads.

template <class Tag> TT_AVX512 inline __m512 load16(const typename Tag::raw* p, __mmask16 mask) {
  if constexpr (std::is_same_v<Tag, F32>) return _mm512_maskz_loadu_ps(mask, p);
  else if constexpr (std::is_same_v<Tag, BF16>)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
  else return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

template <class Tag, int MR, int NR>
TT_AVX512 void kernel_avx512(int64_t K, const typename Tag::raw* const* a, const typename Tag::raw* b, int64_t ldb,
                             float* c, int64_t ldc, bool pf) {
  __m512 acc[MR][NR];
  TT_UNROLL for (int m = 0; m < MR; ++m)
    TT_UNROLL for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    __m512 bv[NR];
    TT_UNROLL for (int n = 0; n < NR; ++n) bv[n] = load16<Tag>(b + n * ldb + k, mask);
    if (pf && (k * sizeof(*b)) % 64 == 0)  // one prefetch per line
      TT_UNROLL for (int n = 0; n < NR; ++n) _mm_prefetch(reinterpret_cast<const char*>(b + (NR + n) * ldb + k), _MM_HINT_T1);
    TT_UNROLL for (int m = 0; m < MR; ++m) {
      const __m512 av = load16<Tag>(a[m] + k, mask);
      TT_UNROLL for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(av, bv[n], acc[m][n]);
    }
  }
  TT_UNROLL for (int m = 0; m < MR; ++m)
    TT_UNROLL for (int n = 0; n < NR; ++n) c[m * ldc + n] = _mm512_reduce_add_ps(acc[m][n]);
}

template <class Tag, int MR, int NR>
TT_AVX512BF16 void kernel_avx512bf16(int64_t K, const uint16_t* const* a, const uint16_t* b, int64_t ldb, float* c,
                                     int64_t ldc, bool) {
  __m512 acc[MR][NR];
  TT_UNROLL for (int m = 0; m < MR; ++m)
    TT_UNROLL for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (K - k)) - 1);
    __m512i bv[NR];
    TT_UNROLL for (int n = 0; n < NR; ++n) bv[n] = _mm512_maskz_loadu_epi16(mask, b + n * ldb + k);
    TT_UNROLL for (int n = 0; n < NR; ++n) _mm_prefetch(reinterpret_cast<const char*>(b + (NR + n) * ldb + k), _MM_HINT_T1);
    TT_UNROLL for (int m = 0; m < MR; ++m) {
      const __m512i av = _mm512_maskz_loadu_epi16(mask, a[m] + k);
      TT_UNROLL for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], (__m512bh)av, (__m512bh)bv[n]);
    }
  }
  TT_UNROLL for (int m = 0; m < MR; ++m)
    TT_UNROLL for (int n = 0; n < NR; ++n) c[m * ldc + n] = _mm512_reduce_add_ps(acc[m][n]);
}
#endif  // TT_X86

// ---------------------------------------------------------------------------------------------------
// Blocking: MR x NR tiles over C; the NR weight rows of one column block are read from memory by its first
// row block and from L1/L2 by the others (NR rows x K <= 6 x 2688 x 4 B = 64 KiB).

template <class Tag> using KernelFn = void (*)(int64_t, const typename Tag::raw* const*, const typename Tag::raw*,
                                               int64_t, float*, int64_t, bool);

template <class Tag, int MaxMR, int MaxNR> struct KernelTable {
  KernelFn<Tag> fn[MaxMR][MaxNR];
};

template <class Tag, int MaxMR, int MaxNR, template <class, int, int> class K> struct MakeTable;

#define TT_MOE_KERNEL_ADAPTER(NAME, FN)                                                                    \
  template <class Tag, int MR, int NR> struct NAME {                                                       \
    static void run(int64_t K, const typename Tag::raw* const* a, const typename Tag::raw* b, int64_t ldb,  \
                    float* c, int64_t ldc, bool pf) {                                                      \
      FN<Tag, MR, NR>(K, a, b, ldb, c, ldc, pf);                                                           \
    }                                                                                                      \
  };
TT_MOE_KERNEL_ADAPTER(ScalarK, kernel_scalar)
#ifdef TT_X86
TT_MOE_KERNEL_ADAPTER(Avx2K, kernel_avx2)
TT_MOE_KERNEL_ADAPTER(Avx512K, kernel_avx512)
template <class Tag, int MR, int NR> struct Avx512Bf16K {
  static void run(int64_t K, const uint16_t* const* a, const uint16_t* b, int64_t ldb, float* c, int64_t ldc,
                  bool pf) {
    kernel_avx512bf16<Tag, MR, NR>(K, a, b, ldb, c, ldc, pf);
  }
};
#endif
#undef TT_MOE_KERNEL_ADAPTER

template <class Tag, int MaxMR, int MaxNR, template <class, int, int> class K, int... I>
constexpr KernelTable<Tag, MaxMR, MaxNR> make_table(std::integer_sequence<int, I...>) {
  KernelTable<Tag, MaxMR, MaxNR> t{};
  ((t.fn[I / MaxNR][I % MaxNR] = &K<Tag, I / MaxNR + 1, I % MaxNR + 1>::run), ...);
  return t;
}

template <class Tag, int MaxMR, int MaxNR, template <class, int, int> class K>
void drive(int64_t M, int64_t N, int64_t Kd, const void* A, const int32_t* a_rows, int64_t lda, const void* B,
           int64_t ldb, float* C, int64_t ldc) {
  using raw = typename Tag::raw;
  static constexpr auto table = make_table<Tag, MaxMR, MaxNR, K>(std::make_integer_sequence<int, MaxMR * MaxNR>{});
  const raw* a = static_cast<const raw*>(A);
  const raw* b = static_cast<const raw*>(B);
  const bool pf = !std::is_same_v<Tag, F32> || Kd * int64_t(sizeof(raw)) <= kPrefetchF32MaxRowBytes;
  for (int64_t n0 = 0; n0 < N; n0 += MaxNR) {
    const int nr = int(N - n0 < MaxNR ? N - n0 : MaxNR);
    for (int64_t m0 = 0; m0 < M; m0 += MaxMR) {
      const int mr = int(M - m0 < MaxMR ? M - m0 : MaxMR);
      const raw* ap[MaxMR];
      for (int i = 0; i < mr; ++i) ap[i] = a + (a_rows ? int64_t(a_rows[m0 + i]) : m0 + i) * lda;
      table.fn[mr - 1][nr - 1](Kd, ap, b + n0 * ldb, ldb, C + m0 * ldc + n0, ldc, pf);
    }
  }
}

template <class Tag>
void gemm_typed(MoeCpuIsa isa, int64_t M, int64_t N, int64_t K, const void* A, const int32_t* a_rows, int64_t lda,
                const void* B, int64_t ldb, float* C, int64_t ldc) {
#ifdef TT_X86
  if constexpr (std::is_same_v<Tag, BF16>) {
    if (isa == MoeCpuIsa::kAvx512Bf16) return drive<Tag, 4, 6, Avx512Bf16K>(M, N, K, A, a_rows, lda, B, ldb, C, ldc);
  }
  if (isa == MoeCpuIsa::kAvx512 || isa == MoeCpuIsa::kAvx512Bf16)
    return drive<Tag, 4, 6, Avx512K>(M, N, K, A, a_rows, lda, B, ldb, C, ldc);
  if (isa == MoeCpuIsa::kAvx2) return drive<Tag, 3, 3, Avx2K>(M, N, K, A, a_rows, lda, B, ldb, C, ldc);
#endif
  drive<Tag, 2, 2, ScalarK>(M, N, K, A, a_rows, lda, B, ldb, C, ldc);
}

}  // namespace

void moe_gemm_nt(MoeCpuIsa isa, DType dt, int64_t M, int64_t N, int64_t K, const void* A, const int32_t* a_rows,
                 int64_t lda, const void* B, int64_t ldb, float* C, int64_t ldc) {
  switch (dt) {
    case DType::kFloat32: return gemm_typed<F32>(isa, M, N, K, A, a_rows, lda, B, ldb, C, ldc);
    case DType::kBFloat16: return gemm_typed<BF16>(isa, M, N, K, A, a_rows, lda, B, ldb, C, ldc);
    case DType::kFloat16: return gemm_typed<F16>(isa, M, N, K, A, a_rows, lda, B, ldb, C, ldc);
  }
}

// Measured on this project's Xeon (1 thread, one expert, [M x 2688] up + down, GFLOP/s micro vs MKL sgemm on
// widened tiles): AVX-512 fp32 M=16 15 vs 12, M=32 20 vs 21, M=64 29 vs 28, M=128 28 vs 32; bf16 (vdpbf16ps)
// M=16 20 vs 8, M=64 24 vs 20, M=128 23 vs 27. AVX2 kernel (forced, same CPU): fp32 M=16 10 vs 11, M=32 14 vs 18;
// bf16 M=32 13 vs 10, M=64 14 vs 17. Past these row counts the library's packed, compute-bound blocking wins.
// fp32 keeps every expert on the microkernel all the same: its sums do not depend on how many tokens chose the
// expert, the library's do (its blocking follows M), and fp32 promises bit-for-bit batch invariance
// (docs/semantics.md). With the linears kept on the micro kernel too, a batched fp32 prefill of 8 x 256 tokens
// (width-1/8 model, 2 threads) ran 1.45-1.57 s against 1.36-1.42 s on the library paths.
int64_t moe_micro_max_rows(MoeCpuIsa isa, DType dt) {
  if (dt == DType::kFloat32) return std::numeric_limits<int64_t>::max();
  return isa == MoeCpuIsa::kAvx512 || isa == MoeCpuIsa::kAvx512Bf16 ? 96 : 48;
}

}  // namespace tt
