// See cpu_gemm_torch.h.
#include "common/cpu_gemm_torch.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

namespace tt::torch_glue {
namespace {

void sgemm(void*, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
           bool trans_b, float* C, int64_t ldc, bool accumulate) {
  auto a = at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, at::kFloat);
  auto b = trans_b ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, at::kFloat).t()
                   : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, at::kFloat);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, at::kFloat);
  accumulate ? at::addmm_out(c, c, a, b) : at::mm_out(c, a, b);
}

}  // namespace

CpuGemm cpu_sgemm() {
  CpuGemm g;
  g.fn = &sgemm;
  return g;
}

}  // namespace tt::torch_glue
