// Seeded Mamba-2 block scan (torch-free). One call advances B sequences by up to L tokens each, starting
// from a given conv state and SSM state:
//   1. depthwise causal conv over [conv_state (K-1 raw xBC rows) | xBC (L rows)] + bias, SiLU; the
//      activated value is rounded to the storage dtype (as the reference conv kernels store it);
//   2. per head h (group g = h / (H/G)), token t, in fp32:
//        dt  = clamp(softplus(dt_raw[t,h] + dt_bias[h]), dt_min, dt_max);  A = -exp(A_log[h])
//        S   = exp(dt*A) * S + (dt*B_t[g]) (outer) x_t[h]            S: [P, N], seeded from ssm_state
//        y_t = S . C_t[g] + D[h] * x_t[h]                              (y rounded to the storage dtype)
//   3. optionally the final conv state (last K-1 raw xBC rows of the concatenation) and the final SSM
//      state are written to conv_state_out / ssm_state_out, which may alias the inputs (in-place update).
// Rows with seq_lens[b] < L scan only their first seq_lens[b] tokens (the rest of y is 0) and their final
// states are taken after token seq_lens[b]-1. Channel layout of xBC: [x (H*P) | B (G*N) | C (G*N)].
#pragma once
#include <cmath>
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/platform.h"
#if defined(__CUDACC__)
#include "common/half_cuda.cuh"
#else
#include "common/half_cpu.h"
#endif

namespace tt {

struct MambaScanParams {
  const void* xbc;              // [B, L, conv_dim] storage dtype, channel stride 1
  const void* dt;               // [B, L, H] storage dtype, head stride 1
  const void* conv_state_in;    // [B, K-1, conv_dim] storage dtype, channel stride 1
  const float* ssm_state_in;    // [B, H, P, N] fp32, inner three dims contiguous
  const void* conv_weight;      // [conv_dim, K] storage dtype, contiguous
  const void* conv_bias;        // [conv_dim] storage dtype, or nullptr
  const float* dt_bias;         // [H]
  const float* A_log;           // [H]
  const float* D;               // [H]
  const int32_t* seq_lens;      // [B] or nullptr (= L for every row); clamped to [0, L]
  void* y;                      // [B, L, H*P] storage dtype, contiguous
  void* conv_state_out;         // like conv_state_in, or nullptr
  float* ssm_state_out;         // like ssm_state_in, or nullptr
  int64_t batch, seqlen, nheads, headdim, dstate, ngroups, conv_dim, kernel;
  int64_t xbc_batch_stride, xbc_tok_stride;
  int64_t dt_batch_stride, dt_tok_stride;
  int64_t cs_in_batch_stride, cs_in_tap_stride;
  int64_t cs_out_batch_stride, cs_out_tap_stride;
  int64_t ssm_in_batch_stride, ssm_out_batch_stride;
  float dt_min, dt_max;
  DType dtype;
};

// torch.nn.functional.softplus (beta 1, threshold 20).
TT_HOST_DEVICE float mamba_softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

TT_HOST_DEVICE float mamba_dt(float raw, float bias, float lo, float hi) {
  return fminf(fmaxf(mamba_softplus(raw + bias), lo), hi);
}

TT_HOST_DEVICE float mamba_silu(float x) { return x / (1.f + expf(-x)); }

// Number of tokens row b scans.
TT_HOST_DEVICE int64_t mamba_row_len(const MambaScanParams& p, int64_t b) {
  if (p.seq_lens == nullptr) return p.seqlen;
  const int64_t n = p.seq_lens[b];
  return n < 0 ? 0 : (n > p.seqlen ? p.seqlen : n);
}

// Channel offsets of head h's x, and of its group's B and C, inside a conv_dim row.
TT_HOST_DEVICE int64_t mamba_x_channel(const MambaScanParams& p, int64_t h) { return h * p.headdim; }
TT_HOST_DEVICE int64_t mamba_b_channel(const MambaScanParams& p, int64_t h) {
  return p.nheads * p.headdim + (h / (p.nheads / p.ngroups)) * p.dstate;
}
TT_HOST_DEVICE int64_t mamba_c_channel(const MambaScanParams& p, int64_t h) {
  return mamba_b_channel(p, h) + p.ngroups * p.dstate;
}

// Raw xBC value at position j of the concatenation [conv_state_in (K-1 rows) | xBC (L rows)].
template <typename T>
TT_HOST_DEVICE float mamba_conv_input(const MambaScanParams& p, int64_t b, int64_t j, int64_t c) {
  const int64_t hist = p.kernel - 1;
  if (j < hist) {
    return to_float(static_cast<const T*>(p.conv_state_in)[b * p.cs_in_batch_stride + j * p.cs_in_tap_stride + c]);
  }
  return to_float(static_cast<const T*>(p.xbc)[b * p.xbc_batch_stride + (j - hist) * p.xbc_tok_stride + c]);
}

// Activated conv output of channel c at token t (window = concatenation positions t .. t+K-1), rounded
// to the storage dtype.
template <typename T>
TT_HOST_DEVICE float mamba_conv_silu(const MambaScanParams& p, int64_t b, int64_t t, int64_t c) {
  const T* w = static_cast<const T*>(p.conv_weight) + c * p.kernel;
  float acc = p.conv_bias != nullptr ? to_float(static_cast<const T*>(p.conv_bias)[c]) : 0.f;
  for (int64_t k = 0; k < p.kernel; ++k) acc += to_float(w[k]) * mamba_conv_input<T>(p, b, t + k, c);
  return to_float(from_float<T>(mamba_silu(acc)));
}

// CPU, in two phases through a scratch `act` [batch, seqlen, conv_dim] fp32 (the activated conv output of every
// live token, already rounded to the storage dtype), so a group's B and C channels are convolved once, not once
// per head:
//   1. mamba_conv_cpu over items (row b, block of kMambaConvBlock channels) = b * mamba_conv_blocks(p) + block:
//      act for those channels, then their final conv state (conv_state_out) — each item is the only reader of its
//      channels' conv state, so the in-place update needs no second pass;
//   2. mamba_scan_cpu over items (row b, head h) = b * nheads + h, after every conv item: the recurrence, y and
//      the final SSM state. Items of one phase may run in any order on any threads.
// `isa` picks the recurrence's vector code (AVX-512, AVX2 + FMA or scalar); every path computes the same
// operations in the same order, so the results are bitwise equal across them.
constexpr int64_t kMambaConvBlock = 256;
inline int64_t mamba_conv_blocks(const MambaScanParams& p) { return (p.conv_dim + kMambaConvBlock - 1) / kMambaConvBlock; }
Status mamba_conv_cpu(const MambaScanParams& p, float* act, int64_t begin, int64_t end);
Status mamba_scan_cpu(const MambaScanParams& p, CpuIsa isa, const float* act, int64_t begin, int64_t end);

// CUDA: the scan and (if conv_state_out) the conv-state update, on `stream` (a cudaStream_t); async.
Status mamba_scan_cuda(const MambaScanParams& p, void* stream);
// Largest state size / head-dim combination the CUDA kernel takes (checked by the binding).
bool mamba_scan_cuda_supports(int64_t headdim, int64_t dstate);
// Whether the CUDA launch grids fit (checked before any kernel writes a state).
bool mamba_scan_cuda_grid_ok(int64_t batch, int64_t nheads);

}  // namespace tt
