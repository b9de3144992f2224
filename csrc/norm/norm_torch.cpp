// Torch-side adapter of the norms (norm.h): argument checks (messages name the argument), the plans that fill the
// params structs, the CPU entry points and their registrations. The schemas are in csrc/registry.cpp.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "common/parallel_cpu.h"
#include "common/torch_checks.h"
#include "norm/norm.h"

namespace {

using at::Tensor;
using namespace tt::torch_glue;

// t as [rows, width] rows with a contiguous last dim (a view where t's shape allows one, else a copy).
Tensor as_rows(const Tensor& t, int64_t width) {
  Tensor r = t.reshape({-1, width});
  return r.stride(1) == 1 || width <= 1 ? r : r.contiguous();
}

void check_like(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "twotower: ", name, " must have x's dtype ", x.scalar_type(),
                   ", got ", t.scalar_type());
  check_same_device(x, "x", t, name);
}

// A per-row-group operand (shift, scale, gate): [mods, hidden] with mods dividing x's rows; returns its row stride.
int64_t check_mod(const Tensor& t, const char* name, const Tensor& x, int64_t rows, int64_t hidden, int64_t& mods) {
  check_like(t, name, x);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == hidden && t.size(0) >= 1 && rows % t.size(0) == 0, "twotower: ", name,
              " must be [groups, ", hidden, "] with groups dividing x's ", rows, " rows (row r uses group r / (rows / "
              "groups)), got shape ", t.sizes());
  TORCH_CHECK(mods < 0 || t.size(0) == mods, "twotower: ", name, " must have as many rows as the other per-group "
              "operands (", mods, "), got ", t.size(0));
  check_last_dim_contiguous(t, name);
  mods = t.size(0);
  return t.stride(0);
}

struct RmsNormPlan {
  tt::RmsNormParams p;
  Tensor x2, add2, out, sum;  // keep-alive for the views / copies the params point into
};

RmsNormPlan plan_rms_norm(const Tensor& x, const std::optional<Tensor>& add, const std::optional<Tensor>& gate,
                          const Tensor& w, double eps, const std::optional<Tensor>& shift,
                          const std::optional<Tensor>& scale, bool modulate_first) {
  RmsNormPlan plan;
  auto& p = plan.p;
  p.dtype = kernel_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "twotower: x must be [..., hidden] with hidden >= 1, got shape ",
              x.sizes());
  const int64_t H = x.size(-1);
  check_like(w, "w", x);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == H, "twotower: w must be [", H, "] (x's last dim), got shape ", w.sizes());
  TORCH_CHECK(eps >= 0, "twotower: eps must be >= 0, got ", eps);
  TORCH_CHECK(shift.has_value() == scale.has_value(), "twotower: shift and scale must be given together");
  plan.x2 = as_rows(x, H);
  p.rows = plan.x2.size(0);
  p.hidden = H;
  p.x = plan.x2.data_ptr();
  p.x_stride = plan.x2.stride(0);
  TORCH_CHECK(w.is_contiguous(), "twotower: w must be contiguous, got strides ", w.strides());
  p.w = w.data_ptr();
  int64_t mods = -1;
  if (shift) {
    p.shift_stride = check_mod(*shift, "shift", x, p.rows, H, mods);
    p.scale_stride = check_mod(*scale, "scale", x, p.rows, H, mods);
    p.shift = shift->data_ptr();
    p.scale = scale->data_ptr();
  }
  if (add) {
    check_like(*add, "add", x);
    TORCH_CHECK(add->sizes() == x.sizes(), "twotower: add must have x's shape ", x.sizes(), ", got ", add->sizes());
    plan.add2 = as_rows(*add, H);
    p.add = plan.add2.data_ptr();
    p.add_stride = plan.add2.stride(0);
    if (gate) {
      p.gate_stride = check_mod(*gate, "gate", x, p.rows, H, mods);
      p.gate = gate->data_ptr();
    }
    plan.sum = at::empty(x.sizes(), x.options());
    p.sum = plan.sum.data_ptr();
    p.sum_stride = H;
  }
  TORCH_CHECK(!gate || add, "twotower: gate needs add");
  p.rows_per_mod = mods > 0 ? p.rows / mods : 1;
  p.modulate_first = modulate_first;
  p.eps = float(eps);
  plan.out = at::empty(x.sizes(), x.options());
  p.out = plan.out.data_ptr();
  p.out_stride = H;
  return plan;
}

// Work per element for parallel_chunks: a bf16 row of the width-1/8 model (336) costs ~0.8 us on this project's Xeon (the
// rounding after every step), far above the units' ~1 ns: at 128 per element a denoiser pass's 16-row norms split
// over 2 threads. Measured in a bf16 denoiser pass at 2 threads (ms a pass, two alternating runs): add_rms_norm
// 1.05 / 0.99 -> 0.83 / 0.84, gated_rms_norm 0.38 / 0.36 -> 0.32 / 0.29 (at 4 and 16 per element they ran on one).
constexpr int64_t kNormWorkPerElement = 128;

void run_rms_norm(const tt::RmsNormParams& p) {
  tt::parallel_chunks(p.rows, p.hidden * kNormWorkPerElement, [&](int64_t b, int64_t e) {
    check_status(tt::rms_norm_cpu(p, b, e), "rms_norm");
  });
}

Tensor rms_norm_cpu(const Tensor& x, const Tensor& w, double eps, const std::optional<Tensor>& shift,
                    const std::optional<Tensor>& scale, bool modulate_first) {
  auto plan = plan_rms_norm(x, std::nullopt, std::nullopt, w, eps, shift, scale, modulate_first);
  run_rms_norm(plan.p);
  return plan.out;
}

std::tuple<Tensor, Tensor> add_rms_norm_cpu(const Tensor& x, const Tensor& add, const std::optional<Tensor>& gate,
                                            const Tensor& w, double eps, const std::optional<Tensor>& shift,
                                            const std::optional<Tensor>& scale, bool modulate_first) {
  auto plan = plan_rms_norm(x, add, gate, w, eps, shift, scale, modulate_first);
  run_rms_norm(plan.p);
  return {plan.out, plan.sum};
}

Tensor gated_rms_norm_cpu(const Tensor& y, const Tensor& z, const Tensor& w, int64_t group, double eps) {
  tt::GatedRmsNormParams p;
  p.dtype = kernel_dtype(y, "y");
  TORCH_CHECK(y.dim() >= 1 && y.size(-1) >= 1, "twotower: y must be [..., width] with width >= 1, got shape ",
              y.sizes());
  const int64_t W = y.size(-1);
  TORCH_CHECK_TYPE(z.scalar_type() == y.scalar_type() && w.scalar_type() == y.scalar_type(),
                   "twotower: z and w must have y's dtype ", y.scalar_type(), ", got ", z.scalar_type(), " and ",
                   w.scalar_type());
  check_same_device(y, "y", z, "z");
  check_same_device(y, "y", w, "w");
  TORCH_CHECK(z.sizes() == y.sizes(), "twotower: z must have y's shape ", y.sizes(), ", got ", z.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == W && w.is_contiguous(), "twotower: w must be a contiguous [", W,
              "] (y's last dim), got shape ", w.sizes(), " strides ", w.strides());
  TORCH_CHECK(group >= 1 && W % group == 0, "twotower: group must divide y's last dim ", W, ", got ", group);
  TORCH_CHECK(eps >= 0, "twotower: eps must be >= 0, got ", eps);
  const Tensor y2 = as_rows(y, W), z2 = as_rows(z, W);
  Tensor out = at::empty(y.sizes(), y.options());
  p.y = y2.data_ptr();
  p.z = z2.data_ptr();
  p.w = w.data_ptr();
  p.out = out.data_ptr();
  p.rows = y2.size(0);
  p.width = W;
  p.group = group;
  p.y_stride = y2.stride(0);
  p.z_stride = z2.stride(0);
  p.out_stride = W;
  p.eps = float(eps);
  tt::parallel_chunks(p.rows, W * kNormWorkPerElement, [&](int64_t b, int64_t e) {
    check_status(tt::gated_rms_norm_cpu(p, b, e), "gated_rms_norm");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(twotower, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("gated_rms_norm", &gated_rms_norm_cpu);
}
