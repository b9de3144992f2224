// See cpu_gemm_torch.h.
#include "common/cpu_gemm_torch.h"

#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <cstdlib>
#include <exception>
#include <string>
#include <tuple>
#include <vector>

namespace tt::torch_glue {
namespace {

void gemm(void* ctx, tt::DType dt, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B,
               int64_t ldb, bool trans_b, float* C, int64_t ldc, bool accumulate) {
  using at::native::cpublas::brgemm;
  const bool vnni = static_cast<CpuGemmCtx*>(ctx)->vnni;
  const auto st = dt == tt::DType::kFloat32 ? at::kFloat : dt == tt::DType::kBFloat16 ? at::kBFloat16 : at::kHalf;
  auto a = at::from_blob(const_cast<void*>(A), {M, K}, {lda, 1}, st);
  auto b = trans_b ? at::from_blob(const_cast<void*>(B), {N, K}, {ldb, 1}, st).t()
                   : at::from_blob(const_cast<void*>(B), {K, N}, {ldb, 1}, st);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, at::kFloat);
  if (dt == tt::DType::kFloat32 || (vnni && K % 2 != 0)) {
    // fp32 operands, or VNNI pairs that an odd K cannot fill: widen (exact) and use sgemm.
    if (dt != tt::DType::kFloat32) {
      a = a.to(at::kFloat);
      b = b.to(at::kFloat);
    }
    accumulate ? at::addmm_out(c, c, a, b) : at::mm_out(c, a, b);
    return;
  }
  if (trans_b) b = b.contiguous();  // brgemm takes B as [K, N] rows only
  thread_local std::vector<uint16_t> packed;
  const void* bp = b.data_ptr();
  int64_t ld = b.stride(0);
  if (vnni) {
    if (packed.size() < size_t(K * N)) packed.resize(K * N);
    at::native::cpublas::pack(K, N, ld, N, st, st, bp, packed.data());
    bp = packed.data();
    ld = N;
  }
  if (dt == tt::DType::kBFloat16) {
    brgemm(M, N, K, lda, ld, ldc, accumulate, static_cast<const at::BFloat16*>(A), static_cast<const at::BFloat16*>(bp),
           C, vnni);
  } else {
    brgemm(M, N, K, lda, ld, ldc, accumulate, static_cast<const at::Half*>(A), static_cast<const at::Half*>(bp), C,
           vnni);
  }
}

// bf16/fp16 tiles go to the matrix library as they are only where it has native units for them (AMX: oneDNN's
// brgemm can pack); elsewhere widening to fp32 and sgemm is far faster than ATen's bf16 fallback GEMM.

// Whether oneDNN's packed brgemm really runs for `st` here. A CPU can report AMX (could_pack) inside a VM that
// does not grant the AMX tile state: oneDNN then creates small ukernels but throws for the tile sizes the kernels
// use (seen: 16x64x64 runs, 64x256x128 throws "could not create a BRGeMM ukernel packing B object"). Probed once
// per dtype at the kernels' largest tiles, on integer-valued operands whose exact product is known, so a
// provider that fails or computes garbage is never used.
bool probe_native(at::ScalarType st) {
  if (!at::native::cpublas::could_pack(st)) return false;
  const auto dt = st == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
  try {
    for (const auto& [M, N, K, trans_b] : {std::tuple<int64_t, int64_t, int64_t, bool>{256, 256, 256, true},
                                           {256, 256, 256, false}}) {
      auto a = at::ones({M, K}, at::TensorOptions().dtype(st));
      auto b = at::full(trans_b ? std::vector<int64_t>{N, K} : std::vector<int64_t>{K, N}, 2.0, st);
      auto c = at::zeros({M, N}, at::TensorOptions().dtype(at::kFloat));
      CpuGemmCtx ctx{true};
      gemm(&ctx, dt, M, N, K, a.data_ptr(), K, b.data_ptr(), trans_b ? K : N, trans_b, c.data_ptr<float>(), N, false);
      at::native::cpublas::brgemm_release(true);
      if (!c.eq(float(2 * K)).all().item<bool>()) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

bool native_available(at::ScalarType st) {
  static const bool bf16 = probe_native(at::kBFloat16), fp16 = probe_native(at::kHalf);
  return st == at::kBFloat16 ? bf16 : st == at::kHalf ? fp16 : false;
}

}  // namespace

bool cpu_native_lowp(at::ScalarType st) {
  if (st == at::kFloat) return false;
  const char* env = std::getenv("TWOTOWER_CPU_LOWP_GEMM");
  if (env != nullptr && std::string(env) == "fp32") return false;
  if (env != nullptr && std::string(env) == "native") {
    TORCH_CHECK(native_available(st), "twotower: TWOTOWER_CPU_LOWP_GEMM=native but oneDNN's packed ", st,
                " brgemm does not run on this CPU (no AMX, or the OS does not grant its tile state); unset it or use fp32");
    return true;
  }
  return native_available(st);
}

CpuGemm make_cpu_gemm(at::ScalarType st, CpuGemmCtx& ctx) {
  CpuGemm g;
  g.native_lowp = cpu_native_lowp(st);
  ctx.vnni = g.native_lowp && at::native::cpublas::could_pack(st);
  g.fn = &gemm;
  g.ctx = &ctx;
  return g;
}

void cpu_gemm_release(const CpuGemmCtx& ctx) {
  if (ctx.vnni) at::native::cpublas::brgemm_release(true);
}

}  // namespace tt::torch_glue
