// CPU Mamba block scan (mamba_scan.h), in two phases.
//
// Phase 1, conv items (row, block of channels): the depthwise conv + bias + SiLU of every live token, 8 channels
// per vector (common/vec8_cpu.h), into act as fp32 holding storage-dtype values; then the block's final conv
// state. A group's B and C channels are convolved once per call here, not once per head.
//
// Phase 2, scan items (row, head): the state [P, N] is walked in tiles of R rows x kChunk columns that stay in
// registers for all of the block's tokens, so a state element is loaded and stored once per call instead of once
// per token; per token and tile, S = fma(S, dA, dB[n] * x[i]) and the partial dots S . C, reduced across lanes
// for the tile's rows together. The earlier loop (state in memory, one horizontal 8-lane sum per row and token,
// conv redone per head) ran a denoiser block of the width-1/8 model (8 heads x 64 x 128, 16 tokens) in 290 us on
// the Xeon, one thread, 18 GFLOP/s; bench/bench_mamba_scan.py has this kernel's numbers.
//
// Rounding, the same on every path (AVX-512, AVX2 + FMA, scalar), so their results are bitwise equal: lane k of
// a 16-lane vector v of a chunk holds column n0 + 16v + k; the state update is fma(S, dA, dB * x) (dB = dt * B
// rounded first, then its product with x); the dot's lane k is the plain product for v = 0, then fused
// multiply-adds in v order; the 16 lanes are summed as a tree (k + k+8, k + k+4, k + k+2, k + k+1); a head row's
// chunks add in column order, then y = that + D * x. Columns past N are zero in every operand and stay zero.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/vec8_cpu.h"
#include "mamba_scan/mamba_scan.h"

namespace tt {
namespace {

constexpr int kVec = 16;                   // lanes of the summation structure (one zmm, two ymm)
constexpr int kChunkVecs = 4;              // vectors per column chunk: 4 rows x 4 zmm of state in registers
constexpr int64_t kChunk = kVec * kChunkVecs;
constexpr int kRows512 = 4;                // state rows per AVX-512 tile (AVX2 and scalar: one)

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---------------------------------------------------------------------------------------------------
// Phase 1: conv + SiLU.

// Raw xBC row j of the concatenation [conv_state_in | xBC] of batch row b.
template <typename T>
const T* concat_row(const MambaScanParams& p, int64_t b, int64_t j) {
  const int64_t hist = p.kernel - 1;
  return j < hist ? static_cast<const T*>(p.conv_state_in) + b * p.cs_in_batch_stride + j * p.cs_in_tap_stride
                  : static_cast<const T*>(p.xbc) + b * p.xbc_batch_stride + (j - hist) * p.xbc_tok_stride;
}

struct ConvScratch {
  std::vector<float> w, bias, pre;  // the block's weights transposed to [K][width], its bias, one token's conv output
};

// The SiLU of n floats in place (n a multiple of 32), rounded to T; four independent vectors per step, so the
// exp polynomial's and the division's latencies overlap.
template <typename T>
void silu_rows(float* v, int64_t n) {
  for (int64_t c = 0; c < n; c += 4 * kLanes8) {
    f32x8 x[4];
    for (int j = 0; j < 4; ++j) x[j] = load8(v + c + j * kLanes8);
    for (int j = 0; j < 4; ++j) store8(v + c + j * kLanes8, round8<T>(silu8(x[j])));
  }
}

template <typename T>
void conv_item(const MambaScanParams& p, float* act, int64_t b, int64_t block) {
  thread_local ConvScratch sc;
  const int64_t C = p.conv_dim, K = p.kernel, c0 = block * kMambaConvBlock;
  const int64_t nc = std::min(kMambaConvBlock, C - c0), width = round_up(nc, 4 * kLanes8);
  const int64_t full = nc / kLanes8 * kLanes8, len = mamba_row_len(p, b);
  if (len > 0) {
    sc.w.assign(K * width, 0.f);
    sc.bias.assign(width, 0.f);
    sc.pre.assign(width, 0.f);
    const T* w = static_cast<const T*>(p.conv_weight) + c0 * K;
    const T* cb = static_cast<const T*>(p.conv_bias);
    for (int64_t c = 0; c < nc; ++c) {
      for (int64_t k = 0; k < K; ++k) sc.w[k * width + c] = to_float(w[c * K + k]);
      if (cb != nullptr) sc.bias[c] = to_float(cb[c0 + c]);
    }
    float* pre = sc.pre.data();
    for (int64_t t = 0; t < len; ++t) {
      // bias, then the taps in order (as mamba_conv_silu); the last partial vector through a zero-padded copy
      std::memcpy(pre, sc.bias.data(), nc * sizeof(float));
      for (int64_t k = 0; k < K; ++k) {
        const T* src = concat_row<T>(p, b, t + k) + c0;
        const float* wk = sc.w.data() + k * width;
        for (int64_t c = 0; c < full; c += kLanes8)
          store8(pre + c, load8(pre + c) + load8(wk + c) * widen8<T>(src + c));
        if (full < nc) {
          T tail[kLanes8] = {};
          std::memcpy(tail, src + full, (nc - full) * sizeof(T));
          store8(pre + full, load8(pre + full) + load8(wk + full) * widen8<T>(tail));
        }
      }
      silu_rows<T>(pre, width);
      std::memcpy(act + (b * p.seqlen + t) * C + c0, pre, nc * sizeof(float));
    }
  }
  // New conv state row j = concatenation row len + j (raw values). Increasing j reads rows at or after the one it
  // writes, so an aliased (in-place) state is never read after being overwritten; no other item reads these
  // channels' state (the scan reads act).
  if (p.conv_state_out != nullptr) {
    T* out = static_cast<T*>(p.conv_state_out) + b * p.cs_out_batch_stride + c0;
    for (int64_t j = 0; j < K - 1; ++j)
      std::memmove(out + j * p.cs_out_tap_stride, concat_row<T>(p, b, len + j) + c0, nc * sizeof(T));
  }
}

// ---------------------------------------------------------------------------------------------------
// Phase 2: the recurrence on one state tile (rows x cols <= kChunk) for all tokens.

struct Tile {
  int64_t len;
  const float* dA;     // [len]
  const float* dB;     // the chunk's first column at token 0; token t at + t * ldn; zero past N
  const float* C;      // likewise
  int64_t ldn;
  const float* x;      // x of the tile's first row at token 0; token t at + t * ldx, row r at + r
  int64_t ldx;
  float* y;            // partial y of the tile's first row at token 0; token t at + t * ldy
  int64_t ldy;
  bool first;          // the head's first chunk: y = dot, else y += dot
  const float* s_in;   // the tile's state, rows lds apart
  float* s_out;        // or nullptr
  int64_t lds;
  int64_t cols;        // live columns, 1..kChunk
};

// Reference of every vector path below, one row at a time.
void tile_scalar(const Tile& a, int rows) {
  const int nv = int((a.cols + kVec - 1) / kVec);
  for (int r = 0; r < rows; ++r) {
    float s[kChunk] = {};
    for (int64_t n = 0; n < a.cols; ++n) s[n] = a.s_in[r * a.lds + n];
    for (int64_t t = 0; t < a.len; ++t) {
      const float dA = a.dA[t], x = a.x[t * a.ldx + r];
      const float* dB = a.dB + t * a.ldn;
      const float* C = a.C + t * a.ldn;
      float acc[kVec];
      for (int v = 0; v < nv; ++v)
        for (int k = 0; k < kVec; ++k) {
          const int n = v * kVec + k;
          s[n] = n < a.cols ? std::fma(s[n], dA, dB[n] * x) : 0.f;
          acc[k] = v == 0 ? s[n] * C[n] : std::fma(s[n], C[n], acc[k]);
        }
      float h8[8], h4[4], h2[2];
      for (int k = 0; k < 8; ++k) h8[k] = acc[k] + acc[k + 8];
      for (int k = 0; k < 4; ++k) h4[k] = h8[k] + h8[k + 4];
      for (int k = 0; k < 2; ++k) h2[k] = h4[k] + h4[k + 2];
      const float dot = h2[0] + h2[1];
      float& y = a.y[t * a.ldy + r];
      y = a.first ? dot : y + dot;
    }
    if (a.s_out != nullptr)
      for (int64_t n = 0; n < a.cols; ++n) a.s_out[r * a.lds + n] = s[n];
  }
}

#ifdef TT_X86
// AVX2 + FMA, one row: a 16-lane vector is two ymm (lanes 0-7, 8-15); kTail: the last one is partial (its dead lanes
// are zeroed after the update, as the AVX-512 path's masked FMA does).
inline float hsum16(__m256 lo, __m256 hi) {
  const __m256 h8 = _mm256_add_ps(lo, hi);
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

template <int NV, bool kTail>
void tile_avx2(const Tile& a, int rows) {
  __m256i mask[2] = {_mm256_set1_epi32(-1), _mm256_set1_epi32(-1)};
  if (kTail) {
    const int live = int(a.cols - (NV - 1) * kVec);
    for (int h = 0; h < 2; ++h) {
      alignas(32) int32_t m[8];
      for (int i = 0; i < 8; ++i) m[i] = h * 8 + i < live ? -1 : 0;
      mask[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
    }
  }
  for (int r = 0; r < rows; ++r) {
    __m256 s[NV][2];
    for (int v = 0; v < NV; ++v)
      for (int h = 0; h < 2; ++h) {
        const float* src = a.s_in + r * a.lds + v * kVec + h * 8;
        s[v][h] = kTail && v == NV - 1 ? _mm256_maskload_ps(src, mask[h]) : _mm256_loadu_ps(src);
      }
    for (int64_t t = 0; t < a.len; ++t) {
      const __m256 dA = _mm256_set1_ps(a.dA[t]), x = _mm256_set1_ps(a.x[t * a.ldx + r]);
      const float* dB = a.dB + t * a.ldn;
      const float* C = a.C + t * a.ldn;
      __m256 acc[2];
      for (int v = 0; v < NV; ++v)
        for (int h = 0; h < 2; ++h) {
          const int o = v * kVec + h * 8;
          s[v][h] = _mm256_fmadd_ps(s[v][h], dA, _mm256_mul_ps(_mm256_loadu_ps(dB + o), x));
          if (kTail && v == NV - 1) s[v][h] = _mm256_and_ps(s[v][h], _mm256_castsi256_ps(mask[h]));
          const __m256 c = _mm256_loadu_ps(C + o);
          acc[h] = v == 0 ? _mm256_mul_ps(s[v][h], c) : _mm256_fmadd_ps(s[v][h], c, acc[h]);
        }
      const float dot = hsum16(acc[0], acc[1]);
      float& y = a.y[t * a.ldy + r];
      y = a.first ? dot : y + dot;
    }
    if (a.s_out != nullptr)
      for (int v = 0; v < NV; ++v)
        for (int h = 0; h < 2; ++h) {
          float* dst = a.s_out + r * a.lds + v * kVec + h * 8;
          if (kTail && v == NV - 1) _mm256_maskstore_ps(dst, mask[h], s[v][h]);
          else _mm256_storeu_ps(dst, s[v][h]);
        }
  }
}

// AVX-512: R rows x NV zmm of state; the R dots of a token are summed across lanes together (the same tree as
// hsum16), leaving row r's sum in lane 4r.
TT_AVX512 inline __m512 hsum16x4(const __m512 (&acc)[kRows512]) {
  const __m512 ab =
      _mm512_add_ps(_mm512_shuffle_f32x4(acc[0], acc[1], 0x44), _mm512_shuffle_f32x4(acc[0], acc[1], 0xEE));
  const __m512 cd =
      _mm512_add_ps(_mm512_shuffle_f32x4(acc[2], acc[3], 0x44), _mm512_shuffle_f32x4(acc[2], acc[3], 0xEE));
  const __m512 h4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m512 h2 = _mm512_add_ps(h4, _mm512_permute_ps(h4, 0x4E));
  return _mm512_add_ps(h2, _mm512_permute_ps(h2, 0xB1));
}

template <int R, int NV>
TT_AVX512 void tile_avx512(const Tile& a) {
  __mmask16 mask[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t live = a.cols - v * kVec;
    mask[v] = live >= kVec ? __mmask16(0xffff) : __mmask16((1u << live) - 1);
  }
  __m512 s[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = _mm512_maskz_loadu_ps(mask[v], a.s_in + r * a.lds + v * kVec);
  const __m512i lanes = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  const __mmask8 ymask = __mmask8((1u << R) - 1);
  for (int64_t t = 0; t < a.len; ++t) {
    const __m512 dA = _mm512_set1_ps(a.dA[t]);
    const float* dB = a.dB + t * a.ldn;
    const float* C = a.C + t * a.ldn;
    __m512 x[R], acc[kRows512];
    for (int r = 0; r < R; ++r) x[r] = _mm512_set1_ps(a.x[t * a.ldx + r]);
    for (int r = R; r < kRows512; ++r) acc[r] = _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      const __m512 b = _mm512_loadu_ps(dB + v * kVec), c = _mm512_loadu_ps(C + v * kVec);
      for (int r = 0; r < R; ++r) {
        s[r][v] = _mm512_maskz_fmadd_ps(mask[v], s[r][v], dA, _mm512_mul_ps(b, x[r]));
        acc[r] = v == 0 ? _mm512_mul_ps(s[r][v], c) : _mm512_fmadd_ps(s[r][v], c, acc[r]);
      }
    }
    __m128 dot = _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, hsum16x4(acc)));
    float* y = a.y + t * a.ldy;
    if (!a.first) dot = _mm_add_ps(_mm_maskz_loadu_ps(ymask, y), dot);
    _mm_mask_storeu_ps(y, ymask, dot);
  }
  if (a.s_out != nullptr)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(a.s_out + r * a.lds + v * kVec, mask[v], s[r][v]);
}

template <int R, int NV> void tile_avx512_fn(const Tile& a, int) { tile_avx512<R, NV>(a); }
template <int NV, bool kTail> void tile_avx2_fn(const Tile& a, int rows) { tile_avx2<NV, kTail>(a, rows); }

using TileFn = void (*)(const Tile&, int);
template <int R> constexpr TileFn k512Row[kChunkVecs] = {&tile_avx512_fn<R, 1>, &tile_avx512_fn<R, 2>,
                                                         &tile_avx512_fn<R, 3>, &tile_avx512_fn<R, 4>};
constexpr const TileFn* k512[kRows512] = {k512Row<1>, k512Row<2>, k512Row<3>, k512Row<4>};
constexpr TileFn kAvx2[2][kChunkVecs] = {{&tile_avx2_fn<1, false>, &tile_avx2_fn<2, false>, &tile_avx2_fn<3, false>,
                                          &tile_avx2_fn<4, false>},
                                         {&tile_avx2_fn<1, true>, &tile_avx2_fn<2, true>, &tile_avx2_fn<3, true>,
                                          &tile_avx2_fn<4, true>}};
#endif  // TT_X86

// Rows per tile of the path, and the tile function for `rows` rows.
int tile_rows(CpuIsa isa) { return isa == CpuIsa::kAvx512 ? kRows512 : 1; }

void run_tile(CpuIsa isa, const Tile& a, int rows) {
#ifdef TT_X86
  const int nv = int((a.cols + kVec - 1) / kVec);
  if (isa == CpuIsa::kAvx512) return k512[rows - 1][nv - 1](a, rows);
  if (isa == CpuIsa::kAvx2) return kAvx2[a.cols % kVec != 0][nv - 1](a, rows);
#endif
  tile_scalar(a, rows);
}

struct ScanScratch {
  std::vector<float> dA, dB, C, y;  // [len], [len][N rounded up to kVec] x 2, [len][P]
};

template <typename T>
void scan_item(const MambaScanParams& p, CpuIsa isa, const float* act, int64_t b, int64_t h) {
  thread_local ScanScratch sc;
  const int64_t P = p.headdim, N = p.dstate, H = p.nheads, L = p.seqlen, Cd = p.conv_dim;
  const int64_t len = mamba_row_len(p, b), ldn = round_up(N, kVec);
  T* y = static_cast<T*>(p.y) + b * L * H * P + h * P;  // token t at + t * H * P
  for (int64_t t = len; t < L; ++t) std::fill_n(y + t * H * P, P, from_float<T>(0.f));
  const float* s_in = p.ssm_state_in + b * p.ssm_in_batch_stride + h * P * N;
  float* s_out = p.ssm_state_out != nullptr ? p.ssm_state_out + b * p.ssm_out_batch_stride + h * P * N : nullptr;
  if (len == 0) {
    if (s_out != nullptr) std::memmove(s_out, s_in, P * N * sizeof(float));
    return;
  }
  sc.dA.resize(len);
  sc.dB.assign(len * ldn, 0.f);
  sc.C.assign(len * ldn, 0.f);
  sc.y.resize(len * P);
  const T* dt_raw = static_cast<const T*>(p.dt) + b * p.dt_batch_stride + h;
  const float A = -expf(p.A_log[h]), Dh = p.D[h];
  const float* act_b = act + b * L * Cd;
  const int64_t xo = mamba_x_channel(p, h), bo = mamba_b_channel(p, h), co = mamba_c_channel(p, h);
  for (int64_t t = 0; t < len; ++t) {
    const float dt = mamba_dt(to_float(dt_raw[t * p.dt_tok_stride]), p.dt_bias[h], p.dt_min, p.dt_max);
    sc.dA[t] = expf(dt * A);
    const float* row = act_b + t * Cd;
    for (int64_t n = 0; n < N; ++n) {
      sc.dB[t * ldn + n] = dt * row[bo + n];
      sc.C[t * ldn + n] = row[co + n];
    }
  }
  const int R = tile_rows(isa);
  Tile a;
  a.len = len;
  a.dA = sc.dA.data();
  a.ldn = ldn;
  a.ldx = Cd;
  a.ldy = P;
  a.lds = N;
  for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
    a.dB = sc.dB.data() + n0;
    a.C = sc.C.data() + n0;
    a.first = n0 == 0;
    a.cols = std::min(kChunk, N - n0);
    for (int64_t i0 = 0; i0 < P; i0 += R) {
      a.x = act_b + xo + i0;
      a.y = sc.y.data() + i0;
      a.s_in = s_in + i0 * N + n0;
      a.s_out = s_out != nullptr ? s_out + i0 * N + n0 : nullptr;
      run_tile(isa, a, int(std::min<int64_t>(R, P - i0)));
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    const float* x = act_b + t * Cd + xo;
    const float* yp = sc.y.data() + t * P;
    T* yt = y + t * H * P;
    for (int64_t i = 0; i < P; ++i) yt[i] = from_float<T>(yp[i] + Dh * x[i]);
  }
}

template <template <typename> class F, typename... Args>
Status dispatch(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32: F<float>::run(args...); break;
    case DType::kBFloat16: F<bf16_t>::run(args...); break;
    case DType::kFloat16: F<fp16_t>::run(args...); break;
    default: return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

template <typename T> struct ConvFn {
  static void run(const MambaScanParams& p, float* act, int64_t begin, int64_t end) {
    const int64_t blocks = mamba_conv_blocks(p);
    for (int64_t i = begin; i < end; ++i) conv_item<T>(p, act, i / blocks, i % blocks);
  }
};
template <typename T> struct ScanFn {
  static void run(const MambaScanParams& p, CpuIsa isa, const float* act, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) scan_item<T>(p, isa, act, i / p.nheads, i % p.nheads);
  }
};

}  // namespace

Status mamba_conv_cpu(const MambaScanParams& p, float* act, int64_t begin, int64_t end) {
  return dispatch<ConvFn>(p.dtype, p, act, begin, end);
}

Status mamba_scan_cpu(const MambaScanParams& p, CpuIsa isa, const float* act, int64_t begin, int64_t end) {
  if (!cpu_isa_supported(isa) || isa > CpuIsa::kAvx512) return Status::kUnsupportedShape;
  return dispatch<ScanFn>(p.dtype, p, isa, act, begin, end);
}

}  // namespace tt
