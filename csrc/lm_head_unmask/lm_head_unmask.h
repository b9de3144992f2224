// The denoiser's LM head fused with the commit step, on the CPU (torch-free): threshold_unmask(hidden @ W^T, x, ...)
// without the [B, S, V] logits ever in memory (docs/semantics.md: where the denoiser's logits come from).
//
// Why: at V = 131072 the logits of a 16-position block are 8 MB (fp32) per row, written by the linear and read back
// by the commit's scan. Fused, each work item computes one vocabulary slice (kUnmaskCpuSliceWidth, the commit
// scan's slice) of the logits of a group of positions into a per-thread scratch that stays in L2 and scans it there;
// committed positions are neither computed nor scanned, so the head gets cheaper as a block fills. The price: the
// head's weight is read once per group (lm_head_unmask_group_rows positions: 32 fp32, 64 bf16), where the unfused
// linear reads it once per call.
//
// Work items: (slice, group of positions), slice-major. The positions are every masked one (x == mask_id), or every
// position when the logits are asked for too (logits_out: the runner's top-logprob requests). Each group's hidden
// rows are gathered (one contiguous copy per call; for AMX linear_amx_pad_x's layout of it).
//
// Numerics, bit for bit those of ops.linear then ops.threshold_unmask on the same instruction set:
// - logits: linear_cpu_panels of the micro kernel (linear.h) for the slice's columns (linear_columns) and the
//   group's rows, rounded to the head's dtype exactly like the linear's output (bf16: once, from the fp32 sum);
//   per output the same fp32 sum in the same order as the whole call, whatever the rows or panels of the call.
//   ops.linear sends large M to the matrix library instead (linear_cpu_plan: M = B * S > 1024 fp32, > 512 bf16 with
//   bf16 dot products, > 128 widened bf16), whose sums round differently: the fused op always runs the micro kernel,
//   so at those batch sizes its logits (and a commit on a near tie) can differ from ops.linear's, and they do not
//   depend on the batch size at all.
// - the scan: threshold_unmask_scan_slice_cpu on the slice (fp32, or bf16 widened exactly: the values the unfused
//   path's .float() gives), then threshold_unmask_commit_cpu: the same code as threshold_unmask, so the same tokens,
//   counts, done flags and logprobs. NaN in a masked position's logits (from NaN in its hidden row or in W) is
//   reported like threshold_unmask's NaN logits.
// There is no CUDA kernel: on CUDA ops.lm_head_unmask composes F.linear and threshold_unmask's kernel.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/platform.h"
#include "linear/linear.h"
#include "threshold_unmask/threshold_unmask.h"

namespace tt {

// A group's slice of logits in the scratch: rows x kUnmaskCpuSliceWidth in the head's dtype, kept within L2.
constexpr int64_t kLmHeadScratchBytes = int64_t(1) << 20;

struct LmHeadUnmaskParams {
  ThresholdUnmaskParams unmask;  // the commit step (logits unused; dtype the head's; slice_width kUnmaskCpuSliceWidth)
  LinearParams head;             // x: the gathered hidden rows [num_rows, K] contiguous (and x_amx: their AMX copy,
                                 // rows padded to a multiple of 16), w: the packed LM head, N = V; y: logits_out
                                 // [B * S, V] in the head's dtype (rows y_stride apart) or null (not asked for)
  CpuIsa isa;                    // the micro kernel's instruction set (linear_cpu_plan's)
  const int32_t* rows;           // the positions computed, b * S + s ascending (lm_head_unmask_rows)
  int64_t num_rows;
};

// The positions the op computes into rows (room for B * S): every one when head.y is set, else the masked ones.
// Returns how many.
int64_t lm_head_unmask_rows(const LmHeadUnmaskParams& p, int32_t* rows);

// Rows of a work item: a multiple of 16 (an AMX row tile starts every group) whose slice fits kLmHeadScratchBytes.
int64_t lm_head_unmask_group_rows(DType dt);

// Work items of phase 1 (groups x slices).
int64_t lm_head_unmask_items(const LmHeadUnmaskParams& p);

// Phase 1, items [item_begin, item_end): the slice's logits of the group's rows, then the scan of its masked
// positions into states / bad, laid out as threshold_unmask_scan_cpu's ((b * S + s) * num_slices + slice; other
// entries untouched). Phase 2 is threshold_unmask_commit_cpu on p.unmask.
Status lm_head_unmask_scan_cpu(const LmHeadUnmaskParams& p, UnmaskState* states, uint8_t* bad, int64_t item_begin,
                               int64_t item_end);

}  // namespace tt
