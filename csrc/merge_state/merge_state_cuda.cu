// One warp per output row; lanes stride over the head dim so loads and stores are coalesced.
#include <cuda_runtime.h>

#include "common/half_cuda.cuh"
#include "merge_state/merge_state.h"

namespace tt {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void merge_states_kernel(MergeStatesParams p) {
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= p.num_rows) return;
  const float* lse = p.lse + r * p.lse_row_stride;
  const float m = merge_max_lse(lse, p.num_parts, p.lse_part_stride);
  const T* o = static_cast<const T*>(p.o);
  T* dst = static_cast<T*>(p.out) + r * p.out_row_stride;
  float wsum = 0.f;
  if (m != -INFINITY) {
    for (int64_t q = 0; q < p.num_parts; ++q) wsum += merge_weight(lse[q * p.lse_part_stride], m);
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  for (int64_t d = threadIdx.x; d < p.head_dim; d += 32) {
    float acc = 0.f;
    if (m != -INFINITY) {
      for (int64_t q = 0; q < p.num_parts; ++q) {
        const float w = merge_weight(lse[q * p.lse_part_stride], m);
        if (w != 0.f) acc += w * to_float(o[q * p.o_part_stride + r * p.o_row_stride + d]);
      }
    }
    dst[d] = from_float<T>(acc * inv);
  }
  if (threadIdx.x == 0) p.lse_out[r] = merge_final_lse(m, wsum);
}

}  // namespace

Status merge_states_cuda(const MergeStatesParams& p, void* stream) {
  if (p.num_rows == 0) return Status::kOk;
  const dim3 block(32, kWarpsPerBlock);
  const dim3 grid(unsigned((p.num_rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: merge_states_kernel<float><<<grid, block, 0, s>>>(p); break;
    case DType::kBFloat16: merge_states_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(p); break;
    case DType::kFloat16: merge_states_kernel<__half><<<grid, block, 0, s>>>(p); break;
    default: return Status::kUnsupportedDType;
  }
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace tt
