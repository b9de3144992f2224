// Torch-side pieces of threshold_unmask that the fused LM head + commit op (lm_head_unmask_torch.cpp) shares: the
// checks of the commit arguments (x, the per-row tensors, counts, done, logprob; messages name the argument), and
// the CPU's phase 2 (NaN report, then the per-row merge + commit rule over threads).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "threshold_unmask/threshold_unmask.h"

namespace tt::torch_glue {

// The per-row tensors, in the order of the schemas ([B] or [1], on the op's device).
struct UnmaskRowTensors {
  const at::Tensor& gamma;
  const at::Tensor& step;
  const at::Tensor& steps_per_block;
  const at::Tensor& temperature;
  const at::Tensor& seed;
  const at::Tensor& block;
  const std::optional<at::Tensor>& kept;
};

// Points p's per-row arguments at the tensors, checked against ref's batch (dim 0) and device (messages name
// ref_name).
void set_row_args(tt::ThresholdUnmaskParams& p, const UnmaskRowTensors& r, const at::Tensor& ref,
                  const char* ref_name);

// Raises, naming the argument and the row, if a row's value is out of range (p's per-row pointers on the host).
void check_row_values(const tt::ThresholdUnmaskParams& p, const char* where);

// Checks the commit arguments of a [B = ref.size(0), S] block over a vocabulary of V against ref (its device;
// messages name ref_name) and fills every field of the params but the logits' (logits, strides, dtype) and
// slice_width.
tt::ThresholdUnmaskParams plan_unmask_commit(const at::Tensor& ref, const char* ref_name, int64_t S, int64_t V,
                                             const at::Tensor& x, int64_t mask_id, const UnmaskRowTensors& rows,
                                             const at::Tensor& counts, const at::Tensor& done,
                                             const std::optional<at::Tensor>& logprob);

// CPU phase 2 after phase 1 filled states / bad (item = (b * S + s) * num_slices + slice): raises if a scanned
// logit was NaN (naming `what` and the position), else merges and commits every row (threads over rows).
void finish_unmask_cpu(const tt::ThresholdUnmaskParams& p, const std::vector<tt::UnmaskState>& states,
                       const std::vector<uint8_t>& bad, const char* what);

}  // namespace tt::torch_glue
