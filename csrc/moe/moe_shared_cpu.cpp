// The MoE layer's shared expert on the CPU (torch-free; moe.h's MoeShared): NemotronH's relu^2 MLP that every token
// runs beside its routed experts, as work items of the routed experts' own two phases (moe_torch.cpp): up panels
// with the routed up items, down panels with the routed down tiles. One call then streams the routed and the shared
// weights together, where the unfused layer ran the shared MLP as four more ops after the routed experts (two
// linears, relu, square; then the add), each a hand-off to the helpers and back.
//
// Numerics: exactly moe_experts(...) + linear(square(relu(linear(x, up))), down) in x's dtype. Each linear is
// ops.linear's micro kernel on the same instruction set (linear.h: a column range computed alone gives the bits of
// the whole call); the activation squares the rounded h and rounds again, as torch.square on a tensor of x's dtype
// does; the sum with the routed output is one rounding of the fp32 sum of the two rounded values, as torch's add.
#include <algorithm>

#include "common/half_cpu.h"
#include "common/vec8_cpu.h"
#include "moe/moe.h"

namespace tt {
namespace {

// relu(v)^2 rounded to T, in place on columns [c0, c1) of `rows` rows ld apart (relu(NaN) = NaN, as torch.relu).
template <typename T> void relu2_cols(T* h, int64_t ld, int64_t rows, int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < rows; ++m) {
    T* r = h + m * ld;
    int64_t c = c0;
    for (; c + kLanes8 <= c1; c += kLanes8) {
      const f32x8 v = widen8<T>(r + c), z = v < splat8(0.f) ? splat8(0.f) : v;
      narrow8<T>(r + c, z * z);
    }
    if (c < c1) {
      const f32x8 v = widen8_n<T>(r + c, c1 - c), z = v < splat8(0.f) ? splat8(0.f) : v;
      narrow8_n<T>(r + c, z * z, c1 - c);
    }
  }
}

template <typename T> void add_rows(T* y, int64_t y_stride, const T* a, int64_t a_stride, int64_t rows, int64_t cols) {
  for (int64_t m = 0; m < rows; ++m) {
    T* d = y + m * y_stride;
    const T* s = a + m * a_stride;
    int64_t c = 0;
    for (; c + kLanes8 <= cols; c += kLanes8) narrow8<T>(d + c, widen8<T>(d + c) + widen8<T>(s + c));
    if (c < cols) narrow8_n<T>(d + c, widen8_n<T>(d + c, cols - c) + widen8_n<T>(s + c, cols - c), cols - c);
  }
}

}  // namespace

void moe_shared_up_panels(const MoeShared& s, int64_t p0, int64_t p1) {
  linear_cpu_panels(s.isa, s.up, p0, p1);
  const int64_t c0 = p0 * kLinearPanel, c1 = std::min(p1 * kLinearPanel, s.up.N);
  if (s.up.dtype == DType::kFloat32) relu2_cols(static_cast<float*>(s.up.y), s.up.y_stride, s.up.M, c0, c1);
  else relu2_cols(static_cast<bf16_t*>(s.up.y), s.up.y_stride, s.up.M, c0, c1);
}

void moe_shared_down_panels(const MoeShared& s, int64_t p0, int64_t p1) { linear_cpu_panels(s.isa, s.down, p0, p1); }

void moe_shared_add(const MoeShared& s, void* y, int64_t y_stride) {
  const auto& d = s.down;
  if (d.dtype == DType::kFloat32)
    add_rows(static_cast<float*>(y), y_stride, static_cast<const float*>(d.y), d.y_stride, d.M, d.N);
  else
    add_rows(static_cast<bf16_t*>(y), y_stride, static_cast<const bf16_t*>(d.y), d.y_stride, d.M, d.N);
}

int64_t moe_shared_item_panels(const LinearParams& w) {
  return std::max<int64_t>(1, kMoeSharedItemBytes / linear_panel_bytes(w));
}

}  // namespace tt
