// Torch-side adapter of threshold_unmask: argument checks (messages name the argument), the plan that fills the
// kernel's params struct, the CPU / CUDA entry points and their registrations. The schema is in csrc/registry.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "threshold_unmask/threshold_unmask.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"
#include "threshold_unmask/threshold_unmask_torch.h"

// ---------------------------------------------------------------------------------------------------
// threshold_unmask(logits [B,S,V] fp32|bf16, x [B,S] int64 (in place), mask_id, then per row ([B] or [1] tensors
//   on the logits' device): gamma fp32, step int32, steps_per_block int32, temperature fp32, seed int64,
//   block int64, kept int32 (optional: S); counts [B] int32 (out), done [B] bool (out), logprob [B,S] fp32 (out,
//   optional)). Per-row values live on the device so a captured CUDA graph can be replayed with new values.

namespace tt::torch_glue {

template <typename T>
tt::UnmaskRowArg<T> row_arg(const Tensor& t, at::ScalarType dtype, const char* name, const Tensor& ref,
                            const char* ref_name) {
  check_dtype(t, dtype, name);
  check_same_device(t, name, ref, ref_name);
  const int64_t B = ref.size(0);
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == B || t.size(0) == 1), "twotower: ", name, " must be a [batch] = [", B,
              "] or a [1] tensor (one value per row, or one for all), got shape ", t.sizes());
  return tt::UnmaskRowArg<T>{t.data_ptr<T>(), t.size(0) == 1 ? 0 : t.stride(0)};
}

// Points p's per-row arguments at the tensors (checked against ref's batch and device).
void set_row_args(tt::ThresholdUnmaskParams& p, const UnmaskRowTensors& r, const Tensor& ref, const char* ref_name) {
  p.gamma = row_arg<float>(r.gamma, at::kFloat, "gamma", ref, ref_name);
  p.step = row_arg<int32_t>(r.step, at::kInt, "step", ref, ref_name);
  p.steps_per_block = row_arg<int32_t>(r.steps_per_block, at::kInt, "steps_per_block", ref, ref_name);
  p.temperature = row_arg<float>(r.temperature, at::kFloat, "temperature", ref, ref_name);
  p.seed = row_arg<int64_t>(r.seed, at::kLong, "seed", ref, ref_name);
  p.block = row_arg<int64_t>(r.block, at::kLong, "block", ref, ref_name);
  p.kept = r.kept.has_value() ? row_arg<int32_t>(*r.kept, at::kInt, "kept", ref, ref_name)
                              : tt::UnmaskRowArg<int32_t>{};
}

// Raises, naming the argument and the row, if a row's value is out of range (p's per-row pointers on the host).
void check_row_values(const tt::ThresholdUnmaskParams& p, const char* where) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int32_t e = tt::unmask_row_errors(p, b);
    TORCH_CHECK_VALUE(!(e & tt::kUnmaskErrGamma), "twotower: gamma must be in [0, 1], got ", p.gamma.at(b),
                      " at row ", b, where);
    TORCH_CHECK_VALUE(!(e & tt::kUnmaskErrSteps), "twotower: steps_per_block must be >= 1, got ",
                      p.steps_per_block.at(b), " at row ", b, where);
    TORCH_CHECK_VALUE(!(e & tt::kUnmaskErrStep), "twotower: step must be in [0, steps_per_block = ",
                      p.steps_per_block.at(b), "), got ", p.step.at(b), " at row ", b, where);
    TORCH_CHECK_VALUE(!(e & tt::kUnmaskErrTemperature), "twotower: temperature must be 0 (greedy) or a positive "
                      "finite value, got ", p.temperature.at(b), " at row ", b, where);
    TORCH_CHECK_VALUE(!(e & tt::kUnmaskErrKept), "twotower: kept must be in [0, seq = ", p.seq, "], got ",
                      p.kept.at(b), " at row ", b, where);
  }
}

namespace {

// A [B] output vector.
void check_out_vector(const Tensor& t, at::ScalarType dtype, const char* name, const Tensor& ref,
                      const char* ref_name) {
  check_dtype(t, dtype, name);
  check_same_device(t, name, ref, ref_name);
  const int64_t B = ref.size(0);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.is_contiguous(), "twotower: ", name,
              " must be a contiguous [batch] = [", B, "] tensor, got shape ", t.sizes());
}

}  // namespace

tt::ThresholdUnmaskParams plan_unmask_commit(const Tensor& ref, const char* ref_name, int64_t S, int64_t V,
                                             const Tensor& x, int64_t mask_id, const UnmaskRowTensors& rows,
                                             const Tensor& counts, const Tensor& done,
                                             const std::optional<Tensor>& logprob) {
  const int64_t B = ref.size(0);
  check_dtype(x, at::kLong, "x");
  check_same_device(x, "x", ref, ref_name);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == S, "twotower: x must be [batch, seq] = [", B, ", ", S,
              "] like ", ref_name, ", got shape ", x.sizes());
  check_last_dim_contiguous(x, "x");
  check_out_vector(counts, at::kInt, "counts", ref, ref_name);
  check_out_vector(done, at::kBool, "done", ref, ref_name);
  if (logprob.has_value()) {
    check_dtype(*logprob, at::kFloat, "logprob");
    check_same_device(*logprob, "logprob", ref, ref_name);
    TORCH_CHECK(logprob->dim() == 2 && logprob->size(0) == B && logprob->size(1) == S,
                "twotower: logprob must be [batch, seq] = [", B, ", ", S, "] like ", ref_name, ", got shape ",
                logprob->sizes());
    check_last_dim_contiguous(*logprob, "logprob");
  }
  TORCH_CHECK_VALUE(mask_id >= -1 && mask_id < V, "twotower: mask_id must be in [-1, vocab = ", V,
                    ") (-1: masked positions hold -1, no id excluded), got ", mask_id);
  tt::ThresholdUnmaskParams p{};
  set_row_args(p, rows, ref, ref_name);
  p.x = x.data_ptr<int64_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.done = done.data_ptr<bool>();
  p.logprob = logprob.has_value() ? logprob->data_ptr<float>() : nullptr;
  p.batch = B;
  p.seq = S;
  p.vocab = V;
  p.x_batch_stride = x.stride(0);
  p.logprob_batch_stride = logprob.has_value() ? logprob->stride(0) : 0;
  p.mask_id = mask_id;
  return p;
}

void finish_unmask_cpu(const tt::ThresholdUnmaskParams& p, const std::vector<tt::UnmaskState>& states,
                       const std::vector<uint8_t>& bad, const char* what) {
  const int64_t ns = tt::unmask_num_slices(p);
  for (size_t i = 0; i < bad.size(); ++i) {
    const int64_t r = int64_t(i) / ns;
    TORCH_CHECK_VALUE(!bad[i], "twotower: ", what, " must not contain NaN (found at masked position batch ",
                      r / p.seq, ", seq ", r % p.seq, ")");
  }
  // The commit ranks seq positions per row (and merges their ns slice states): microseconds per row.
  tt::parallel_chunks(p.batch, p.seq * (p.seq + ns), [&](int64_t b, int64_t e) {
    check_status(tt::threshold_unmask_commit_cpu(p, states.data(), b, e), "threshold_unmask");
  });
}

}  // namespace tt::torch_glue

namespace {

using at::Tensor;
using namespace tt::torch_glue;

tt::ThresholdUnmaskParams plan_threshold_unmask(const Tensor& logits, const Tensor& x, int64_t mask_id,
                                                const UnmaskRowTensors& rows, const Tensor& counts,
                                                const Tensor& done, const std::optional<Tensor>& logprob) {
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
                   "twotower: logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, "twotower: logits must be [batch, seq, vocab] (3-D), got shape ", logits.sizes());
  const int64_t S = logits.size(1), V = logits.size(2);
  TORCH_CHECK(S >= 1 && S <= tt::kUnmaskMaxSeq, "twotower: logits' seq dim must be in [1, ", tt::kUnmaskMaxSeq,
              "], got shape ", logits.sizes());
  TORCH_CHECK(V >= 2 && V <= INT32_MAX, "twotower: logits' vocab dim must be in [2, 2^31), got shape ", logits.sizes());
  check_last_dim_contiguous(logits, "logits");
  tt::ThresholdUnmaskParams p = plan_unmask_commit(logits, "logits", S, V, x, mask_id, rows, counts, done, logprob);
  p.logits = logits.data_ptr();
  p.logits_batch_stride = logits.stride(0);
  p.logits_seq_stride = logits.stride(1);
  p.dtype = logits.scalar_type() == at::kFloat ? tt::DType::kFloat32 : tt::DType::kBFloat16;
  return p;
}

void threshold_unmask_cpu(const Tensor& logits, const Tensor& x, int64_t mask_id, const Tensor& gamma,
                          const Tensor& step, const Tensor& steps_per_block, const Tensor& temperature,
                          const Tensor& seed, const Tensor& block, const std::optional<Tensor>& kept,
                          const Tensor& counts, const Tensor& done, const std::optional<Tensor>& logprob) {
  const UnmaskRowTensors rows{gamma, step, steps_per_block, temperature, seed, block, kept};
  auto p = plan_threshold_unmask(logits, x, mask_id, rows, counts, done, logprob);
  p.slice_width = tt::kUnmaskCpuSliceWidth;
  check_row_values(p, "");
  // Phase 1 over (position, vocabulary slice) items, then the per-row merge + commit.
  const int64_t ns = tt::unmask_num_slices(p), items = p.batch * p.seq * ns;
  std::vector<tt::UnmaskState> states(items);
  std::vector<uint8_t> bad(items);
  // Each item reads slice_width logits: inline for a small vocabulary, a dynamic split for a large one.
  tt::parallel_chunks(items, p.slice_width, [&](int64_t b, int64_t e) {
    check_status(tt::threshold_unmask_scan_cpu(p, states.data(), bad.data(), b, e), "threshold_unmask");
  });
  finish_unmask_cpu(p, states, bad, "logits");
}

#ifdef TWOTOWER_WITH_CUDA
// TWOTOWER_UNMASK_DEBUG=1: synchronise after the kernel and raise on NaN logits or an out-of-range per-row value
// (not capturable). Otherwise NaN counts as -inf, a row with a bad value is left untouched with counts = -1, and
// kept is clamped to [0, seq].
bool unmask_debug() {
  const char* v = std::getenv("TWOTOWER_UNMASK_DEBUG");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

void threshold_unmask_cuda(const Tensor& logits, const Tensor& x, int64_t mask_id, const Tensor& gamma,
                           const Tensor& step, const Tensor& steps_per_block, const Tensor& temperature,
                           const Tensor& seed, const Tensor& block, const std::optional<Tensor>& kept,
                           const Tensor& counts, const Tensor& done, const std::optional<Tensor>& logprob) {
  c10::cuda::CUDAGuard guard(logits.device());
  const UnmaskRowTensors rows{gamma, step, steps_per_block, temperature, seed, block, kept};
  auto p = plan_threshold_unmask(logits, x, mask_id, rows, counts, done, logprob);
  p.slice_width = tt::kUnmaskCudaSliceWidth;
  auto ws = at::empty({tt::threshold_unmask_cuda_workspace_bytes(p)}, logits.options().dtype(at::kByte));
  check_status(tt::threshold_unmask_cuda(p, ws.data_ptr(), current_stream(logits)), "threshold_unmask");
  if (unmask_debug()) {
    const int32_t err = ws.narrow(0, p.batch * 4, 4).view(at::kInt).item<int32_t>();
    if (err & ~tt::kUnmaskErrNaN) {   // name the argument and the row from host copies of the per-row values
      const Tensor g = gamma.cpu(), st = step.cpu(), spb = steps_per_block.cpu(), t = temperature.cpu();
      const Tensor sd = seed.cpu(), bl = block.cpu();
      const std::optional<Tensor> kp = kept.has_value() ? std::optional<Tensor>(kept->cpu()) : std::nullopt;
      const Tensor host_logits = at::empty({p.batch, 1, 1}, logits.options().device(at::kCPU));
      tt::ThresholdUnmaskParams q = p;
      set_row_args(q, UnmaskRowTensors{g, st, spb, t, sd, bl, kp}, host_logits, "logits");
      check_row_values(q, " (TWOTOWER_UNMASK_DEBUG check)");
    }
    TORCH_CHECK_VALUE(!(err & tt::kUnmaskErrNaN), "twotower: logits must not contain NaN at masked positions "
                      "(TWOTOWER_UNMASK_DEBUG check)");
  }
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("threshold_unmask", &threshold_unmask_cpu); }
#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) { m.impl("threshold_unmask", &threshold_unmask_cuda); }
#endif
