// Torch-side adapter of linear(x, w, n): argument checks (messages name the argument), the plan, the threads'
// split over output panels, the matrix library path, and the registrations. The schemas are in
// csrc/registry.cpp; the layout and the math in linear.h.
//
// linear(x [..., K] fp32|bf16 (last dim contiguous), w packed (linear.h; python/twotower_ext/packed.py) in x's
//   dtype, n) -> y [..., n] in x's dtype. CPU only: on CUDA the model keeps F.linear (cuBLAS) on plain weights.
// linear_cpu_plan(m, n, k, dtype, isa, threads) -> "micro:<isa>" | "micro:<isa>/rows<blocks>" (the threads split
//   the rows into that many blocks too) | "library": the plan a call would get (a pure function, any machine; isa ""
//   means this CPU's best).
// Environment (tests and benchmarks): TWOTOWER_LINEAR_CPU_ISA=scalar|avx2|avx512|avx512_bf16|amx forces the
// micro kernel's instruction set; TWOTOWER_LINEAR_CPU_GEMM=micro|library forces the path (default auto: the plan).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cpu_isa_torch.h"
#include "common/parallel_cpu.h"
#include "common/torch_checks.h"
#include "linear/linear.h"
#include "linear/linear_torch.h"

namespace tt::torch_glue {

void check_packed_weight(const at::Tensor& w, const char* w_name, int64_t n, int64_t K, const char* k_name,
                         const at::Tensor& x, const char* x_name, const char* what) {
  check_dtype(w, x.scalar_type(), w_name);
  check_same_device(w, w_name, x, x_name);
  const int64_t P = tt::linear_panels(n);
  const bool fp32 = x.scalar_type() == at::kFloat;
  const std::vector<int64_t> want = fp32 ? std::vector<int64_t>{P, K, tt::kLinearPanel}
                                         : std::vector<int64_t>{P, (K + 1) / 2, tt::kLinearPanel, 2};
  const char* layout = fp32 ? "[ceil(n / 16), in_features, 16]" : "[ceil(n / 16), ceil(in_features / 2), 16, 2]";
  TORCH_CHECK(w.sizes() == at::IntArrayRef(want) && w.is_contiguous(), "twotower: ", w_name, " must be ", what,
              " packed by twotower_ext.packed.pack for n = ", n, " outputs and ", k_name, " = ", K, ": a contiguous ",
              layout, " = ", at::IntArrayRef(want), " tensor, got ", w.is_contiguous() ? "" : "a non-contiguous ",
              "shape ", w.sizes());
}

}  // namespace tt::torch_glue

namespace {

using at::Tensor;
using namespace tt::torch_glue;

// Weights per matrix-library call on the library path (its panels unpacked into a copy this big): wide enough
// that the library's own blocking and packing pay (at 2^18, K = 4096 gave 64-column calls, 2x slower than one).
constexpr int64_t kLibraryChunkElems = int64_t(1) << 22;

tt::LinearParams check_linear(const Tensor& x, const Tensor& w, int64_t n) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                   "twotower: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "twotower: x must be [rows, in_features] (its leading dims flattened), got shape ",
              x.sizes());
  check_last_dim_contiguous(x, "x");
  TORCH_CHECK_VALUE(n >= 1, "twotower: n (out_features) must be >= 1, got ", n);
  check_packed_weight(w, "w", n, x.size(-1), "x's in_features", x, "x", "a linear weight");
  const int64_t K = x.size(1);
  tt::LinearParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.M = x.size(0);
  p.N = n;
  p.K = K;
  p.x_stride = x.stride(0);
  p.dtype = kernel_dtype(x, "x");
  return p;
}

void run_micro(const tt::LinearPlan& plan, tt::LinearParams p) {
  Tensor xa;
  if (plan.isa == tt::CpuIsa::kAmx && p.dtype == tt::DType::kBFloat16) {
    xa = at::empty({tt::linear_amx_x_elems(p.M, p.K)}, at::TensorOptions().dtype(at::kBFloat16));
    tt::linear_amx_pad_x(p, static_cast<uint16_t*>(xa.data_ptr()));
    p.x_amx = static_cast<const uint16_t*>(xa.data_ptr());
  }
  const int64_t panels = tt::linear_panels(p.N), items = (panels + tt::kLinearItemPanels - 1) / tt::kLinearItemPanels;
  const int64_t block_rows = tt::linear_block_rows(p.M, plan.row_blocks);
  const int64_t blocks = (p.M + block_rows - 1) / block_rows;
  // An item's work for parallel_chunks, which adds a thread per 2^18 units (and splits nothing below twice that):
  // its weight bytes, times the blocks of 8 rows that read them again from the cache, times kWorkPerByte. So a
  // second thread joins from ~128 KB-equivalents (~10 us on one thread from the cache, 2-3x that from memory, as in
  // a pass, where every weight is read once): with the pool's helpers awake between the ops of a pass
  // (common/worker_pool_cpu.h) that pays. Measured on the 2-core VM at 2 threads, width-1/8 model, bf16 (denoiser
  // pass / AR step, ms, three alternating runs each): splitting from 128 KB 36.4-38.7 / 15.6-16.8, from 0.5 MB
  // 37.8-38.5 / 17.3-17.5; earlier, from 2 MB 49.0 / 25.2 and from 8 MB 47.5 / 27.9 (with the glue around the ops
  // then). Before the pool, when a helper was a task on torch's inter-op pool, splitting from 0.5 MB made the pass
  // slower (118 vs 104 ms fp32).
  constexpr int64_t kWorkPerByte = 4;
  const int64_t elem = p.dtype == tt::DType::kFloat32 ? 4 : 2;
  const int64_t work = tt::kLinearItemPanels * tt::kLinearPanel * p.K * elem *
                       (1 + std::min(p.M, block_rows) / 8) * kWorkPerByte;
  // item i: row block i / items, panel item i % items (one block: the panel items alone, as before the row split)
  tt::parallel_chunks(items * blocks, work, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e;) {
      const int64_t blk = i / items, it0 = i % items, it1 = std::min(items, it0 + (e - i));
      tt::LinearParams q = p;
      const int64_t r0 = blk * block_rows;
      q.M = std::min(p.M - r0, block_rows);
      q.x = static_cast<const char*>(p.x) + r0 * p.x_stride * elem;
      q.y = static_cast<char*>(p.y) + r0 * p.y_stride * elem;
      if (p.x_amx != nullptr) q.x_amx = p.x_amx + r0 * tt::linear_amx_ld(p.K);
      tt::linear_cpu_panels(plan.isa, q, it0 * tt::kLinearItemPanels, std::min(panels, it1 * tt::kLinearItemPanels));
      i += it1 - it0;
    }
  });
}

// The matrix library through ATen (MKL sgemm; oneDNN for bf16 on CPUs with bf16 dot products, AMX where there is
// one), a chunk of panels at a time: the chunk unpacked to W^T [K, 16 x panels] (linear_unpack_panels, threads over
// panels), then one call into y's columns. Elsewhere bf16 is widened to fp32 (exact) and the results rounded once,
// like the micro kernels'.
void run_library(const Tensor& x, const Tensor& w, const Tensor& y, const tt::LinearParams& p, tt::CpuIsa isa) {
  const bool widen = p.dtype == tt::DType::kBFloat16 && int32_t(isa) < int32_t(tt::CpuIsa::kAvx512Bf16);
  const Tensor xin = widen ? x.to(at::kFloat) : x;
  const Tensor out = widen ? at::empty(y.sizes(), y.options().dtype(at::kFloat)) : y;
  const int64_t panels = tt::linear_panels(p.N);
  const int64_t chunk = std::min(panels, std::max<int64_t>(1, kLibraryChunkElems / (p.K * tt::kLinearPanel)));
  const Tensor buf = at::empty({p.K, chunk * tt::kLinearPanel}, w.options());
  for (int64_t p0 = 0; p0 < panels; p0 += chunk) {
    const int64_t np = std::min(panels - p0, chunk), n0 = p0 * tt::kLinearPanel;
    const int64_t cols = std::min(p.N - n0, np * tt::kLinearPanel), ld = np * tt::kLinearPanel;
    // threads over panels with at::parallel_for, the pool the library's own threads are (helpers from our other
    // pool would fight the library's threads spinning after each call on a 2-core machine)
    at::parallel_for(0, np, std::max<int64_t>(1, (int64_t(1) << 18) / (p.K * tt::kLinearPanel)), [&](int64_t b, int64_t e) {
      tt::linear_unpack_panels(isa, p, p0 + b, p0 + e, static_cast<char*>(buf.data_ptr()) +
                               (b * tt::kLinearPanel) * buf.element_size(), ld);
    });
    const Tensor b = buf.view({-1}).narrow(0, 0, p.K * ld).view({p.K, ld}).narrow(1, 0, cols);
    Tensor o = out.narrow(1, n0, cols);
    at::mm_out(o, xin, widen ? b.to(at::kFloat) : b);
  }
  if (widen) y.copy_(out);
}

tt::LinearPath forced_path(tt::LinearPath planned) {
  const char* env = std::getenv("TWOTOWER_LINEAR_CPU_GEMM");
  if (env == nullptr || env[0] == '\0' || std::string(env) == "auto") return planned;
  const std::string v(env);
  TORCH_CHECK_VALUE(v == "micro" || v == "library", "twotower: TWOTOWER_LINEAR_CPU_GEMM must be auto, micro or "
                    "library, got '", v, "'");
  return v == "micro" ? tt::LinearPath::kMicro : tt::LinearPath::kLibrary;
}

std::string linear_cpu_plan_op(int64_t m, int64_t n, int64_t k, at::ScalarType dtype, std::string isa,
                               int64_t threads) {
  TORCH_CHECK_VALUE(m >= 0 && n >= 1 && k >= 0 && threads >= 1, "twotower: linear_cpu_plan needs m >= 0, n >= 1, "
                    "k >= 0 and threads >= 1, got m = ", m, ", n = ", n, ", k = ", k, ", threads = ", threads);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16, "twotower: dtype must be float32 or bfloat16, got ",
                   dtype);
  tt::CpuIsa best = tt::cpu_best_isa();
  TORCH_CHECK_VALUE(isa.empty() || tt::cpu_isa_from_name(isa.c_str(), &best), "twotower: isa must be '' (this CPU's "
                    "best), scalar, avx2, avx512, avx512_bf16 or amx, got '", isa, "'");
  const auto dt = dtype == at::kFloat ? tt::DType::kFloat32 : tt::DType::kBFloat16;
  const auto plan = tt::linear_cpu_plan(m, n, k, dt, best, threads);
  if (plan.path == tt::LinearPath::kLibrary) return "library";
  const std::string micro = std::string("micro:") + tt::cpu_isa_name(plan.isa);
  return plan.row_blocks == 1 ? micro : micro + "/rows" + std::to_string(plan.row_blocks);
}

}  // namespace

namespace tt::torch_glue {

using at::Tensor;

tt::LinearPlan linear_call_plan(int64_t M, int64_t N, int64_t K, tt::DType dt) {
  auto plan = tt::linear_cpu_plan(M, N, K, dt, cpu_isa_from_env("TWOTOWER_LINEAR_CPU_ISA", tt::CpuIsa::kAmx),
                                  at::get_num_threads());
  plan.path = forced_path(plan.path);
  return plan;
}

at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& w, int64_t n) {
  TORCH_CHECK(x_in.dim() >= 1, "twotower: x must be [..., in_features], got a 0-d tensor");
  const Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, x_in.size(-1)});  // a view where the rows allow it
  tt::LinearParams p = check_linear(x, w, n);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = n;
  Tensor y = at::empty(shape, x.options());
  p.y = y.data_ptr();
  p.y_stride = n;
  if (p.M == 0) return y;
  y = y.view({p.M, n});
  const auto plan = linear_call_plan(p.M, p.N, p.K, p.dtype);
  if (plan.path == tt::LinearPath::kLibrary) run_library(x, w, y, p, plan.isa);
  else run_micro(plan, p);
  return y.view(shape);
}

}  // namespace tt::torch_glue

TORCH_LIBRARY_IMPL(twotower, CPU, m) { m.impl("linear", &tt::torch_glue::linear_cpu); }
TORCH_LIBRARY_IMPL(twotower, CompositeExplicitAutograd, m) { m.impl("linear_cpu_plan", &linear_cpu_plan_op); }
