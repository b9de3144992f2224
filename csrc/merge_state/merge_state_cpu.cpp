#include <vector>

#include "common/half_cpu.h"
#include "merge_state/merge_state.h"

namespace tt {
namespace {

template <typename T>
void merge_rows(const MergeStatesParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t D = p.head_dim;
  std::vector<float> acc(D);
  const T* o = static_cast<const T*>(p.o);
  T* out = static_cast<T*>(p.out);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* lse = p.lse + r * p.lse_row_stride;
    const float m = merge_max_lse(lse, p.num_parts, p.lse_part_stride);
    float wsum = 0.f;
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
    if (m != -INFINITY) {
      for (int64_t q = 0; q < p.num_parts; ++q) {
        const float w = merge_weight(lse[q * p.lse_part_stride], m);
        if (w == 0.f) continue;  // empty part: its output is never read
        wsum += w;
        const T* src = o + q * p.o_part_stride + r * p.o_row_stride;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * to_float(src[d]);
      }
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    T* dst = out + r * p.out_row_stride;
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[d] * inv);
    p.lse_out[r] = merge_final_lse(m, wsum);
  }
}

}  // namespace

Status merge_states_cpu(const MergeStatesParams& p, int64_t row_begin, int64_t row_end) {
  switch (p.dtype) {
    case DType::kFloat32: merge_rows<float>(p, row_begin, row_end); break;
    case DType::kBFloat16: merge_rows<bf16_t>(p, row_begin, row_end); break;
    case DType::kFloat16: merge_rows<fp16_t>(p, row_begin, row_end); break;
    default: return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

}  // namespace tt
