// CPU RMSNorms (norm.h): 8 channels per vector (common/vec8_cpu.h), each elementwise step rounded to T as the
// reference rounds it; the normalised row's fp32 values wait in a per-thread scratch row between the sum of squares
// and the scaling, so every input is read once.
#include <cmath>
#include <vector>

#include "common/vec8_cpu.h"
#include "norm/norm.h"

namespace tt {
namespace {

template <typename T> const T* row(const void* base, int64_t r, int64_t stride) {
  return static_cast<const T*>(base) + r * stride;
}

// v * (1 + scale) + shift, rounded to T after each step (three framework ops in the reference).
template <typename T> inline f32x8 modulate8(f32x8 v, const T* shift, const T* scale, int64_t n) {
  const f32x8 one_plus = round8<T>(splat8(1.f) + widen8_n<T>(scale, n));
  return round8<T>(round8<T>(v * one_plus) + widen8_n<T>(shift, n));
}

template <typename T> void rms_norm_rows(const RmsNormParams& p, int64_t r0, int64_t r1) {
  const int64_t H = p.hidden;
  thread_local std::vector<float> buf;
  buf.resize((H + kLanes8 - 1) / kLanes8 * kLanes8);
  const bool mod = p.shift != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.rows_per_mod;
    const T* x = row<T>(p.x, r, p.x_stride);
    const T* shift = mod ? row<T>(p.shift, b, p.shift_stride) : nullptr;
    const T* scale = mod ? row<T>(p.scale, b, p.scale_stride) : nullptr;
    f32x8 acc = splat8(0.f);
    for (int64_t c = 0; c < H; c += kLanes8) {
      const int64_t n = H - c;
      f32x8 v = widen8_n<T>(x + c, n);
      if (p.add) {
        f32x8 a = widen8_n<T>(row<T>(p.add, r, p.add_stride) + c, n);
        if (p.gate) a = round8<T>(widen8_n<T>(row<T>(p.gate, b, p.gate_stride) + c, n) * a);
        v = round8<T>(v + a);
        narrow8_n<T>(static_cast<T*>(p.sum) + r * p.sum_stride + c, v, n);
      }
      if (mod && p.modulate_first) v = modulate8<T>(v, shift + c, scale + c, n);
      store8(buf.data() + c, v);
      acc += v * v;  // lanes past the row are 0
    }
    const float inv = 1.f / std::sqrt(hsum8(acc) / float(H) + p.eps);
    const T* w = static_cast<const T*>(p.w);
    T* out = static_cast<T*>(p.out) + r * p.out_stride;
    for (int64_t c = 0; c < H; c += kLanes8) {
      const int64_t n = H - c;
      f32x8 h = round8<T>(widen8_n<T>(w + c, n) * round8<T>(load8(buf.data() + c) * splat8(inv)));
      if (mod && !p.modulate_first) h = modulate8<T>(h, shift + c, scale + c, n);
      narrow8_n<T>(out + c, h, n);
    }
  }
}

template <typename T> void gated_rms_norm_rows(const GatedRmsNormParams& p, int64_t r0, int64_t r1) {
  const int64_t G = p.group;
  thread_local std::vector<float> buf;
  buf.resize((G + kLanes8 - 1) / kLanes8 * kLanes8);
  const T* w = static_cast<const T*>(p.w);
  for (int64_t r = r0; r < r1; ++r) {
    const T* y = row<T>(p.y, r, p.y_stride);
    const T* z = row<T>(p.z, r, p.z_stride);
    T* out = static_cast<T*>(p.out) + r * p.out_stride;
    for (int64_t g0 = 0; g0 < p.width; g0 += G) {
      f32x8 acc = splat8(0.f);
      for (int64_t c = 0; c < G; c += kLanes8) {
        const int64_t n = G - c;
        const f32x8 g = widen8_n<T>(y + g0 + c, n) * silu8(widen8_n<T>(z + g0 + c, n));
        store8(buf.data() + c, g);
        acc += g * g;
      }
      const float inv = 1.f / std::sqrt(hsum8(acc) / float(G) + p.eps);
      for (int64_t c = 0; c < G; c += kLanes8) {
        const int64_t n = G - c;
        narrow8_n<T>(out + g0 + c, (load8(buf.data() + c) * splat8(inv)) * widen8_n<T>(w + g0 + c, n), n);
      }
    }
  }
}

}  // namespace

Status rms_norm_cpu(const RmsNormParams& p, int64_t row_begin, int64_t row_end) {
  switch (p.dtype) {
    case DType::kFloat32: rms_norm_rows<float>(p, row_begin, row_end); return Status::kOk;
    case DType::kBFloat16: rms_norm_rows<bf16_t>(p, row_begin, row_end); return Status::kOk;
    case DType::kFloat16: rms_norm_rows<fp16_t>(p, row_begin, row_end); return Status::kOk;
  }
  return Status::kUnsupportedDType;
}

Status gated_rms_norm_cpu(const GatedRmsNormParams& p, int64_t row_begin, int64_t row_end) {
  switch (p.dtype) {
    case DType::kFloat32: gated_rms_norm_rows<float>(p, row_begin, row_end); return Status::kOk;
    case DType::kBFloat16: gated_rms_norm_rows<bf16_t>(p, row_begin, row_end); return Status::kOk;
    case DType::kFloat16: gated_rms_norm_rows<fp16_t>(p, row_begin, row_end); return Status::kOk;
  }
  return Status::kUnsupportedDType;
}

}  // namespace tt
