// Torch-side adapter of threshold_unmask: argument checks (messages name the argument), the plan that fills the
// kernel's params struct, the CPU / CUDA entry points and their registrations. The schema is in csrc/registry.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "threshold_unmask/threshold_unmask.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

// ---------------------------------------------------------------------------------------------------
// threshold_unmask(logits [B,S,V] fp32|bf16, x [B,S] int64 (in place), mask_id, gamma, step [1] int64,
//   steps_per_block, temperature, seed [1] int64, offset [1] int64, counts [B] int32 (out), done [B] bool (out))
// step/seed/offset live on the logits' device so a captured CUDA graph can be replayed with new values.

void check_unmask_scalar(const Tensor& t, const char* name, const Tensor& logits) {
  check_dtype(t, at::kLong, name);
  TORCH_CHECK(t.numel() == 1, "twotower: ", name, " must hold one value (0-d or [1]), got shape ", t.sizes());
  check_same_device(t, name, logits, "logits");
}

tt::ThresholdUnmaskParams plan_threshold_unmask(const Tensor& logits, const Tensor& x, int64_t mask_id, double gamma,
                                                const Tensor& step, int64_t steps_per_block, double temperature,
                                                const Tensor& seed, const Tensor& offset, const Tensor& counts,
                                                const Tensor& done) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
                   "twotower: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, "twotower: logits must be [batch, seq, vocab] (3-D), got shape ", logits.sizes());
  const int64_t B = logits.size(0), S = logits.size(1), V = logits.size(2);
  TORCH_CHECK(S >= 1 && S <= tt::kUnmaskMaxSeq, "twotower: logits' seq dim must be in [1, ", tt::kUnmaskMaxSeq,
              "], got shape ", logits.sizes());
  TORCH_CHECK(V >= 2 && V <= INT32_MAX, "twotower: logits' vocab dim must be in [2, 2^31), got shape ", logits.sizes());
  check_last_dim_contiguous(logits, "logits");
  check_dtype(x, at::kLong, "x");
  check_same_device(x, "x", logits, "logits");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == S, "twotower: x must be [batch, seq] = [", B, ", ", S,
              "] like logits, got shape ", x.sizes());
  check_last_dim_contiguous(x, "x");
  check_unmask_scalar(step, "step", logits);
  check_unmask_scalar(seed, "seed", logits);
  check_unmask_scalar(offset, "offset", logits);
  check_dtype(counts, at::kInt, "counts");
  check_same_device(counts, "counts", logits, "logits");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == B && counts.is_contiguous(),
              "twotower: counts must be a contiguous [batch] = [", B, "] tensor, got shape ", counts.sizes());
  check_dtype(done, at::kBool, "done");
  check_same_device(done, "done", logits, "logits");
  TORCH_CHECK(done.dim() == 1 && done.size(0) == B && done.is_contiguous(),
              "twotower: done must be a contiguous [batch] = [", B, "] tensor, got shape ", done.sizes());
  TORCH_CHECK_VALUE(mask_id >= 0 && mask_id < V, "twotower: mask_id must be in [0, vocab = ", V, "), got ", mask_id);
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "twotower: gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(steps_per_block >= 1 && steps_per_block <= INT32_MAX,
                    "twotower: steps_per_block must be >= 1, got ", steps_per_block);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0.0 && (temperature == 0.0 || float(temperature) > 0.f),
                    "twotower: temperature must be 0 (greedy) or a positive finite float32 value, got ", temperature);
  tt::ThresholdUnmaskParams p{};
  p.logits = logits.data_ptr();
  p.x = x.data_ptr<int64_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.done = done.data_ptr<bool>();
  p.step = step.data_ptr<int64_t>();
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset.data_ptr<int64_t>();
  p.batch = B;
  p.seq = S;
  p.vocab = V;
  p.logits_batch_stride = logits.stride(0);
  p.logits_seq_stride = logits.stride(1);
  p.x_batch_stride = x.stride(0);
  p.mask_id = mask_id;
  p.gamma = float(gamma);
  p.steps_per_block = int32_t(steps_per_block);
  p.temperature = float(temperature);
  p.dtype = logits.scalar_type() == at::kFloat ? tt::DType::kFloat32 : tt::DType::kBFloat16;
  return p;
}

void threshold_unmask_cpu(const Tensor& logits, const Tensor& x, int64_t mask_id, double gamma, const Tensor& step,
                          int64_t steps_per_block, double temperature, const Tensor& seed, const Tensor& offset,
                          const Tensor& counts, const Tensor& done) {
  auto p = plan_threshold_unmask(logits, x, mask_id, gamma, step, steps_per_block, temperature, seed, offset, counts,
                                 done);
  p.slice_width = tt::kUnmaskCpuSliceWidth;
  const int64_t step_value = *p.step;
  TORCH_CHECK_VALUE(step_value >= 0 && step_value < steps_per_block, "twotower: step must be in [0, steps_per_block = ",
                    steps_per_block, "), got ", step_value);
  // Phase 1 over (position, vocabulary slice) items, then the per-row merge + commit.
  const int64_t ns = tt::unmask_num_slices(p), items = p.batch * p.seq * ns;
  std::vector<tt::UnmaskState> states(items);
  std::vector<uint8_t> bad(items);
  // Each item reads slice_width logits: inline for a small vocabulary, a dynamic split for a large one.
  tt::parallel_chunks(items, p.slice_width, [&](int64_t b, int64_t e) {
    check_status(tt::threshold_unmask_scan_cpu(p, states.data(), bad.data(), b, e), "threshold_unmask");
  });
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / ns;
    TORCH_CHECK_VALUE(!bad[i], "twotower: logits must not contain NaN (found at masked position batch ", r / p.seq,
                      ", seq ", r % p.seq, ")");
  }
  // The commit ranks seq positions per row (and merges their ns slice states): microseconds per row.
  tt::parallel_chunks(p.batch, p.seq * (p.seq + ns), [&](int64_t b, int64_t e) {
    check_status(tt::threshold_unmask_commit_cpu(p, states.data(), b, e), "threshold_unmask");
  });
}

#ifdef TWOTOWER_WITH_CUDA
// TWOTOWER_UNMASK_DEBUG=1: synchronise after the kernel and raise on NaN logits or an out-of-range step
// (not capturable). Otherwise NaN counts as -inf and a bad step leaves x untouched with counts = -1.
bool unmask_debug() {
  const char* v = std::getenv("TWOTOWER_UNMASK_DEBUG");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

void threshold_unmask_cuda(const Tensor& logits, const Tensor& x, int64_t mask_id, double gamma, const Tensor& step,
                           int64_t steps_per_block, double temperature, const Tensor& seed, const Tensor& offset,
                           const Tensor& counts, const Tensor& done) {
  c10::cuda::CUDAGuard guard(logits.device());
  auto p = plan_threshold_unmask(logits, x, mask_id, gamma, step, steps_per_block, temperature, seed, offset, counts,
                                 done);
  p.slice_width = tt::kUnmaskCudaSliceWidth;
  auto ws = at::empty({tt::threshold_unmask_cuda_workspace_bytes(p)}, logits.options().dtype(at::kByte));
  check_status(tt::threshold_unmask_cuda(p, ws.data_ptr(), current_stream(logits)), "threshold_unmask");
  if (unmask_debug()) {
    const int32_t err = ws.narrow(0, p.batch * 4, 4).view(at::kInt).item<int32_t>();
    TORCH_CHECK_VALUE(!(err & tt::kUnmaskErrNaN), "twotower: logits must not contain NaN at masked positions "
                      "(TWOTOWER_UNMASK_DEBUG check)");
    TORCH_CHECK_VALUE(!(err & tt::kUnmaskErrStep), "twotower: step must be in [0, steps_per_block = ", steps_per_block,
                      "), got ", step.item<int64_t>(), " (TWOTOWER_UNMASK_DEBUG check)");
  }
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("threshold_unmask", &threshold_unmask_cpu); }
#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) { m.impl("threshold_unmask", &threshold_unmask_cuda); }
#endif
