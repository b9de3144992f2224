// Torch-side adapter of moe_route: argument checks (messages name the argument), the plan that fills the kernel's
// params struct, the CPU entry point and its registration. The schema is in csrc/registry.cpp.
// Environment (tests and benchmarks): TWOTOWER_ROUTE_CPU_ISA=scalar|avx2|avx512 forces the dot products' path.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/cpu_isa_torch.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"
#include "moe_router/moe_router.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

// ---------------------------------------------------------------------------------------------------
// moe_route(x [T, H], router [E, H] fp64 or fp32, bias [E] fp64, k, n_group, topk_group, norm_topk_prob, scaling)
//   -> (ids [T, k] int64, weights [T, k] fp64)

struct MoeRoutePlan {
  tt::MoeRouteParams p;
  Tensor ids, weights;
};

MoeRoutePlan plan_moe_route(const Tensor& x, const Tensor& router, const Tensor& bias, int64_t k, int64_t n_group,
                            int64_t topk_group, bool norm_topk_prob, double scaling) {
  MoeRoutePlan plan;
  auto& p = plan.p;
  p.dtype = kernel_dtype(x, "x");
  TORCH_CHECK_TYPE(router.scalar_type() == at::kDouble || router.scalar_type() == at::kFloat,
                   "twotower: router must be float64 or float32, got ", router.scalar_type());
  check_dtype(bias, at::kDouble, "bias");
  check_same_device(x, "x", router, "router");
  check_same_device(x, "x", bias, "bias");
  TORCH_CHECK(x.dim() == 2, "twotower: x must be [tokens, hidden] (2-D), got shape ", x.sizes());
  TORCH_CHECK(router.dim() == 2 && router.size(1) == x.size(1) && router.size(0) >= 1,
              "twotower: router must be [experts, hidden = ", x.size(1), "] with experts >= 1, got shape ",
              router.sizes());
  const int64_t E = router.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == E, "twotower: bias must be [experts = ", E, "], got shape ",
              bias.sizes());
  check_last_dim_contiguous(x, "x");
  check_last_dim_contiguous(router, "router");
  TORCH_CHECK(k >= 1 && k <= E, "twotower: k must be in [1, experts = ", E, "], got ", k);
  TORCH_CHECK(n_group >= 1 && E % n_group == 0, "twotower: n_group must be >= 1 and divide experts = ", E, ", got ",
              n_group);
  TORCH_CHECK(n_group == 1 || E / n_group >= 2, "twotower: n_group = ", n_group,
              " leaves fewer than 2 experts per group (experts = ", E, "); grouped routing needs at least 2");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "twotower: topk_group must be in [1, n_group = ", n_group,
              "], got ", topk_group);
  const int64_t T = x.size(0);
  plan.ids = at::empty({T, k}, x.options().dtype(at::kLong));
  plan.weights = at::empty({T, k}, x.options().dtype(at::kDouble));
  p.x = x.data_ptr();
  p.router = router.data_ptr();
  p.router_f32 = router.scalar_type() == at::kFloat;
  p.bias = bias.data_ptr<double>();
  p.ids = plan.ids.data_ptr<int64_t>();
  p.weights = plan.weights.data_ptr<double>();
  p.tokens = T;
  p.hidden = x.size(1);
  p.experts = E;
  p.k = k;
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.x_row_stride = x.stride(0);
  p.router_row_stride = router.stride(0);
  p.bias_stride = bias.stride(0);
  p.norm_topk_prob = norm_topk_prob;
  p.scaling = scaling;
  p.isa = cpu_isa_from_env("TWOTOWER_ROUTE_CPU_ISA", tt::kMoeRouteIsaMax);
  return plan;
}

std::tuple<Tensor, Tensor> moe_route_cpu(const Tensor& x, const Tensor& router, const Tensor& bias, int64_t k,
                                         int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling) {
  auto plan = plan_moe_route(x, router, bias, k, n_group, topk_group, norm_topk_prob, scaling);
  const auto& p = plan.p;
  // Items are tiles of 4 tokens (the kernel's; any split gives the same bits), each weighing 4 * experts * hidden
  // units of parallel_chunks' work: a decode block (16 tokens, E 128, H 320) splits over 2 threads, where the
  // helper pool is awake between a pass's ops (2 threads, fp64 router weights cycled from memory: 66 -> 39 us per
  // call; weighing a tile E * H ran it inline), an AR step's single token runs inline.
  constexpr int64_t kTile = 4;
  tt::parallel_chunks((p.tokens + kTile - 1) / kTile, 4 * p.experts * p.hidden, [&](int64_t b, int64_t e) {
    check_status(tt::moe_route_cpu(p, b * kTile, std::min(p.tokens, e * kTile)), "moe_route");
  });
  return {plan.ids, plan.weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("moe_route", &moe_route_cpu); }
