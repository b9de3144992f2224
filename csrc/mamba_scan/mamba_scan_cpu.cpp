// CPU scan: one (batch row, head) per work item; the state [P, N] lives in a local buffer for the whole
// block, so each token costs one pass over it (update + C contraction fused).
#include <vector>

#include "mamba_scan/mamba_scan.h"

namespace tt {
namespace {

// Dot product with 8 independent partial sums: vectorisable without reassociating flags, deterministic.
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Raw xBC row j of the concatenation [conv_state_in | xBC] of batch row b.
template <typename T>
const T* concat_row(const MambaScanParams& p, int64_t b, int64_t j) {
  const int64_t hist = p.kernel - 1;
  return j < hist ? static_cast<const T*>(p.conv_state_in) + b * p.cs_in_batch_stride + j * p.cs_in_tap_stride
                  : static_cast<const T*>(p.xbc) + b * p.xbc_batch_stride + (j - hist) * p.xbc_tok_stride;
}

template <typename T>
void scan_items(const MambaScanParams& p, int64_t begin, int64_t end) {
  const int64_t P = p.headdim, N = p.dstate, H = p.nheads, K = p.kernel, W = P + 2 * N;
  // The item's conv channels, packed [x (P) | B (N) | C (N)], with their weights transposed to [K][W] so
  // the per-token conv is a handful of contiguous multiply-add loops (same tap order as mamba_conv_silu).
  std::vector<float> wT(K * W), bias(W), act(W), S(P * N), dB(N);
  T* y = static_cast<T*>(p.y);
  const T* dt_raw = static_cast<const T*>(p.dt);
  const T* w = static_cast<const T*>(p.conv_weight);
  const T* cb = static_cast<const T*>(p.conv_bias);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / H, h = item % H;
    const int64_t len = mamba_row_len(p, b);
    const int64_t seg_chan[3] = {mamba_x_channel(p, h), mamba_b_channel(p, h), mamba_c_channel(p, h)};
    const int64_t seg_off[3] = {0, P, P + N}, seg_len[3] = {P, N, N};
    for (int s = 0; s < 3; ++s) {
      for (int64_t i = 0; i < seg_len[s]; ++i) {
        const int64_t c = seg_chan[s] + i, o = seg_off[s] + i;
        bias[o] = cb != nullptr ? to_float(cb[c]) : 0.f;
        for (int64_t k = 0; k < K; ++k) wT[k * W + o] = to_float(w[c * K + k]);
      }
    }
    const float* s_in = p.ssm_state_in + b * p.ssm_in_batch_stride + h * P * N;
    for (int64_t i = 0; i < P * N; ++i) S[i] = s_in[i];
    const float A = -expf(p.A_log[h]), Dh = p.D[h];
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t i = 0; i < W; ++i) act[i] = bias[i];
      for (int64_t k = 0; k < K; ++k) {
        const T* row = concat_row<T>(p, b, t + k);
        const float* wk = wT.data() + k * W;
        for (int s = 0; s < 3; ++s) {
          const T* src = row + seg_chan[s];
          float* a = act.data() + seg_off[s];
          const float* ws = wk + seg_off[s];
          for (int64_t i = 0; i < seg_len[s]; ++i) a[i] += ws[i] * to_float(src[i]);
        }
      }
      for (int64_t i = 0; i < W; ++i) act[i] = to_float(from_float<T>(mamba_silu(act[i])));
      const float dt = mamba_dt(to_float(dt_raw[b * p.dt_batch_stride + t * p.dt_tok_stride + h]), p.dt_bias[h],
                                p.dt_min, p.dt_max);
      const float dA = expf(dt * A);
      const float* x = act.data();
      const float* C = act.data() + P + N;
      for (int64_t n = 0; n < N; ++n) dB[n] = dt * act[P + n];
      T* y_t = y + (b * p.seqlen + t) * H * P + h * P;
      for (int64_t i = 0; i < P; ++i) {
        float* s = S.data() + i * N;
        const float xi = x[i];
        for (int64_t n = 0; n < N; ++n) s[n] = s[n] * dA + dB[n] * xi;
        y_t[i] = from_float<T>(dot(s, C, N) + Dh * xi);
      }
    }
    for (int64_t t = len; t < p.seqlen; ++t) {
      T* y_t = y + (b * p.seqlen + t) * H * P + h * P;
      for (int64_t i = 0; i < P; ++i) y_t[i] = from_float<T>(0.f);
    }
    if (p.ssm_state_out != nullptr) {
      float* s_out = p.ssm_state_out + b * p.ssm_out_batch_stride + h * P * N;
      for (int64_t i = 0; i < P * N; ++i) s_out[i] = S[i];
    }
  }
}

// New row j of the conv state = concatenation row len + j. Increasing j reads rows at or after the one it
// writes, so an aliased (in-place) state is never read after being overwritten.
template <typename T>
void conv_state_rows(const MambaScanParams& p, int64_t begin, int64_t end) {
  const int64_t hist = p.kernel - 1;
  T* out = static_cast<T*>(p.conv_state_out);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t len = mamba_row_len(p, b);
    for (int64_t j = 0; j < hist; ++j) {
      T* dst = out + b * p.cs_out_batch_stride + j * p.cs_out_tap_stride;
      for (int64_t c = 0; c < p.conv_dim; ++c) dst[c] = from_float<T>(mamba_conv_input<T>(p, b, len + j, c));
    }
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

template <typename T> struct ScanFn { static void run(const MambaScanParams& p, int64_t b, int64_t e) { scan_items<T>(p, b, e); } };
template <typename T> struct ConvFn { static void run(const MambaScanParams& p, int64_t b, int64_t e) { conv_state_rows<T>(p, b, e); } };

}  // namespace

Status mamba_scan_cpu(const MambaScanParams& p, int64_t begin, int64_t end) {
  return dispatch<ScanFn>(p.dtype, p, begin, end);
}

Status mamba_conv_state_update_cpu(const MambaScanParams& p, int64_t begin, int64_t end) {
  if (p.conv_state_out == nullptr) return Status::kOk;
  return dispatch<ConvFn>(p.dtype, p, begin, end);
}

}  // namespace tt
