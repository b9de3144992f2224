// Threshold unmasking (torch-free): one step of mask-diffusion decoding between two denoiser passes
// (docs/semantics.md states the decode semantics, the random key and the logprob; this header the numerics).
// Every parameter is per batch row b (a pointer plus a stride, 0 broadcasting one value). For every masked
// position s of row b (x[b,s] == mask_id; mask_id -1: x == -1 and no vocabulary id excluded):
//   pred = argmax_v logits[b,s,v]                           (temperature 0; ties -> lowest v)
//        = argmax_v fl(fl(logits[b,s,v] / T[b]) + g[b,s,v]) (temperature T[b] > 0, Gumbel-max; ties -> lowest v)
//   logprob = (x_pred - max) - log(sum_v exp(x_v - max))    (log softmax at T = 1), conf = exp(logprob)
// with the mask id excluded everywhere (its logit is -inf: NVIDIA's -1e12 gives the same probabilities
// unless every other logit is below -1e12 + 88). Then per row the commit rule over ALL masked positions:
//   n = #masked; k = n on the last step (step[b] == steps_per_block[b] - 1), else
//   k = min(n, max(1, #(masked & conf > gamma[b]), ceil(n / (steps_per_block[b] - step[b]))))
// and the k most confident masked positions (ties: lower position first) get x = pred (and logprob, when
// asked for, receives their logprob). Outputs count the kept positions [0, kept[b]) only: counts[b] = how
// many of them this step committed, done[b] = none of them is still masked. Rows with nothing masked are
// left untouched.
//
// Numerics and conventions (shared by the CPU and CUDA kernels and mirrored by reference.py):
// - All math in fp32 (bf16 logits are widened exactly). +inf logits are clamped to FLT_MAX. NaN: the CPU
//   kernel reports it (the binding raises); the CUDA kernel treats NaN as -inf and raises a device flag
//   the binding checks in debug mode (TWOTOWER_UNMASK_DEBUG=1). Only masked positions' logits are read.
// - Per-row values out of range (unmask_row_errors): the CPU binding raises before any work. The kernels leave
//   such a row untouched with counts -1 and done false (gamma, temperature, step, steps_per_block) or clamp
//   kept to [0, S]; the CUDA kernel also sets the error bits (checked in the debug mode).
// - A position whose logits (mask id aside) are all -inf gets pred = the lowest non-mask id, logprob = -inf
//   (conf = 0).
// - Gumbel noise g = -log(-log(u)) from a counter-based Philox-4x32-10: key = seed[b] (lo, hi words),
//   counter = (v / 4, s, block[b] lo, block[b] hi), word v % 4 -> u = (2 (w >> 9) + 1) / 2^24, which
//   lies strictly in (0, 1) and is exact in fp32. The row's slot in the batch is not part of it. log is the
//   fixed polynomial tt_log below built from separately rounded fp32 multiplies and adds (no FMA contraction:
//   __fmul_rn / __fadd_rn on the device, -ffp-contract=off on the host), so CPU, CUDA and reference.py's
//   torch version give identical bits and therefore identical samples.
// - The sum of exps is accumulated per vocabulary slice (CPU: an FMA exp polynomial, CUDA: __expf) and
//   merged in a fixed order, so results are deterministic; its rounding differs from torch's log_softmax
//   by a few ulps, so conf agrees with the reference to ~1e-6 relative (a commit decision can differ only
//   when two confidences, or a confidence and gamma, are that close). The final exp/log use tt_exp/tt_log.
// - Subnormal logits: the CUDA build flushes them to zero (--use_fast_math); the CPU keeps them.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/platform.h"

namespace tt {

constexpr int kUnmaskMaxSeq = 64;  // S limit: the row commit ranks S positions against each other
constexpr int64_t kUnmaskCpuSliceWidth = 8192;   // 32 KiB of fp32: pass 2 re-reads the slice from L1/L2
constexpr int64_t kUnmaskCudaSliceWidth = 4096;  // 256 threads x 16 entries; 16 x 131072 -> 512 CTAs

// One value per batch row: ptr[b * stride]; stride 0 broadcasts ptr[0] to every row. Lives on the kernel's
// device (a captured CUDA graph replays with new values).
template <typename T>
struct UnmaskRowArg {
  const T* ptr;
  int64_t stride;
  TT_HOST_DEVICE T at(int64_t b) const { return ptr[b * stride]; }
};

struct ThresholdUnmaskParams {
  const void* logits;         // [B, S, V], strides below (elements), vocabulary contiguous
  int64_t* x;                 // [B, S] int64 tokens, updated in place; row stride below, positions contiguous
  int32_t* counts;            // [B] kept positions committed this step (CUDA: -1 for a row with a bad value)
  bool* done;                 // [B] no kept position left masked after this step
  float* logprob;             // [B, S] or null: receives the logprob of every position committed this step
  UnmaskRowArg<float> gamma;            // in [0, 1]
  UnmaskRowArg<float> temperature;      // 0: greedy; > 0 (finite): Gumbel-max of logits / temperature
  UnmaskRowArg<int32_t> step;           // in [0, steps_per_block)
  UnmaskRowArg<int32_t> steps_per_block;  // >= 1
  UnmaskRowArg<int32_t> kept;           // in [0, S]; ptr null: S for every row
  UnmaskRowArg<int64_t> seed;           // Philox key
  UnmaskRowArg<int64_t> block;          // Philox counter words 2, 3 (the block or token index)
  int64_t batch, seq, vocab;
  int64_t logits_batch_stride, logits_seq_stride;
  int64_t x_batch_stride, logprob_batch_stride;
  int64_t mask_id;            // in [-1, V); -1: masked positions hold -1 and no vocabulary id is excluded
  DType dtype;                // kFloat32 or kBFloat16
  int64_t slice_width;        // vocabulary split: slices of this many entries (a multiple of 4)
};

// Error bits of a step (the CUDA error word; the CPU binding turns the per-row ones into messages).
constexpr int32_t kUnmaskErrNaN = 1;          // a NaN logit was read (CUDA: treated as -inf)
constexpr int32_t kUnmaskErrStep = 2;         // step[b] outside [0, steps_per_block[b])
constexpr int32_t kUnmaskErrSteps = 4;        // steps_per_block[b] < 1
constexpr int32_t kUnmaskErrGamma = 8;        // gamma[b] outside [0, 1] (or NaN)
constexpr int32_t kUnmaskErrTemperature = 16; // temperature[b] negative, infinite or NaN
constexpr int32_t kUnmaskErrKept = 32;        // kept[b] outside [0, S] (CUDA: clamped)
constexpr int32_t kUnmaskErrSkipRow = kUnmaskErrStep | kUnmaskErrSteps | kUnmaskErrGamma | kUnmaskErrTemperature;

// The error bits of row b's parameters (0: valid).
TT_HOST_DEVICE int32_t unmask_row_errors(const ThresholdUnmaskParams& p, int64_t b) {
  const float gamma = p.gamma.at(b), temp = p.temperature.at(b);
  const int32_t step = p.step.at(b), steps = p.steps_per_block.at(b);
  int32_t e = 0;
  if (!(gamma >= 0.f && gamma <= 1.f)) e |= kUnmaskErrGamma;
  if (!(temp >= 0.f && temp <= FLT_MAX)) e |= kUnmaskErrTemperature;
  if (steps < 1) {
    e |= kUnmaskErrSteps;
  } else if (step < 0 || step >= steps) {
    e |= kUnmaskErrStep;
  }
  if (p.kept.ptr != nullptr) {
    const int32_t kept = p.kept.at(b);
    if (kept < 0 || kept > p.seq) e |= kUnmaskErrKept;
  }
  return e;
}

// Row b's kept length, clamped to [0, S].
TT_HOST_DEVICE int32_t unmask_kept(const ThresholdUnmaskParams& p, int64_t b) {
  if (p.kept.ptr == nullptr) return int32_t(p.seq);
  const int32_t kept = p.kept.at(b);
  return kept < 0 ? 0 : (kept > p.seq ? int32_t(p.seq) : kept);
}

inline int64_t unmask_num_slices(const ThresholdUnmaskParams& p) {
  return (p.vocab + p.slice_width - 1) / p.slice_width;
}

// ---------------------------------------------------------------------------------------------------
// Separately rounded fp32 arithmetic and bit casts (identical results on host and device).

TT_HOST_DEVICE float rn_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TT_HOST_DEVICE float rn_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TT_HOST_DEVICE float rn_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
TT_HOST_DEVICE float rn_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
TT_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
TT_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Natural log for positive normal finite x (Cephes logf: |error| ~1 ulp). Constants are the decimal values
// rounded to double and then to float, exactly as torch turns a Python float into an fp32 operand.
TT_HOST_DEVICE float tt_log(float x) {
  const uint32_t bits = float_bits(x);
  float m = bits_float((bits & 0x7fffffu) | 0x3f000000u);   // x = m * 2^e, m in [0.5, 1)
  const bool low = m < float(0.707106781186547524);          // reduce to [sqrt(1/2), sqrt(2)) - 1
  const int32_t e = int32_t(bits >> 23) - 126 - int32_t(low);
  m = low ? rn_sub(rn_add(m, m), 1.f) : rn_sub(m, 1.f);      // both exact (Sterbenz)
  const float z = rn_mul(m, m);
  float y = float(7.0376836292e-2);
  y = rn_add(rn_mul(y, m), float(-1.1514610310e-1));
  y = rn_add(rn_mul(y, m), float(1.1676998740e-1));
  y = rn_add(rn_mul(y, m), float(-1.2420140846e-1));
  y = rn_add(rn_mul(y, m), float(1.4249322787e-1));
  y = rn_add(rn_mul(y, m), float(-1.6668057665e-1));
  y = rn_add(rn_mul(y, m), float(2.0000714765e-1));
  y = rn_add(rn_mul(y, m), float(-2.4999993993e-1));
  y = rn_add(rn_mul(y, m), float(3.3333331174e-1));
  y = rn_mul(rn_mul(y, m), z);
  const float fe = float(e);
  y = rn_add(y, rn_mul(fe, float(-2.12194440e-4)));
  y = rn_sub(y, rn_mul(0.5f, z));
  return rn_add(rn_add(m, y), rn_mul(fe, 0.693359375f));
}

// exp(x) for x <= 88 (Cephes expf, ~1 ulp); exactly 0 below -87.33 (and for -inf), exactly 1 at 0.
// Branch-free so the CPU loops vectorise.
TT_HOST_DEVICE float tt_exp(float x) {
  const bool under = !(x >= -87.33654f);                     // also true for -inf / NaN
  const float xc = under ? 0.f : x;
  const float fx = floorf(rn_add(rn_mul(xc, 1.44269504088896341f), 0.5f));
  float r = rn_sub(xc, rn_mul(fx, 0.693359375f));
  r = rn_sub(r, rn_mul(fx, -2.12194440e-4f));
  const float z = rn_mul(r, r);
  float y = 1.9875691500e-4f;
  y = rn_add(rn_mul(y, r), 1.3981999507e-3f);
  y = rn_add(rn_mul(y, r), 8.3334519073e-3f);
  y = rn_add(rn_mul(y, r), 4.1665795894e-2f);
  y = rn_add(rn_mul(y, r), 1.6666665459e-1f);
  y = rn_add(rn_mul(y, r), 5.0000001201e-1f);
  y = rn_add(rn_add(rn_mul(y, z), r), 1.f);
  const float scale = bits_float(uint32_t(int32_t(fx) + 127) << 23);  // fx in [-126, 127]
  return under ? 0.f : rn_mul(y, scale);
}

// ---------------------------------------------------------------------------------------------------
// Counter-based RNG: Philox-4x32-10 (Salmon et al., SC'11), 4 words per call.

struct Philox4 {
  uint32_t w[4];
};

TT_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                     uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Gumbel(0, 1) sample from one 32-bit word: u = (2 (w >> 9) + 1) / 2^24 in (0, 1), g = -log(-log(u)).
TT_HOST_DEVICE float gumbel_from_bits(uint32_t w) {
  const float u = rn_mul(float(int32_t(((w >> 9) << 1) | 1u)), 5.9604644775390625e-8f);
  return -tt_log(-tt_log(u));
}

// The Philox words for vocabulary entries 4*group .. 4*group+3 of position s of a row keyed (seed, block).
TT_HOST_DEVICE Philox4 unmask_noise_words(uint64_t seed, uint64_t block, int64_t s, int64_t group) {
  return philox4x32_10(uint32_t(group), uint32_t(s), uint32_t(block), uint32_t(block >> 32), uint32_t(seed),
                       uint32_t(seed >> 32));
}

// The Gumbel-max score of one logit: fl(fl(x / T) + g).
TT_HOST_DEVICE float gumbel_score(float x, float temperature, float g) {
  return rn_add(rn_div(x, temperature), g);
}

// Sanitised logit: +inf -> FLT_MAX so exp(x - max) stays finite. NaN passes through (callers decide).
TT_HOST_DEVICE float clamp_pos_inf(float x) {
  return x == INFINITY ? FLT_MAX : x;
}

// ---------------------------------------------------------------------------------------------------
// Partial state over a set of vocabulary entries, and its merge.

struct UnmaskState {
  float max;      // max logit (-inf if none)
  float sum;      // sum of exp(logit - max)
  int32_t arg;    // lowest index attaining max; -1 if every logit was -inf
  float gmax;     // max Gumbel score (sampling only)
  int32_t garg;   // its lowest index; -1 if none
  float gval;     // the logit at garg
};

TT_HOST_DEVICE UnmaskState unmask_empty_state() {
  return UnmaskState{-INFINITY, 0.f, -1, -INFINITY, -1, -INFINITY};
}

// (value, index) "b beats a": larger value, or equal value and lower index; index -1 never wins.
TT_HOST_DEVICE bool unmask_beats(float vb, int32_t ib, float va, int32_t ia) {
  return ib >= 0 && (ia < 0 || vb > va || (vb == va && ib < ia));
}

TT_HOST_DEVICE UnmaskState unmask_merge(const UnmaskState& a, const UnmaskState& b) {
  UnmaskState r;
  const float m = a.max > b.max ? a.max : b.max;
  if (m == -INFINITY) {
    r.sum = 0.f;
  } else {
    r.sum = rn_add(rn_mul(a.sum, tt_exp(rn_sub(a.max, m))), rn_mul(b.sum, tt_exp(rn_sub(b.max, m))));
  }
  const bool tb = unmask_beats(b.max, b.arg, a.max, a.arg);
  r.max = m;
  r.arg = tb ? b.arg : a.arg;
  const bool gb = unmask_beats(b.gmax, b.garg, a.gmax, a.garg);
  r.gmax = gb ? b.gmax : a.gmax;
  r.garg = gb ? b.garg : a.garg;
  r.gval = gb ? b.gval : a.gval;
  return r;
}

// The chosen token and its T=1 log-probability from a position's merged state (conf = tt_exp(logprob)).
TT_HOST_DEVICE void unmask_finalize(const UnmaskState& st, bool sample, int64_t mask_id, int64_t* pred,
                                    float* logprob) {
  if (st.arg < 0) {                    // every non-mask logit is -inf
    *pred = mask_id == 0 ? 1 : 0;
    *logprob = -INFINITY;
    return;
  }
  const bool use_g = sample && st.garg >= 0;   // all scores -inf (x / T underflow): fall back to argmax
  *pred = use_g ? st.garg : st.arg;
  const float xv = use_g ? st.gval : st.max;
  *logprob = rn_sub(rn_sub(xv, st.max), tt_log(st.sum));   // sum >= 1: the max contributes exp(0)
}

// ---------------------------------------------------------------------------------------------------
// The per-row commit rule.

// How many masked positions to commit, given n masked and n_above with conf > gamma.
TT_HOST_DEVICE int32_t unmask_commit_count(int32_t n, int32_t n_above, int32_t step, int32_t steps_per_block) {
  if (n == 0) return 0;
  if (step == steps_per_block - 1) return n;
  const int32_t left = int32_t(steps_per_block - step);
  int32_t k = n_above > 1 ? n_above : 1;
  const int32_t floor_k = (n + left - 1) / left;
  k = k > floor_k ? k : floor_k;
  return k < n ? k : n;
}

// Rank of masked position s among the masked positions by confidence (descending, lower position first).
TT_HOST_DEVICE int32_t unmask_rank(const float* conf, const bool* masked, int32_t S, int32_t s) {
  int32_t r = 0;
  const float c = conf[s];
  for (int32_t t = 0; t < S; ++t) r += masked[t] && (conf[t] > c || (conf[t] == c && t < s));
  return r;
}

// ---------------------------------------------------------------------------------------------------
// Kernels.

// CPU, phase 1: partial states of work items [item_begin, item_end), item = (b * S + s) * num_slices + slice,
// into states[item]; bad[item] = 1 where a scanned logit is NaN. Positions not masked are skipped.
Status threshold_unmask_scan_cpu(const ThresholdUnmaskParams& p, UnmaskState* states, uint8_t* bad,
                                 int64_t item_begin, int64_t item_end);

// CPU, one work item of phase 1: the state of vocabulary entries [lo, hi) (lo a multiple of 4) of masked position s
// of row b, whose logits (p.dtype) are slice[0, hi - lo); *has_nan: one of them is NaN. p.logits is not read, so a
// caller that computes a slice's logits itself (lm_head_unmask) scans them with the very same code.
UnmaskState threshold_unmask_scan_slice_cpu(const ThresholdUnmaskParams& p, const void* slice, int64_t b, int64_t s,
                                            int64_t lo, int64_t hi, bool* has_nan);

// CPU, phase 2: merge the slices and apply the commit rule for rows [b_begin, b_end). A row with a bad value is
// treated as on CUDA (the binding raises before calling this).
Status threshold_unmask_commit_cpu(const ThresholdUnmaskParams& p, const UnmaskState* states, int64_t b_begin,
                                   int64_t b_end);

// CUDA: bytes of device workspace (per-row arrival counters, an error word, partial states). The launcher
// zeroes the counters itself (a memset node in a captured graph); after the launch the int32 at
// ((int32_t*)workspace)[batch] holds the kUnmaskErr* bits (read it only in a debug mode: it needs a sync).
int64_t threshold_unmask_cuda_workspace_bytes(const ThresholdUnmaskParams& p);

// CUDA: the whole step on `stream`, asynchronous, no host synchronisation.
Status threshold_unmask_cuda(const ThresholdUnmaskParams& p, void* workspace, void* stream);

}  // namespace tt
