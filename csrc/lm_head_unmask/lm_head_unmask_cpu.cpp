// The fused LM head + commit scan on the CPU (lm_head_unmask.h): per work item, the linear's micro kernel into a
// per-thread scratch (or straight into logits_out), then threshold_unmask's slice scan on it.
#include <algorithm>

#include "common/call_scratch_cpu.h"
#include "lm_head_unmask/lm_head_unmask.h"

namespace tt {
namespace {

inline int64_t elem_bytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }
inline int64_t num_groups(const LmHeadUnmaskParams& p) {
  const int64_t g = lm_head_unmask_group_rows(p.head.dtype);
  return (p.num_rows + g - 1) / g;
}

struct ScratchTag {};

}  // namespace

int64_t lm_head_unmask_rows(const LmHeadUnmaskParams& p, int32_t* rows) {
  const ThresholdUnmaskParams& u = p.unmask;
  int64_t n = 0;
  for (int64_t b = 0; b < u.batch; ++b)
    for (int64_t s = 0; s < u.seq; ++s)
      if (p.head.y != nullptr || u.x[b * u.x_batch_stride + s] == u.mask_id) rows[n++] = int32_t(b * u.seq + s);
  return n;
}

int64_t lm_head_unmask_group_rows(DType dt) {
  return kLmHeadScratchBytes / (kUnmaskCpuSliceWidth * elem_bytes(dt)) / 16 * 16;
}

int64_t lm_head_unmask_items(const LmHeadUnmaskParams& p) {
  return num_groups(p) * unmask_num_slices(p.unmask);
}

Status lm_head_unmask_scan_cpu(const LmHeadUnmaskParams& p, UnmaskState* states, uint8_t* bad, int64_t item_begin,
                               int64_t item_end) {
  const ThresholdUnmaskParams& u = p.unmask;
  if (u.seq > kUnmaskMaxSeq || u.vocab > INT32_MAX || u.slice_width % kLinearPanel != 0 || u.dtype != p.head.dtype)
    return Status::kUnsupportedShape;
  if (u.dtype != DType::kFloat32 && u.dtype != DType::kBFloat16) return Status::kUnsupportedDType;
  const int64_t ns = unmask_num_slices(u), groups = num_groups(p), group = lm_head_unmask_group_rows(u.dtype);
  const int64_t elem = elem_bytes(u.dtype), ld_amx = linear_amx_ld(p.head.K);
  // Without logits_out the slice's logits go to this thread's scratch ([group, slice_width], kept across calls).
  CallScratch<char, ScratchTag> scratch(p.head.y != nullptr ? 0 : size_t(group * u.slice_width * elem));
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t slice = item / groups, r0 = item % groups * group, r1 = std::min(p.num_rows, r0 + group);
    const int64_t lo = slice * u.slice_width, hi = std::min(u.vocab, lo + u.slice_width);
    LinearParams h = linear_columns(p.head, lo, hi - lo);
    h.M = r1 - r0;
    h.x = static_cast<const char*>(p.head.x) + r0 * p.head.x_stride * elem;
    if (p.head.x_amx != nullptr) h.x_amx = p.head.x_amx + r0 * ld_amx;   // r0: a multiple of 16
    if (p.head.y != nullptr) {   // every position is computed: group row i is position r0 + i
      h.y = static_cast<char*>(p.head.y) + (r0 * p.head.y_stride + lo) * elem;
    } else {
      h.y = scratch.data();
      h.y_stride = u.slice_width;
    }
    linear_cpu_panels(p.isa, h, 0, linear_panels(h.N));
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t r = p.rows[i], b = r / u.seq, s = r % u.seq;
      if (u.x[b * u.x_batch_stride + s] != u.mask_id) continue;   // logits_out only
      bool has_nan = false;
      const char* at = static_cast<const char*>(h.y) + (i - r0) * h.y_stride * elem;
      states[r * ns + slice] = threshold_unmask_scan_slice_cpu(u, at, b, s, lo, hi, &has_nan);
      bad[r * ns + slice] = has_nan;
    }
  }
  return Status::kOk;
}

}  // namespace tt
