// CUDA scan: one CTA per (batch row, head). The head's state [P, N] stays in registers for the whole
// block: P rows x `tpp` threads per row, each thread holding up to kMaxNPerThread state columns
// (n = lane + k*tpp, so neighbouring lanes read neighbouring shared-memory words). Per chunk of tokens
// the CTA first computes the activated conv outputs x, dt*B, C into shared memory, then every thread
// advances its state slice token by token and the row's y is reduced over its tpp lanes with shuffles.
// A second small kernel writes the final conv state once every CTA has read the old one (in-place safe).
#include <cuda_runtime.h>

#include "mamba_scan/mamba_scan.h"

namespace tt {
namespace {

constexpr int kMaxNPerThread = 16;
constexpr int kMaxThreads = 512;  // 128 registers per thread: the state slice stays in registers
constexpr int kMaxChunk = 16;
constexpr int kSmemBudget = 48 * 1024;

// Threads per state row: the smallest power of two (<= 32, so a row's lanes share a warp) that leaves at
// most kMaxNPerThread columns per thread.
int threads_per_row(int64_t dstate) {
  int tpp = 1;
  while (tpp < 32 && (dstate + tpp - 1) / tpp > kMaxNPerThread) tpp *= 2;
  return tpp;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) mamba_scan_kernel(MambaScanParams p, int tpp, int chunk) {
  extern __shared__ float smem[];
  const int P = int(p.headdim), N = int(p.dstate), width = P + 2 * N;
  float* s_xbc = smem;                   // [chunk][x (P) | dt*B (N) | C (N)]
  float* s_dt = smem + chunk * width;    // [chunk]
  const int64_t b = blockIdx.x / p.nheads, h = blockIdx.x % p.nheads;
  const int tid = threadIdx.x, row = tid / tpp, lane = tid % tpp;
  const bool active = row < P;
  const int64_t len = mamba_row_len(p, b);
  const int64_t xc = mamba_x_channel(p, h), bc = mamba_b_channel(p, h), cc = mamba_c_channel(p, h);
  const T* dt_raw = static_cast<const T*>(p.dt);
  T* y = static_cast<T*>(p.y);

  float S[kMaxNPerThread];
  const float* s_in = p.ssm_state_in + b * p.ssm_in_batch_stride + (h * P + (active ? row : 0)) * N;
#pragma unroll
  for (int k = 0; k < kMaxNPerThread; ++k) {
    const int n = lane + k * tpp;
    S[k] = (active && n < N) ? s_in[n] : 0.f;
  }
  const float A = -expf(p.A_log[h]), Dh = p.D[h];

  for (int64_t t0 = 0; t0 < len; t0 += chunk) {
    const int nt = int(len - t0 < chunk ? len - t0 : chunk);
    __syncthreads();  // the previous chunk's shared values are consumed
    for (int i = tid; i < nt; i += blockDim.x)
      s_dt[i] = mamba_dt(to_float(dt_raw[b * p.dt_batch_stride + (t0 + i) * p.dt_tok_stride + h]), p.dt_bias[h],
                         p.dt_min, p.dt_max);
    __syncthreads();
    for (int i = tid; i < nt * width; i += blockDim.x) {
      const int tt = i / width, c = i % width;
      float v;
      if (c < P) v = mamba_conv_silu<T>(p, b, t0 + tt, xc + c);
      else if (c < P + N) v = s_dt[tt] * mamba_conv_silu<T>(p, b, t0 + tt, bc + (c - P));
      else v = mamba_conv_silu<T>(p, b, t0 + tt, cc + (c - P - N));
      s_xbc[i] = v;
    }
    __syncthreads();
    for (int tt = 0; tt < nt; ++tt) {
      const float dA = expf(s_dt[tt] * A);
      const float* r = s_xbc + tt * width;
      const float xp = active ? r[row] : 0.f;
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < kMaxNPerThread; ++k) {
        const int n = lane + k * tpp;
        if (n < N) {
          S[k] = S[k] * dA + r[P + n] * xp;
          acc += S[k] * r[P + N + n];
        }
      }
      for (int off = tpp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (active && lane == 0) y[((b * p.seqlen + t0 + tt) * p.nheads + h) * P + row] = from_float<T>(acc + Dh * xp);
    }
  }
  for (int64_t i = tid; i < (p.seqlen - len) * P; i += blockDim.x) {
    const int64_t t = len + i / P;
    y[((b * p.seqlen + t) * p.nheads + h) * P + i % P] = from_float<T>(0.f);
  }
  if (p.ssm_state_out != nullptr && active) {
    float* s_out = p.ssm_state_out + b * p.ssm_out_batch_stride + (h * P + row) * N;
#pragma unroll
    for (int k = 0; k < kMaxNPerThread; ++k) {
      const int n = lane + k * tpp;
      if (n < N) s_out[n] = S[k];
    }
  }
}

// New conv-state row j = concatenation row len + j; one thread per (row, channel), increasing j, so an
// in-place state is read before it is overwritten. Rows stride over grid.y (at most 65535), so any batch runs.
template <typename T>
__global__ void mamba_conv_state_kernel(MambaScanParams p) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.conv_dim) return;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const int64_t len = mamba_row_len(p, b);
    T* out = static_cast<T*>(p.conv_state_out) + b * p.cs_out_batch_stride + c;
    for (int64_t j = 0; j < p.kernel - 1; ++j)
      out[j * p.cs_out_tap_stride] = from_float<T>(mamba_conv_input<T>(p, b, len + j, c));
  }
}

template <typename T>
Status launch(const MambaScanParams& p, cudaStream_t s) {
  const int tpp = threads_per_row(p.dstate);
  const int threads = int((p.headdim * tpp + 31) / 32 * 32);
  const int width = int(p.headdim + 2 * p.dstate);
  int chunk = kSmemBudget / int(sizeof(float) * (width + 1));
  chunk = chunk < 1 ? 1 : (chunk > kMaxChunk ? kMaxChunk : chunk);
  const size_t smem = sizeof(float) * size_t(chunk) * (width + 1);
  // Every grid is checked before the first launch: the scan writes the SSM state (maybe in place), so a
  // refusal after it would leave the states half updated.
  if (!mamba_scan_cuda_grid_ok(p.batch, p.nheads)) return Status::kUnsupportedShape;
  if (p.batch * p.nheads > 0) {
    mamba_scan_kernel<T><<<unsigned(p.batch * p.nheads), threads, smem, s>>>(p, tpp, chunk);
    if (cudaGetLastError() != cudaSuccess) return Status::kLaunchFailed;
  }
  if (p.conv_state_out != nullptr && p.batch > 0 && p.kernel > 1) {
    const dim3 grid(unsigned((p.conv_dim + 255) / 256), unsigned(p.batch < 65535 ? p.batch : 65535));
    mamba_conv_state_kernel<T><<<grid, 256, 0, s>>>(p);
    if (cudaGetLastError() != cudaSuccess) return Status::kLaunchFailed;
  }
  return Status::kOk;
}

}  // namespace

// One scan CTA per (row, head) on grid.x; the conv-state kernel strides over rows, so it has no batch limit.
bool mamba_scan_cuda_grid_ok(int64_t batch, int64_t nheads) { return batch * nheads <= 0x7fffffff; }

bool mamba_scan_cuda_supports(int64_t headdim, int64_t dstate) {
  const int64_t tpp = threads_per_row(dstate);
  return (dstate + tpp - 1) / tpp <= kMaxNPerThread && headdim * tpp <= kMaxThreads &&
         headdim + 2 * dstate <= kSmemBudget / int64_t(sizeof(float)) - 1;
}

Status mamba_scan_cuda(const MambaScanParams& p, void* stream) {
  if (!mamba_scan_cuda_supports(p.headdim, p.dstate)) return Status::kUnsupportedShape;
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, s);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, s);
    case DType::kFloat16: return launch<__half>(p, s);
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace tt
