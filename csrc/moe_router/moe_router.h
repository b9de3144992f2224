// The MoE router of NVIDIA's NemotronH reference, fused (torch-free). Per token t:
//   logit[e]  = sum_h double(x[t, h]) * double(router[e, h])                 (fp64; own summation order)
//   score[e]  = 1 / (1 + exp(-logit[e]))                                     (fp64 sigmoid)
//   choice[e] = score[e] + bias[e]
//   n_group > 1: group g's score = the sum of its two largest choices; the topk_group best groups are kept
//                (torch.topk's selection), every other group's choices become 0.0 (not -inf: the reference's
//                masked_fill value, which a kept group's negative choices can lose to)
//   ids       = torch.topk(choice, k, sorted=False).indices: the same selection AND output order, ties included
//               (moe_router_cpu.cpp replays ATen's TopKImpl.h: same std algorithm, same comparator)
//   weights   = score[ids]; norm_topk_prob: weights / (sum(weights) + 1e-20); times scaling.
// NaN: torch.topk ranks NaN above every number, and so does this. A NaN in x[t] makes every logit of t NaN, hence
// every score and weight of t NaN (ids: whatever torch.topk picks among them, as the reference); other tokens are
// unaffected. Each token's result is independent of the others and of how tokens are split over threads.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/platform.h"

namespace tt {

struct MoeRouteParams {
  const void* x;           // [tokens, hidden] of `dtype`, row stride x_row_stride, last dim contiguous
  const void* router;      // [experts, hidden] fp64, or fp32 (router_f32), row stride router_row_stride, last dim
                           // contiguous; fp32 values widen to fp64 exactly (the same logits, half the bytes)
  bool router_f32 = false;
  const double* bias;      // [experts], element stride bias_stride
  int64_t* ids;            // [tokens, k], contiguous
  double* weights;         // [tokens, k], contiguous
  int64_t tokens, hidden, experts, k;
  int64_t n_group, topk_group;  // experts % n_group == 0; n_group > 1 needs >= 2 experts per group
  int64_t x_row_stride, router_row_stride, bias_stride;
  bool norm_topk_prob;
  double scaling;
  DType dtype;             // x's
  CpuIsa isa;              // the dot products' instruction set: scalar, AVX2 or AVX-512 (at most kMoeRouteIsaMax)
};

constexpr CpuIsa kMoeRouteIsaMax = CpuIsa::kAvx512;

// Tokens [token_begin, token_end); the caller parallelises over token ranges (any split gives the same bits).
Status moe_route_cpu(const MoeRouteParams& p, int64_t token_begin, int64_t token_end);

}  // namespace tt
