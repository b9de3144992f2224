// The layers' RMSNorms on the CPU (torch-free): NemotronH's RMSNorm with the residual add before it and the
// denoiser's adaLN modulation before or after it, and Mamba-2's grouped z-gated RMSNorm, each one pass over a
// row instead of ~10 framework calls. They round exactly as the plain PyTorch composition in
// python/twotower_ext/reference.py does, step by step in the model dtype T (each elementwise step computed in fp32
// and rounded to T), except for the order of the fp32 sum of squares (8 lanes, then a tree) and, in the gated
// norm, SiLU's exp (vec8_cpu.h's exp8, ~2 ulp, where torch uses its own vectorised exp).
#pragma once
#include <cstdint>

#include "common/platform.h"

namespace tt {

// Rows r of x [rows, hidden] (row strides below, last dim contiguous); T = dtype for every tensor. Per row:
//   v = add ? x + (gate ? gate[b] * add : add) : x         (b = r / rows_per_mod; v written to sum when add)
//   modulate_first: v = v * (1 + scale[b]) + shift[b]
//   h = w * T(fp32(v) / sqrt(mean(fp32(v)^2) + eps))
//   !modulate_first: h = h * (1 + scale[b]) + shift[b]     (shift / scale: both or neither)
struct RmsNormParams {
  const void* x = nullptr;
  const void* w = nullptr;                                    // [hidden]
  const void* add = nullptr;                                  // [rows, hidden] or null
  const void* gate = nullptr;                                 // [mods, hidden] or null (only with add)
  const void* shift = nullptr;                                // [mods, hidden] or null
  const void* scale = nullptr;                                // [mods, hidden] or null
  void* sum = nullptr;                                        // [rows, hidden] (with add)
  void* out = nullptr;                                        // [rows, hidden]
  int64_t rows = 0, hidden = 0, rows_per_mod = 1;
  int64_t x_stride = 0, add_stride = 0, gate_stride = 0, shift_stride = 0, scale_stride = 0, sum_stride = 0,
          out_stride = 0;
  bool modulate_first = false;
  float eps = 0.f;
  DType dtype = DType::kFloat32;
};

Status rms_norm_cpu(const RmsNormParams& p, int64_t row_begin, int64_t row_end);

// Rows of y, z [rows, width] -> out: g = fp32(y) * silu(fp32(z)); each group of `group` channels normalised
// g / sqrt(mean(g^2) + eps) in fp32, times fp32(w), rounded to T once.
struct GatedRmsNormParams {
  const void* y = nullptr;
  const void* z = nullptr;
  const void* w = nullptr;                                    // [width]
  void* out = nullptr;
  int64_t rows = 0, width = 0, group = 0;
  int64_t y_stride = 0, z_stride = 0, out_stride = 0;
  float eps = 0.f;
  DType dtype = DType::kFloat32;
};

Status gated_rms_norm_cpu(const GatedRmsNormParams& p, int64_t row_begin, int64_t row_end);

}  // namespace tt
