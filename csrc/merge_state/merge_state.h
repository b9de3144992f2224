// Merge of partial attention states (torch-free). Given P partial outputs o_p [M, D] over disjoint key
// sets and their log-sum-exps lse_p [M], produce the output and LSE over the union:
//   m = max_p lse_p;  w_p = exp(lse_p - m);  out = sum_p w_p o_p / sum_p w_p;  lse = m + log(sum_p w_p).
// Empty parts (lse = -inf) get weight 0 and their o_p is never read, so a split that saw no keys may
// leave garbage there. A row whose parts are all empty gives out = 0, lse = -inf (never NaN).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/platform.h"

namespace tt {

struct MergeStatesParams {
  const void* o;        // [P, M, D], element strides below, last dim contiguous
  const float* lse;     // [P, M]
  void* out;            // [M, D], row stride below, last dim contiguous
  float* lse_out;       // [M], contiguous
  int64_t num_parts, num_rows, head_dim;
  int64_t o_part_stride, o_row_stride;
  int64_t lse_part_stride, lse_row_stride;
  int64_t out_row_stride;
  DType dtype;
};

// Row maximum of the LSEs; -inf when every part is empty.
TT_HOST_DEVICE float merge_max_lse(const float* lse, int64_t n, int64_t stride) {
  float m = -INFINITY;
  for (int64_t p = 0; p < n; ++p) m = fmaxf(m, lse[p * stride]);
  return m;
}

// Weight of one part relative to the row maximum; exactly 0 for an empty part.
TT_HOST_DEVICE float merge_weight(float lse_p, float m) {
  return lse_p == -INFINITY ? 0.f : expf(lse_p - m);
}

// Final LSE from the row maximum and the weight sum.
TT_HOST_DEVICE float merge_final_lse(float m, float wsum) {
  return wsum > 0.f ? m + logf(wsum) : -INFINITY;
}

// CPU: rows [row_begin, row_end); the caller parallelises over row ranges.
Status merge_states_cpu(const MergeStatesParams& p, int64_t row_begin, int64_t row_end);

// CUDA: the whole problem on `stream` (a cudaStream_t); asynchronous.
Status merge_states_cuda(const MergeStatesParams& p, void* stream);

}  // namespace tt
