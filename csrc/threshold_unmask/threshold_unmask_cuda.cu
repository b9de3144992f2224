// CUDA threshold unmasking in one launch. CTA = (position, 4096-entry vocabulary slice), so 16 positions x
// 131072 give 512 CTAs. Each thread loads its 16 entries up front (16-byte streaming loads when aligned),
// reduces max/argmax (+ Gumbel argmax) and then the sum of exps from registers, and thread 0 writes the
// slice's partial state. The last CTA to arrive for a batch row (atomic counter) merges every position's
// slices, one warp per position, and applies the row's commit rule: no second launch and no host sync.
// Rows with no masked position read nothing but x. The per-row parameters are read where they are used; a
// CTA's row decides greedy or sampled scanning (a CTA-uniform branch).
#include <cuda_runtime.h>

#include <cstddef>

#include "threshold_unmask/threshold_unmask.h"

namespace tt {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = int(kUnmaskCudaSliceWidth / kThreads);
static_assert(kPerThread == 16, "slice width must be 16 entries per thread");

struct Best {   // (value, lowest index) pair under unmask_beats; gval rides along with the Gumbel winner
  float v;
  int32_t i;
  float extra;
};

__device__ __forceinline__ void warp_best(Best& a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, a.v, off);
    const int32_t i = __shfl_xor_sync(0xffffffffu, a.i, off);
    const float e = __shfl_xor_sync(0xffffffffu, a.extra, off);
    if (unmask_beats(v, i, a.v, a.i)) a = Best{v, i, e};
  }
}

// The xor butterfly adds the same pairs in every lane, so all lanes end with identical bits.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

__device__ Best block_best(Best a, Best* sh) {
  warp_best(a);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = a;
  __syncthreads();
  Best r = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) {
    if (unmask_beats(sh[w].v, sh[w].i, r.v, r.i)) r = sh[w];
  }
  __syncthreads();  // sh is reused by the next reduction
  return r;
}

__device__ float block_sum(float x, float* sh) {
  x = warp_sum(x);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = sh[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r += sh[w];
  return r;
}

__device__ __forceinline__ float widen_bf16(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// G consecutive entries starting at v0 (v0 + G <= V when kVec) into out[0..G).
template <typename T, bool kVec, int G>
__device__ __forceinline__ void load_group(const T* row, int64_t v0, int64_t V, float* out) {
  if constexpr (kVec) {
    if (v0 >= V) {
#pragma unroll
      for (int e = 0; e < G; ++e) out[e] = -INFINITY;
      return;
    }
    if constexpr (sizeof(T) == 4) {
      const float4 q = __ldcs(reinterpret_cast<const float4*>(row + v0));
      out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
    } else {
      const uint4 q = __ldcs(reinterpret_cast<const uint4*>(row + v0));
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        out[2 * e] = widen_bf16(w[e] & 0xffffu);
        out[2 * e + 1] = widen_bf16(w[e] >> 16);
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < G; ++e) {
      const int64_t v = v0 + e;
      if (v >= V) {
        out[e] = -INFINITY;
      } else if constexpr (sizeof(T) == 4) {
        out[e] = __ldcs(reinterpret_cast<const float*>(row) + v);
      } else {
        out[e] = widen_bf16(__ldcs(reinterpret_cast<const unsigned short*>(row) + v));
      }
    }
  }
}

__device__ UnmaskState load_state_cg(const UnmaskState* p) {
  // Written by other CTAs of this launch: read through L2 (L1 is not coherent across SMs).
  const float* f = reinterpret_cast<const float*>(p);
  const int32_t* i = reinterpret_cast<const int32_t*>(p);
  constexpr int kArg = offsetof(UnmaskState, arg) / 4, kGarg = offsetof(UnmaskState, garg) / 4;
  constexpr int kSum = offsetof(UnmaskState, sum) / 4, kGmax = offsetof(UnmaskState, gmax) / 4;
  constexpr int kGval = offsetof(UnmaskState, gval) / 4;
  return UnmaskState{__ldcg(f), __ldcg(f + kSum), __ldcg(i + kArg), __ldcg(f + kGmax), __ldcg(i + kGarg),
                     __ldcg(f + kGval)};
}

// Merge position (b, s)'s ns slice states with one warp: lanes fold slices lane, lane+32, ... in order,
// then max, rescaled sum and both argmaxes are combined across lanes (fixed order: deterministic).
__device__ UnmaskState warp_merge_position(const UnmaskState* ps, int64_t ns) {
  const int lane = threadIdx.x & 31;
  UnmaskState st = lane < ns ? load_state_cg(ps + lane) : unmask_empty_state();
  for (int64_t i = lane + 32; i < ns; i += 32) st = unmask_merge(st, load_state_cg(ps + i));
  const float m = warp_max(st.max);
  const float term = st.max == -INFINITY ? 0.f : rn_mul(st.sum, tt_exp(rn_sub(st.max, m)));
  UnmaskState r;
  r.max = m;
  r.sum = warp_sum(term);
  Best a{st.max, st.arg, 0.f};
  warp_best(a);
  r.arg = a.i;
  Best g{st.gmax, st.garg, st.gval};
  warp_best(g);
  r.gmax = g.v;
  r.garg = g.i;
  r.gval = g.extra;
  return r;
}

// The last CTA of batch row b: merge, decide, commit. Writes counts/done; x (and logprob) only when the row's
// values are valid.
__device__ void commit_row(const ThresholdUnmaskParams& p, int64_t ns, const UnmaskState* parts, int64_t b,
                           int32_t* err) {
  __shared__ float s_conf[kUnmaskMaxSeq];
  __shared__ float s_logp[kUnmaskMaxSeq];
  __shared__ int64_t s_pred[kUnmaskMaxSeq];
  __shared__ bool s_masked[kUnmaskMaxSeq];
  __shared__ int32_t s_count, s_left;
  const int S = int(p.seq);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int64_t* xr = p.x + b * p.x_batch_stride;
  const int32_t row_err = unmask_row_errors(p, b);
  const bool skip = (row_err & kUnmaskErrSkipRow) != 0;
  const bool sample = p.temperature.at(b) > 0.f;
  for (int s = warp; s < S; s += kWarps) {
    const bool masked = xr[s] == p.mask_id;
    float logp = -INFINITY;
    int64_t pred = 0;
    if (masked && !skip) {
      const UnmaskState st = warp_merge_position(parts + (b * S + s) * ns, ns);
      unmask_finalize(st, sample, p.mask_id, &pred, &logp);
    }
    if (lane == 0) {
      s_masked[s] = masked;
      s_logp[s] = logp;
      s_conf[s] = tt_exp(logp);
      s_pred[s] = pred;
    }
  }
  if (threadIdx.x == 0) {
    s_count = 0;
    s_left = 0;
  }
  __syncthreads();
  if (skip) {   // a bad per-row value: x untouched, counts -1
    if (threadIdx.x == 0) {
      p.counts[b] = -1;
      p.done[b] = false;
      atomicOr(err, row_err);
    }
    return;
  }
  const float gamma = p.gamma.at(b);
  int32_t n = 0, n_above = 0;
  for (int t = 0; t < S; ++t) {
    n += s_masked[t];
    n_above += s_masked[t] && s_conf[t] > gamma;
  }
  const int32_t k = unmask_commit_count(n, n_above, p.step.at(b), p.steps_per_block.at(b));
  const int32_t kept = unmask_kept(p, b);
  const int s = threadIdx.x;
  if (s < S && s_masked[s]) {
    const bool commit = unmask_rank(s_conf, s_masked, S, s) < k;
    if (commit) {
      xr[s] = s_pred[s];
      if (p.logprob != nullptr) p.logprob[b * p.logprob_batch_stride + s] = s_logp[s];
    }
    if (s < kept) atomicAdd(commit ? &s_count : &s_left, 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    p.counts[b] = s_count;
    p.done[b] = s_left == 0;
    if (row_err != 0) atomicOr(err, row_err);   // kept out of range (clamped)
  }
}

// Phase 1 of one CTA: the partial state of position (b, s) over vocabulary slice `slice` into *part.
template <typename T, bool kVec, bool kSample>
__device__ __forceinline__ void scan_slice(const ThresholdUnmaskParams& p, int64_t b, int64_t s, int64_t slice,
                                           UnmaskState* part, int32_t* err, Best* sh_best, float* sh_sum) {
  constexpr int G = kVec ? int(16 / sizeof(T)) : 4;  // entries per load group; a multiple of 4 (Philox)
  constexpr int NG = kPerThread / G;
  const T* row = static_cast<const T*>(p.logits) + b * p.logits_batch_stride + s * p.logits_seq_stride;
  const int64_t base = slice * kUnmaskCudaSliceWidth;
  float xv[kPerThread];
#pragma unroll
  for (int g = 0; g < NG; ++g) load_group<T, kVec, G>(row, base + (int64_t(g) * kThreads + threadIdx.x) * G, p.vocab, xv + g * G);
  // Sanitise: NaN -> -inf (flagged), +inf -> FLT_MAX, the mask id -> -inf.
  bool nan = false;
  Best best{-INFINITY, -1, 0.f}, gbest{-INFINITY, -1, -INFINITY};
  const float temperature = p.temperature.at(b);
  const uint64_t seed = uint64_t(p.seed.at(b)), block = uint64_t(p.block.at(b));
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const int64_t v0 = base + (int64_t(g) * kThreads + threadIdx.x) * G;
    float noise[G];
    if constexpr (kSample) {
#pragma unroll
      for (int q = 0; q < G / 4; ++q) {
        const Philox4 w = unmask_noise_words(seed, block, s, (v0 >> 2) + q);
#pragma unroll
        for (int t = 0; t < 4; ++t) noise[4 * q + t] = gumbel_from_bits(w.w[t]);
      }
    }
#pragma unroll
    for (int e = 0; e < G; ++e) {
      float& x = xv[g * G + e];
      const int32_t v = int32_t(v0 + e);
      if (isnan(x)) {
        nan = true;
        x = -INFINITY;
      }
      x = v == p.mask_id ? -INFINITY : clamp_pos_inf(x);
      if (x > best.v) best = Best{x, v, 0.f};  // entries are visited in increasing v: '>' keeps the first
      if constexpr (kSample) {
        const float sc = gumbel_score(x, temperature, noise[e]);
        if (sc > gbest.v) gbest = Best{sc, v, x};
      }
    }
  }
  if (nan) atomicOr(err, kUnmaskErrNaN);
  best = block_best(best, sh_best);
  if constexpr (kSample) gbest = block_best(gbest, sh_best);
  float sum = 0.f;
  if (best.i >= 0) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) sum += __expf(xv[j] - best.v);
    sum = block_sum(sum, sh_sum);
  }
  if (threadIdx.x == 0) *part = UnmaskState{best.v, sum, best.i, gbest.v, gbest.i, gbest.extra};
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) threshold_unmask_kernel(const ThresholdUnmaskParams p, int64_t ns,
                                                                    UnmaskState* parts, int32_t* counters,
                                                                    int32_t* err) {
  __shared__ Best sh_best[kWarps];
  __shared__ float sh_sum[kWarps];
  __shared__ bool s_last;
  const int64_t item = blockIdx.x, r = item / ns, slice = item - r * ns;
  const int64_t b = r / p.seq, s = r - b * p.seq;

  if (p.x[b * p.x_batch_stride + s] == p.mask_id) {  // uniform across the CTA, as is the row's temperature
    if (p.temperature.at(b) > 0.f) {
      scan_slice<T, kVec, true>(p, b, s, slice, parts + item, err, sh_best, sh_sum);
    } else {
      scan_slice<T, kVec, false>(p, b, s, slice, parts + item, err, sh_best, sh_sum);
    }
  }
  // Arrival: the last CTA of batch row b (over all its positions and slices) does the row's commit.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(counters + b, 1) == int32_t(p.seq * ns) - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  commit_row(p, ns, parts, b, err);
}

template <typename T, bool kVec>
void launch(const ThresholdUnmaskParams& p, int64_t ns, UnmaskState* parts, int32_t* counters, int32_t* err,
            cudaStream_t stream) {
  const dim3 grid(unsigned(p.batch * p.seq * ns));
  threshold_unmask_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p, ns, parts, counters, err);
}

template <typename T>
void launch_dtype(const ThresholdUnmaskParams& p, int64_t ns, UnmaskState* parts, int32_t* counters, int32_t* err,
                  cudaStream_t stream) {
  constexpr int64_t G = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && p.vocab % G == 0 &&
                   p.logits_batch_stride % G == 0 && p.logits_seq_stride % G == 0;
  if (vec) {
    launch<T, true>(p, ns, parts, counters, err, stream);
  } else {
    launch<T, false>(p, ns, parts, counters, err, stream);
  }
}

// Workspace layout: [counters: batch x int32 | error word: int32 | pad to 16 B | partial states].
int64_t unmask_counter_bytes(const ThresholdUnmaskParams& p) { return ((p.batch + 1) * 4 + 15) / 16 * 16; }

}  // namespace

int64_t threshold_unmask_cuda_workspace_bytes(const ThresholdUnmaskParams& p) {
  const int64_t ns = (p.vocab + kUnmaskCudaSliceWidth - 1) / kUnmaskCudaSliceWidth;
  return unmask_counter_bytes(p) + p.batch * p.seq * ns * int64_t(sizeof(UnmaskState));
}

Status threshold_unmask_cuda(const ThresholdUnmaskParams& p, void* workspace, void* stream) {
  if (p.seq < 1 || p.seq > kUnmaskMaxSeq || p.vocab < 2 || p.vocab > INT32_MAX ||
      p.slice_width != kUnmaskCudaSliceWidth) {
    return Status::kUnsupportedShape;
  }
  const int64_t ns = unmask_num_slices(p);
  if (p.batch * p.seq * ns > INT32_MAX) return Status::kUnsupportedShape;
  auto* counters = static_cast<int32_t*>(workspace);
  int32_t* err = counters + p.batch;
  auto* parts = reinterpret_cast<UnmaskState*>(static_cast<char*>(workspace) + unmask_counter_bytes(p));
  auto s = static_cast<cudaStream_t>(stream);
  if (cudaMemsetAsync(counters, 0, size_t(p.batch + 1) * 4, s) != cudaSuccess) return Status::kLaunchFailed;
  if (p.batch == 0) return Status::kOk;
  switch (p.dtype) {
    case DType::kFloat32: launch_dtype<float>(p, ns, parts, counters, err, s); break;
    case DType::kBFloat16: launch_dtype<uint16_t>(p, ns, parts, counters, err, s); break;
    default: return Status::kUnsupportedDType;
  }
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace tt
