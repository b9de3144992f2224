// Torch-side adapter of moe_experts / moe_experts_out: argument checks (messages name the argument), the params,
// the CPU / CUDA entry points and their registrations. The schemas are in csrc/registry.cpp; the math in moe.h.
//
// moe_experts(x [T,H], expert_ids [T,k] int32|int64, expert_weights [T,k] fp32|fp64, w_up [E,I,H], w_down [E,H,I],
//             w_up_scale, w_down_scale, group_size) -> y [T,H] in x's dtype. Weights dense in x's dtype (no scales,
//   group_size 0), fp8 (float8_e4m3fn, fp32 scales [E,I] / [E,H]) or int4 (uint8 [E,I,ceil(H/2)] / [E,H,ceil(I/2)],
//   bf16|fp16 scales [E,I,ceil(H/group)] / [E,H,ceil(I/group)]): python/twotower_ext/quant.py. moe_experts_out(..., out) writes y into out (any row stride, last dim contiguous);
// every path has read x before it writes out, so out may be x.
// shared_up / shared_down / shared_inter (CPU, float32 / bfloat16 x): the layer's shared expert, a relu^2 MLP of
//   shared_inter hidden units with weights packed for ops.linear, added to y: exactly moe_experts(...) +
//   linear(square(relu(linear(x, shared_up))), shared_down) in x's dtype, in the same two phases as the routed
//   experts (moe_shared_cpu.cpp). Calls whose rows send a linear to the matrix library (prefill) compose the linear
//   op instead, with the same result.
// Environment (tests and benchmarks): TWOTOWER_MOE_CPU_ISA=scalar|avx2|avx512|avx512_bf16 forces the CPU
// microkernel's instruction set (default: the best this CPU runs); TWOTOWER_MOE_CPU_GEMM=micro|library forces
// the inner GEMM for every expert (default auto: by rows per expert); TWOTOWER_MOE_DEBUG=1 on CUDA checks the
// ids after the launch (synchronises; not capturable).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/square.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>

#include "common/call_scratch_cpu.h"
#include "common/cpu_gemm_torch.h"
#include "common/cpu_isa_torch.h"
#include "common/torch_checks.h"
#include "common/worker_pool_cpu.h"
#include "linear/linear_torch.h"
#include "moe/moe.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

void moe_check_shape(const Tensor& t, const char* name, at::IntArrayRef want, const char* layout) {
  TORCH_CHECK(t.sizes() == want, "twotower: ", name, " must be ", layout, " = ", want, ", got shape ", t.sizes());
}

struct MoePlan {
  tt::MoeParams p{};
  Tensor ids, weights, out, up_scale, down_scale;  // keep-alive (made contiguous)
};

std::string int4_scale_layout(const char* n, const char* k) {
  return std::string("[experts, ") + n + ", ceil(" + k + " / group_size)] (one scale per group of w_" +
         (n[0] == 'i' ? "up" : "down") + "'s rows)";
}

// The weight format from w_up's dtype, and the checks of w_up / w_down / the scales / group_size for it (the
// layouts are python/twotower_ext/quant.py's). Dense: w_up, w_down in x's dtype, no scales, group_size 0.
// Returns the scales, contiguous (undefined for dense).
std::pair<Tensor, Tensor> check_weights(const Tensor& x, const Tensor& w_up, const Tensor& w_down,
                                        const std::optional<Tensor>& w_up_scale,
                                        const std::optional<Tensor>& w_down_scale, int64_t group, tt::MoeParams& p) {
  const int64_t H = x.size(1);
  const auto wt = w_up.scalar_type();
  p.format = wt == at::kFloat8_e4m3fn ? tt::MoeWeightFormat::kFp8
           : wt == at::kByte          ? tt::MoeWeightFormat::kInt4
                                      : tt::MoeWeightFormat::kDense;
  const bool dense = p.format == tt::MoeWeightFormat::kDense, int4 = p.format == tt::MoeWeightFormat::kInt4;
  const char* fmt = dense ? "dense" : int4 ? "int4" : "fp8";
  TORCH_CHECK_TYPE(!dense || wt == x.scalar_type(), "twotower: w_up must be ", x.scalar_type(),
                   " (x's dtype), Float8_e4m3fn (fp8) or Byte (int4, two per byte), got ", wt);
  TORCH_CHECK_TYPE(w_down.scalar_type() == wt, "twotower: w_down must be ", wt, " like w_up (", fmt,
                   " expert weights), got ", w_down.scalar_type());
  check_same_device(w_up, "w_up", x, "x");
  check_same_device(w_down, "w_down", x, "x");
  // int4 packs two k per byte: the stored last dimension is ceil(k / 2).
  const int64_t up_k = int4 ? (H + 1) / 2 : H;
  TORCH_CHECK(w_up.dim() == 3 && w_up.size(2) == up_k && w_up.size(0) >= 1 && w_up.size(1) >= 1,
              "twotower: w_up must be [experts, inter, ", int4 ? "ceil(hidden / 2)" : "hidden", "] with hidden = ", H,
              " (x's), got shape ", w_up.sizes());
  check_last_dim_contiguous(w_up, "w_up");
  const int64_t E = w_up.size(0), I = w_up.size(1);
  if (int4) {
    moe_check_shape(w_down, "w_down", {E, H, (I + 1) / 2},
                    "[experts, hidden, ceil(inter / 2)] (w_up's experts and inter, x's hidden)");
  } else {
    moe_check_shape(w_down, "w_down", {E, H, I}, "[experts, hidden, inter] (w_up's experts and inter, x's hidden)");
  }
  check_last_dim_contiguous(w_down, "w_down");
  if (dense) {
    TORCH_CHECK_VALUE(!w_up_scale.has_value(), "twotower: w_up_scale must be None for dense (", wt,
                      ") expert weights");
    TORCH_CHECK_VALUE(!w_down_scale.has_value(), "twotower: w_down_scale must be None for dense (", wt,
                      ") expert weights");
    TORCH_CHECK_VALUE(group == 0, "twotower: group_size must be 0 for dense expert weights, got ", group);
    return {};
  }
  TORCH_CHECK_VALUE(w_up_scale.has_value(), "twotower: w_up_scale is required for ", fmt, " expert weights (w_up is ",
                    wt, ")");
  TORCH_CHECK_VALUE(w_down_scale.has_value(), "twotower: w_down_scale is required for ", fmt,
                    " expert weights (w_up is ", wt, ")");
  const Tensor& us = *w_up_scale;
  const Tensor& ds = *w_down_scale;
  check_same_device(us, "w_up_scale", x, "x");
  check_same_device(ds, "w_down_scale", x, "x");
  if (int4) {
    TORCH_CHECK_VALUE(group >= 2 && group % 2 == 0, "twotower: group_size must be an even number >= 2 for int4 "
                      "expert weights (w_up is uint8), got ", group);
    TORCH_CHECK_TYPE(us.scalar_type() == at::kBFloat16 || us.scalar_type() == at::kHalf,
                     "twotower: w_up_scale must be bfloat16 or float16 for int4 expert weights, got ", us.scalar_type());
    check_dtype(ds, us.scalar_type(), "w_down_scale");
    moe_check_shape(us, "w_up_scale", {E, I, (H + group - 1) / group}, int4_scale_layout("inter", "hidden").c_str());
    moe_check_shape(ds, "w_down_scale", {E, H, (I + group - 1) / group}, int4_scale_layout("hidden", "inter").c_str());
  } else {
    TORCH_CHECK_VALUE(group == 0, "twotower: group_size must be 0 for fp8 expert weights (one scale per output "
                      "channel), got ", group);
    check_dtype(us, at::kFloat, "w_up_scale");
    check_dtype(ds, at::kFloat, "w_down_scale");
    moe_check_shape(us, "w_up_scale", {E, I}, "[experts, inter] (one scale per output channel of w_up)");
    moe_check_shape(ds, "w_down_scale", {E, H}, "[experts, hidden] (one scale per output channel of w_down)");
  }
  Tensor usc = us.contiguous(), dsc = ds.contiguous();
  p.up_scale = usc.data_ptr();
  p.down_scale = dsc.data_ptr();
  p.group = int4 ? group : 0;
  p.scale_dtype = kernel_dtype(usc, "w_up_scale");
  return {usc, dsc};
}

// The shared expert's arguments: both packed weights or neither (then shared_inter is 0).
struct SharedArgs {
  bool on = false;
  Tensor up, down;
  int64_t inter = 0;
};

SharedArgs check_shared(const Tensor& x, const std::optional<Tensor>& up, const std::optional<Tensor>& down,
                        int64_t inter) {
  TORCH_CHECK_VALUE(up.has_value() == down.has_value(), "twotower: shared_up and shared_down (the shared expert's "
                    "packed linears) must be given together, got only ", up.has_value() ? "shared_up" : "shared_down");
  SharedArgs s;
  if (!up.has_value()) {
    TORCH_CHECK_VALUE(inter == 0, "twotower: shared_inter must be 0 without a shared expert, got ", inter);
    return s;
  }
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "twotower: x must be float32 "
                   "or bfloat16 with a shared expert (packed linear weights), got ", x.scalar_type());
  TORCH_CHECK_VALUE(inter >= 1, "twotower: shared_inter (the shared expert's hidden units) must be >= 1 with "
                    "shared_up / shared_down, got ", inter);
  check_packed_weight(*up, "shared_up", inter, x.size(1), "x's hidden", x, "x", "the shared expert's up weight");
  check_packed_weight(*down, "shared_down", x.size(1), inter, "shared_inter", x, "x",
                      "the shared expert's down weight");
  s.on = true;
  s.up = *up;
  s.down = *down;
  s.inter = inter;
  return s;
}

MoePlan plan_moe(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights, const Tensor& w_up,
                 const Tensor& w_down, const Tensor* out, const std::optional<Tensor>& w_up_scale,
                 const std::optional<Tensor>& w_down_scale, int64_t group_size) {
  const auto dt = kernel_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "twotower: x must be [tokens, hidden] (2-D), got shape ", x.sizes());
  check_last_dim_contiguous(x, "x");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK_TYPE(expert_ids.scalar_type() == at::kInt || expert_ids.scalar_type() == at::kLong,
                   "twotower: expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
  check_same_device(expert_ids, "expert_ids", x, "x");
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.size(0) == T, "twotower: expert_ids must be [tokens, k] with tokens = ",
              T, " (x's), got shape ", expert_ids.sizes());
  const int64_t k = expert_ids.size(1);
  TORCH_CHECK_TYPE(expert_weights.scalar_type() == at::kFloat || expert_weights.scalar_type() == at::kDouble,
                   "twotower: expert_weights must be float32 or float64, got ", expert_weights.scalar_type());
  check_same_device(expert_weights, "expert_weights", x, "x");
  moe_check_shape(expert_weights, "expert_weights", {T, k}, "[tokens, k] (expert_ids' shape)");
  MoePlan plan;
  auto& p = plan.p;
  std::tie(plan.up_scale, plan.down_scale) = check_weights(x, w_up, w_down, w_up_scale, w_down_scale, group_size, p);
  const int64_t E = w_up.size(0), I = w_up.size(1);
  TORCH_CHECK_VALUE(k <= E, "twotower: expert_ids has k = ", k, " choices per token but there are only ", E,
                    " experts (w_up's first dim)");
  TORCH_CHECK(T * k < INT32_MAX && E < INT32_MAX, "twotower: expert_ids must have fewer than 2^31 entries, got shape ",
              expert_ids.sizes());
  if (out != nullptr) {
    check_dtype(*out, x.scalar_type(), "out");
    check_same_device(*out, "out", x, "x");
    moe_check_shape(*out, "out", {T, H}, "[tokens, hidden] (x's shape)");
    check_last_dim_contiguous(*out, "out");
    plan.out = *out;
  } else {
    plan.out = at::empty({T, H}, x.options());
  }
  plan.ids = expert_ids.contiguous();
  plan.weights = expert_weights.contiguous();
  p.x = x.data_ptr();
  p.expert_ids = plan.ids.data_ptr();
  p.expert_weights = plan.weights.data_ptr();
  p.w_up = w_up.data_ptr();
  p.w_down = w_down.data_ptr();
  p.y = plan.out.data_ptr();
  p.tokens = T;
  p.topk = k;
  p.experts = E;
  p.hidden = H;
  p.inter = I;
  p.x_stride = x.stride(0);
  p.y_stride = plan.out.stride(0);
  p.up_stride_e = w_up.stride(0);  // elements: bytes for both quantised formats (one-byte storage)
  p.up_stride_n = w_up.stride(1);
  p.down_stride_e = w_down.stride(0);
  p.down_stride_n = w_down.stride(1);
  p.ids_int64 = expert_ids.scalar_type() == at::kLong;
  p.weights_fp64 = expert_weights.scalar_type() == at::kDouble;
  p.dtype = dt;
  return plan;
}

// ---------------------------------------------------------------------------------------------------
// CPU

tt::MoeCpuGemmChoice moe_cpu_gemm_choice() {
  const char* env = std::getenv("TWOTOWER_MOE_CPU_GEMM");
  if (env == nullptr || env[0] == '\0' || std::string(env) == "auto") return tt::MoeCpuGemmChoice::kAuto;
  const std::string v(env);
  TORCH_CHECK_VALUE(v == "micro" || v == "library", "twotower: TWOTOWER_MOE_CPU_GEMM must be auto, micro or library, "
                    "got '", v, "'");
  return v == "micro" ? tt::MoeCpuGemmChoice::kMicro : tt::MoeCpuGemmChoice::kLibrary;
}

// Below this many weight bytes per call the phases run on the calling thread: handing items to a helper costs
// more than the work (the pool's helper picks an offer up in ~6-13 us when awake, ~60 us when asleep: ~0.1 ms of
// expert reads), and the small models of the tests and of the parity fixtures live here. From 1 MB an AR step's
// MoE layers of the width-1/8 model (6 experts, 1.7 MB bf16) split too: measured at 2 threads, bf16 AR step
// 22.0 / 22.4 ms against 27.9 / 27.5 with the 4 MB this was when a helper was a task on torch's inter-op pool
// (where a busy 2-core machine made any hand-off cost 20-50 ms).
constexpr int64_t kParallelMinBytes = 1 << 20;

// The work of one call shared by the calling thread and helpers: items [0, n_up) are the up phase, then the
// down items; a down item starts only once every up item has finished. Every index below `total` is claimed by
// exactly one thread and counted in `finished` once run (or skipped after a failure). The up items are claimed
// from both ends: the first thread in walks them forward one at a time, the next backward `back_run` at a time (an
// expert's row tiles, run forward), and so on alternating; so each thread's consecutive items are an expert's
// consecutive row tiles, one contiguous stream, where claims from one counter interleaved the threads' tiles of each
// expert and broke both streams every tile.
struct MoeWork final : tt::PoolTask {
  int64_t n_up = 0, total = 0, back_run = 1;
  std::atomic<uint64_t> up_ends{0};  // up items claimed from the front (low 32 bits) and from the back (high 32)
  std::atomic<int64_t> next{0}, up_done{0}, finished{0};
  std::atomic<int32_t> arrivals{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;
  std::function<void(int64_t, tt::MoeCpuScratch&)> item;  // index < n_up: up item, else down item index - n_up

  // The next up items [lo, hi) from the front (one) or the back (up to back_run), or an empty range once the two
  // ends have met.
  std::pair<int64_t, int64_t> claim_up(bool back) {
    uint64_t v = up_ends.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = int64_t(v & 0xffffffffu), from_back = int64_t(v >> 32), left = n_up - front - from_back;
      if (left <= 0) return {0, 0};
      const int64_t take = back ? std::min(back_run, left) : 1;
      const uint64_t claimed = back ? v + (uint64_t(take) << 32) : v + 1;
      if (up_ends.compare_exchange_weak(v, claimed, std::memory_order_relaxed))
        return back ? std::pair<int64_t, int64_t>{n_up - from_back - take, n_up - from_back}
                    : std::pair<int64_t, int64_t>{front, front + 1};
    }
  }

  void run(int64_t i, tt::MoeCpuScratch& s) {
    if (!failed.load(std::memory_order_relaxed)) {
      try {
        item(i, s);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
    if (i < n_up) up_done.fetch_add(1, std::memory_order_release);
    finished.fetch_add(1, std::memory_order_release);
  }

  void work() override {
    thread_local tt::MoeCpuScratch s;  // grown on demand, kept across calls
    const bool back = arrivals.fetch_add(1, std::memory_order_relaxed) % 2 == 1;
    for (auto [lo, hi] = claim_up(back); lo < hi; std::tie(lo, hi) = claim_up(back))
      for (int64_t i = lo; i < hi; ++i) run(i, s);
    for (int64_t i; (i = n_up + next.fetch_add(1)) < total;) {
      while (up_done.load(std::memory_order_acquire) < n_up) std::this_thread::yield();
      run(i, s);
    }
  }
};

// Why not at::parallel_for: an OpenMP region ends in a barrier that waits for every team thread to have been
// scheduled at least once, and on a busy 2-core machine a woken thread can wait a whole time slice (measured:
// a T=1 bf16 layer took 52-60 ms on 2 threads against 34 ms on 1; any OpenMP region cost 10-50 ms there). Here
// the calling thread works through the items itself and threads - 1 pool helpers (common/worker_pool_cpu.h)
// join whenever they get to run; the caller waits only for items a helper has already claimed. A helper that
// starts after everything is claimed finds nothing to do (the shared state outlives the call; the items'
// references do not, and are only used for claimed items). Used for the microkernel path only: the library
// path calls MKL, whose own threading expects an OpenMP thread, so calls with library experts take one
// at::parallel_for region.
void run_phases(int64_t n_up, int64_t n_down, int64_t back_run, bool parallel, bool library,
                std::function<void(int64_t, tt::MoeCpuScratch&)> item) {
  TORCH_CHECK(n_up < (int64_t(1) << 31), "twotower: moe_experts: ", n_up, " up items, more than a claim counts");
  auto w = std::make_shared<MoeWork>();
  w->n_up = n_up;
  w->back_run = std::max<int64_t>(1, back_run);
  w->total = n_up + n_down;
  w->item = std::move(item);
  const int64_t threads = at::get_num_threads();
  if (parallel && threads > 1 && library) {
    at::parallel_for(0, std::min(threads, w->total), 1, [&](int64_t, int64_t) { w->work(); });
  } else {
    if (parallel && threads > 1 && !tt::pool_in_task()) tt::pool_offer(w, std::min(threads, w->total) - 1);
    tt::PoolTaskScope scope;
    w->work();
  }
  while (w->finished.load(std::memory_order_acquire) < w->total) std::this_thread::yield();
  if (w->error) std::rethrow_exception(w->error);
}

// The fused shared expert's params for a call of p's tokens, or false where a linear of it would take the matrix
// library at this many rows (linear_call_plan): then the caller composes the linear op.
bool plan_shared(const tt::MoeParams& p, const SharedArgs& sh, tt::MoeShared& out) {
  const int64_t T = p.tokens, H = p.hidden, I = sh.inter;
  const auto up = tt::torch_glue::linear_call_plan(T, I, H, p.dtype);
  const auto down = tt::torch_glue::linear_call_plan(T, H, I, p.dtype);
  if (up.path != tt::LinearPath::kMicro || down.path != tt::LinearPath::kMicro) return false;
  out.isa = up.isa;
  out.up = tt::LinearParams{p.x, sh.up.data_ptr(), nullptr, T, I, H, p.x_stride, 0, p.dtype};
  out.down = tt::LinearParams{nullptr, sh.down.data_ptr(), nullptr, T, H, I, 0, H, p.dtype};
  return true;
}

void run_moe_cpu(const tt::MoeParams& p, tt::MoeShared* shared) {
  if (p.tokens == 0) return;
  tt::MoeCpuConfig cfg;
  cfg.isa = cpu_isa_from_env("TWOTOWER_MOE_CPU_ISA", tt::kMoeCpuIsaMax);
  cfg.gemm = moe_cpu_gemm_choice();
  cfg.library = cpu_sgemm();
  // The plan and the hidden activations reuse per-thread storage (no allocation once warm); helpers get them by
  // reference / pointer (common/call_scratch_cpu.h).
  thread_local tt::MoeCpuPlan plan;
  tt::MoeCpuPlan& pl = plan;
  tt::moe_cpu_plan(p, cfg, pl);
  TORCH_CHECK_VALUE(pl.bad_index < 0, "twotower: expert_ids must be in [0, ", p.experts, ") (w_up's experts), got ",
                    pl.bad_value, " at [", pl.bad_index / std::max<int64_t>(p.topk, 1), ", ",
                    pl.bad_index % std::max<int64_t>(p.topk, 1), "]");
  const int64_t es = p.dtype == tt::DType::kFloat32 ? 4 : 2, slots = p.tokens * p.topk;
  struct HiddenTag;
  struct Hidden32Tag;
  const tt::CallScratch<float, HiddenTag> hidden(size_t(slots * p.inter * es + 3) / 4);
  const tt::CallScratch<float, Hidden32Tag> hidden32(es == 4 || !pl.any_library ? 0 : size_t(slots * p.inter));
  const tt::MoeCpuBuffers buf{hidden.data(), es == 4 ? hidden.data() : pl.any_library ? hidden32.data() : nullptr};
  const int64_t expert_bytes = tt::moe_weight_bytes(p, p.inter, p.hidden) + tt::moe_weight_bytes(p, p.hidden, p.inter);
  // The shared expert's buffers: its hidden [T, I_s] zero-padded to AMX's whole tiles (rows to 16, columns to 32:
  // the down linear's AMX x as it is, and plain x, ld apart, for the other kernels), its output, x's AMX copy.
  int64_t n_su = 0, n_sd = 0, su_panels = 1, sd_panels = 1, shared_bytes = 0;
  struct SharedHiddenTag;
  struct SharedOutTag;
  struct SharedXTag;
  const bool amx = shared != nullptr && shared->isa == tt::CpuIsa::kAmx && p.dtype == tt::DType::kBFloat16;
  const int64_t ldh = shared ? tt::linear_amx_ld(shared->up.N) : 0, hrows = (p.tokens + 15) / 16 * 16;
  const tt::CallScratch<float, SharedHiddenTag> shared_hidden(shared ? size_t(hrows * ldh * es + 3) / 4 : 0);
  const tt::CallScratch<float, SharedOutTag> shared_out(shared ? size_t(p.tokens * p.hidden * es + 3) / 4 : 0);
  const tt::CallScratch<float, SharedXTag> shared_x(amx ? size_t(tt::linear_amx_x_elems(p.tokens, p.hidden) + 1) / 2
                                                        : 0);
  if (shared) {
    std::memset(shared_hidden.data(), 0, size_t(hrows * ldh * es));
    shared->up.y = shared_hidden.data();
    shared->up.y_stride = ldh;
    shared->down.x = shared_hidden.data();
    shared->down.x_stride = ldh;
    shared->down.y = shared_out.data();
    if (amx) {
      tt::linear_amx_pad_x(shared->up, reinterpret_cast<uint16_t*>(shared_x.data()));
      shared->up.x_amx = reinterpret_cast<const uint16_t*>(shared_x.data());
      shared->down.x_amx = reinterpret_cast<const uint16_t*>(shared_hidden.data());
    }
    su_panels = tt::moe_shared_item_panels(shared->up);
    sd_panels = tt::moe_shared_item_panels(shared->down);
    n_su = (tt::linear_panels(shared->up.N) + su_panels - 1) / su_panels;
    n_sd = (tt::linear_panels(shared->down.N) + sd_panels - 1) / sd_panels;
    shared_bytes = 2 * shared->up.N * p.hidden * es;
  }
  const bool parallel = int64_t(pl.active.size()) * expert_bytes + shared_bytes >= kParallelMinBytes;
  // Up phase: the shared expert's items first (claimed early, so the routed items even out the end), then the
  // routed ones; down phase: the routed tiles, then the shared expert's (small) items.
  const int64_t n_up = int64_t(pl.up_items.size()), n_down = tt::moe_down_tiles(p, pl);
  // the routed up items end the list, an expert's row tiles in a run (moe_cpu_plan): a backward claim takes one run
  const int64_t tiles_up = (p.inter + pl.tile_up - 1) / pl.tile_up;
  run_phases(n_su + n_up, n_down + n_sd, tiles_up, parallel, pl.any_library, [&](int64_t i, tt::MoeCpuScratch& s) {
    if (i < n_su) {
      tt::moe_shared_up_panels(*shared, i * su_panels, std::min(tt::linear_panels(shared->up.N), (i + 1) * su_panels));
    } else if (i < n_su + n_up) {
      check_status(tt::moe_cpu_up_item(p, pl, cfg, pl.up_items[i - n_su], buf, s), "moe_experts");
    } else if (i < n_su + n_up + n_down) {
      check_status(tt::moe_cpu_down_item(p, pl, cfg, i - n_su - n_up, buf, s), "moe_experts");
    } else {
      const int64_t j = i - n_su - n_up - n_down;
      tt::moe_shared_down_panels(*shared, j * sd_panels,
                                 std::min(tt::linear_panels(shared->down.N), (j + 1) * sd_panels));
    }
  });
  if (shared) tt::moe_shared_add(*shared, p.y, p.y_stride);
}

// The CPU call: routed experts with the shared expert fused (plan_shared), or where it cannot be (many rows), the
// shared MLP through the linear op first (out may be x) and added after.
void moe_cpu(const tt::MoeParams& p, const SharedArgs& sh, const Tensor& x, const Tensor& out) {
  tt::MoeShared fused;
  const bool fuse = sh.on && plan_shared(p, sh, fused);
  if (!sh.on || fuse) {
    run_moe_cpu(p, fuse ? &fused : nullptr);
    return;
  }
  using tt::torch_glue::linear_cpu;
  const Tensor y_shared = linear_cpu(at::square(at::relu(linear_cpu(x, sh.up, sh.inter))), sh.down, p.hidden);
  run_moe_cpu(p, nullptr);
  out.add_(y_shared);
}

Tensor moe_experts_cpu(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights, const Tensor& w_up,
                       const Tensor& w_down, const std::optional<Tensor>& w_up_scale,
                       const std::optional<Tensor>& w_down_scale, int64_t group_size,
                       const std::optional<Tensor>& shared_up, const std::optional<Tensor>& shared_down,
                       int64_t shared_inter) {
  auto plan = plan_moe(x, expert_ids, expert_weights, w_up, w_down, nullptr, w_up_scale, w_down_scale, group_size);
  moe_cpu(plan.p, check_shared(x, shared_up, shared_down, shared_inter), x, plan.out);
  return plan.out;
}

void moe_experts_out_cpu(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights, const Tensor& w_up,
                         const Tensor& w_down, const Tensor& out, const std::optional<Tensor>& w_up_scale,
                         const std::optional<Tensor>& w_down_scale, int64_t group_size,
                         const std::optional<Tensor>& shared_up, const std::optional<Tensor>& shared_down,
                         int64_t shared_inter) {
  auto plan = plan_moe(x, expert_ids, expert_weights, w_up, w_down, &out, w_up_scale, w_down_scale, group_size);
  moe_cpu(plan.p, check_shared(x, shared_up, shared_down, shared_inter), x, plan.out);
}

// ---------------------------------------------------------------------------------------------------
// CUDA

#ifdef TWOTOWER_WITH_CUDA
bool moe_debug() {
  const char* v = std::getenv("TWOTOWER_MOE_DEBUG");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

void run_moe_cuda(const MoePlan& plan, const Tensor& x) {
  const auto& p = plan.p;
  TORCH_CHECK(p.experts <= tt::kMoeCudaMaxExperts, "twotower: w_up has ", p.experts, " experts; the CUDA kernel takes at most ",
              tt::kMoeCudaMaxExperts);
  if (p.tokens == 0) return;
  auto ws = at::empty({tt::moe_cuda_workspace_bytes(p)}, x.options().dtype(at::kByte));
  check_status(tt::moe_experts_cuda(p, ws.data_ptr(), current_stream(x)), "moe_experts");
  if (moe_debug()) {
    const int32_t err = ws.narrow(0, tt::moe_cuda_error_offset(p), 4).view(at::kInt).item<int32_t>();
    TORCH_CHECK_VALUE(!(err & tt::kMoeErrBadId), "twotower: expert_ids must be in [0, ", p.experts,
                      ") (w_up's experts) (TWOTOWER_MOE_DEBUG check)");
  }
}

void check_no_shared(const std::optional<Tensor>& shared_up, const std::optional<Tensor>& shared_down) {
  TORCH_CHECK_VALUE(!shared_up.has_value() && !shared_down.has_value(), "twotower: shared_up / shared_down (the fused "
                    "shared expert) run on the CPU only; on CUDA ops.moe_experts adds the shared MLP itself");
}

Tensor moe_experts_cuda(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights, const Tensor& w_up,
                        const Tensor& w_down, const std::optional<Tensor>& w_up_scale,
                        const std::optional<Tensor>& w_down_scale, int64_t group_size,
                        const std::optional<Tensor>& shared_up, const std::optional<Tensor>& shared_down, int64_t) {
  check_no_shared(shared_up, shared_down);
  c10::cuda::CUDAGuard guard(x.device());
  auto plan = plan_moe(x, expert_ids, expert_weights, w_up, w_down, nullptr, w_up_scale, w_down_scale, group_size);
  run_moe_cuda(plan, x);
  return plan.out;
}

void moe_experts_out_cuda(const Tensor& x, const Tensor& expert_ids, const Tensor& expert_weights, const Tensor& w_up,
                          const Tensor& w_down, const Tensor& out, const std::optional<Tensor>& w_up_scale,
                          const std::optional<Tensor>& w_down_scale, int64_t group_size,
                          const std::optional<Tensor>& shared_up, const std::optional<Tensor>& shared_down, int64_t) {
  check_no_shared(shared_up, shared_down);
  c10::cuda::CUDAGuard guard(x.device());
  auto plan = plan_moe(x, expert_ids, expert_weights, w_up, w_down, &out, w_up_scale, w_down_scale, group_size);
  run_moe_cuda(plan, x);
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) {
  m.impl("moe_experts", &moe_experts_cpu);
  m.impl("moe_experts_out", &moe_experts_out_cpu);
}
#ifdef TWOTOWER_WITH_CUDA
TORCH_LIBRARY_IMPL(twotower, CUDA, m) {
  m.impl("moe_experts", &moe_experts_cuda);
  m.impl("moe_experts_out", &moe_experts_out_cuda);
}
#endif
