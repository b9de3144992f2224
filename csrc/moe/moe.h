// Sparse fused MoE experts (torch-free): only the experts some token routes to are read, each once per call.
//   x [T, H]; expert_ids [T, k] in [0, E); expert_weights [T, k] fp32|fp64; w_up [E, I, H]; w_down [E, H, I]
//   y[t] = sum_j expert_weights[t, j] * w_down[e] @ h(e, t),  e = expert_ids[t, j]
//   h(e, t) = round_to_x_dtype(relu(w_up[e] @ x[t])^2)      (a no-op in fp32)
// Numerics: both GEMMs accumulate in fp32; the hidden activation is rounded to x's dtype once (what a bf16
// tensor-core GEMM consumes on CUDA, and the old per-expert loop in bf16 did); each token's k weighted
// expert outputs are summed in fp64 on the CPU (fp32 on CUDA) and rounded to x's dtype once. NaN anywhere
// in a selected expert's path propagates (relu(NaN) = NaN); unselected experts are never read.
//
// Plan (both devices): count the (token, choice) slots per expert, prefix-sum, list each expert's slots;
// the active experts (count > 0) are compacted in ascending id order. Then a grouped small-M GEMM per
// (active expert, N tile) for up (+ relu^2) into the slot-major hidden buffer [T*k, I], one per
// (active expert, N tile) for down, and the weighted combine.
#pragma once
#include <cstdint>
#include <vector>

#include "block_attention/block_attention.h"  // CpuGemm
#include "common/cpu_isa.h"
#include "common/platform.h"
#include "linear/linear.h"  // the shared expert's packed linears

namespace tt {

// How w_up / w_down are stored (python/twotower_ext/quant.py is the reference of both quantised formats):
//   kDense: in x's dtype.
//   kFp8:  float8_e4m3fn bytes [E, N, K]; scale fp32 [E, N] (one per output channel).
//   kInt4: uint8 [E, N, ceil(K/2)], element k in byte k/2 (even k low nibble), value q + 8 with q in [-8, 7];
//          scale bf16|fp16 [E, N, ceil(K/group)] (group consecutive k per scale; the last group may be shorter).
// Dequantised weight = round_to_x_dtype(float(q) * float(scale)), formed in the inner loop (never a full
// dequantised copy of an expert in memory).
enum class MoeWeightFormat : int32_t { kDense = 0, kFp8 = 1, kInt4 = 2 };

struct MoeParams {
  const void* x;                 // [T, H], row stride below, last dim contiguous
  const void* expert_ids;        // [T, k] contiguous, int32 or int64
  const void* expert_weights;    // [T, k] contiguous, fp32 or fp64
  const void* w_up;              // [E, I, H], strides below, last dim contiguous
  const void* w_down;            // [E, H, I], strides below, last dim contiguous
  void* y;                       // [T, H], row stride below, last dim contiguous
  int64_t tokens, topk, experts, hidden, inter;   // T, k, E, H, I
  int64_t x_stride, y_stride;
  int64_t up_stride_e, up_stride_n, down_stride_e, down_stride_n;
  bool ids_int64, weights_fp64;
  DType dtype;                   // of x and y (and of w_up / w_down when dense)
  // Quantised weights (format != kDense): the w_up / w_down strides above count storage elements (bytes for
  // both formats: fp8 one byte per weight, int4 one byte per two); the scales are contiguous [E, N(, groups)].
  MoeWeightFormat format = MoeWeightFormat::kDense;
  const void* up_scale = nullptr;     // fp8: fp32 [E, I]; int4: [E, I, ceil(H/group)]
  const void* down_scale = nullptr;   // fp8: fp32 [E, H]; int4: [E, H, ceil(I/group)]
  int64_t group = 0;                  // int4 group size (even), 0 otherwise
  DType scale_dtype = DType::kFloat32;  // fp8: fp32; int4: bf16 or fp16
};

// ---------------------------------------------------------------------------------------------------
// CPU. The plan is built on the host from the (CPU) ids; then the up phase runs over work items (active
// expert, I tile), and the down phase over H tiles, each doing every active expert's GEMM for its columns
// and the fp64 combine of all tokens for them (each y element is written once, no [T*k, H] scratch, no
// third parallel region). Experts with many tokens go to the matrix library instead (moe_micro_max_rows):
// one up item per such expert, its x rows gathered and widened to fp32 once, its hidden rows kept in fp32.
// Quantised weights are dequantised where a tile is consumed, never a whole expert: the microkernel's 48 weight
// rows x K into a per-thread scratch in x's dtype (then the same GEMM as dense weights), the library path's
// row chunks into fp32 holding x's dtype's values (moe_dequant_rows).

// Which inner GEMM the CPU kernel uses (see moe_gemm_cpu.cpp for why the defaults are what they are).
// The instruction sets it has code for: scalar .. kAvx512Bf16 (common/cpu_isa.h; no AMX path).
using MoeCpuIsa = CpuIsa;
constexpr CpuIsa kMoeCpuIsaMax = CpuIsa::kAvx512Bf16;
enum class MoeCpuGemmChoice : int32_t { kAuto = 0, kMicro = 1, kLibrary = 2 };

struct MoeCpuConfig {
  MoeCpuIsa isa = MoeCpuIsa::kScalar;
  MoeCpuGemmChoice gemm = MoeCpuGemmChoice::kAuto;
  CpuGemm library;               // the matrix library (MKL sgemm) through the torch glue, fp32 operands
};

struct MoeUpItem {
  int32_t a;                     // active expert index
  int32_t tile;                  // I tile, or -1: all of I (an expert on the library path)
};

struct MoeCpuPlan {
  std::vector<int32_t> active;       // active expert ids, ascending
  std::vector<int64_t> begin;        // [active + 1]: active expert a owns slots [begin[a], begin[a+1])
  std::vector<uint8_t> library;      // [active]: expert a's GEMMs go to the matrix library
  std::vector<int32_t> slot_token;   // [T*k] token of each slot (tokens ascending within an expert)
  std::vector<double> slot_weight;   // [T*k] its routing weight
  std::vector<MoeUpItem> up_items;   // library experts first (the largest items), then (expert, tile)
  int64_t tile_up = 0, tile_down = 0;   // N-tile widths (a multiple of every microkernel's NR)
  bool any_library = false;
  int64_t bad_index = -1;            // first flat (t*k + j) whose id is outside [0, E), or -1
  int64_t bad_value = 0;             // that id
  std::vector<int64_t> work_count;   // planning scratch: slots per expert, then each active expert's next slot
  std::vector<int32_t> work_ids;     // planning scratch: the ids as int32
};

// Fills pl for p's routing; its vectors keep their capacity, so a plan reused across calls allocates nothing once
// warm.
void moe_cpu_plan(const MoeParams& p, const MoeCpuConfig& cfg, MoeCpuPlan& pl);
inline int64_t moe_down_tiles(const MoeParams& p, const MoeCpuPlan& pl) {
  return (p.hidden + pl.tile_down - 1) / pl.tile_down;
}

// The hidden activations, slot-major [T*k, I]: in x's dtype for experts on the microkernel, in fp32 (values
// already rounded to x's dtype) for experts on the library path (only allocated when there are any; for
// fp32 both point at one buffer).
struct MoeCpuBuffers {
  void* hidden;
  float* hidden32;
};

// Scratch of one CPU thread (grown on demand, reused across items).
struct MoeCpuScratch {
  std::vector<float> c;          // GEMM output tile
  std::vector<double> acc;       // the down phase's fp64 combine [T, tile]
  std::vector<float> wa;         // the matrix library path's fp32 x rows
  std::vector<float> wb;         // weight rows widened (library path) or dequantised (quantised formats)
};

Status moe_cpu_up_item(const MoeParams& p, const MoeCpuPlan& pl, const MoeCpuConfig& cfg, const MoeUpItem& item,
                       const MoeCpuBuffers& buf, MoeCpuScratch& s);
Status moe_cpu_down_item(const MoeParams& p, const MoeCpuPlan& pl, const MoeCpuConfig& cfg, int64_t tile,
                         const MoeCpuBuffers& buf, MoeCpuScratch& s);

// The MoE layer's shared expert fused into the call (moe_shared_cpu.cpp): y += down @ relu(up @ x)^2 for every
// token, with ops.linear's packed weights and micro kernel. up: x [T, H] -> the hidden [T, I_s] (its y, rows y_stride
// apart; for AMX, x_amx is x's padded copy); down: that hidden (x, and x_amx: the same buffer, zero-padded to AMX's
// whole tiles) -> [T, H] (its y, a scratch). Both on `isa` (linear_cpu_plan's for the call's rows).
struct MoeShared {
  LinearParams up, down;
  CpuIsa isa = CpuIsa::kScalar;
};
// Work items of ~kMoeSharedItemBytes of weights (about a routed up item's), whole panels each.
constexpr int64_t kMoeSharedItemBytes = int64_t(64) << 10;
int64_t moe_shared_item_panels(const LinearParams& w);
// Up panels [p0, p1) then their relu^2 in place (rounded to the dtype); down panels [p0, p1).
void moe_shared_up_panels(const MoeShared& s, int64_t p0, int64_t p1);
void moe_shared_down_panels(const MoeShared& s, int64_t p0, int64_t p1);
// y [T, H] (the routed output, rows y_stride apart) += the down output, rounded once (after both phases).
void moe_shared_add(const MoeShared& s, void* y, int64_t y_stride);

// The inner GEMM: C[m, n] = sum_k A[row(m), k] * B[n, k] (fp32 accumulate; A and B both of `dt`, B rows
// contiguous in k, ldb apart; row(m) = a_rows[m] or m when a_rows is null; C rows ldc apart).
void moe_gemm_nt(MoeCpuIsa isa, DType dt, int64_t M, int64_t N, int64_t K, const void* A, const int32_t* a_rows,
                 int64_t lda, const void* B, int64_t ldb, float* C, int64_t ldc);
// `rows` consecutive rows of one quantised expert matrix [N, K] (moe_dequant_cpu.cpp).
struct MoeQuantRows {
  MoeWeightFormat format;        // kFp8 | kInt4
  const uint8_t* data;           // the first row's bytes
  int64_t ld;                    // bytes between rows
  const void* scale;             // the first row's scales, contiguous: fp8 one per row; int4 ceil(k/group) per row
  DType scale_dtype;
  int64_t group;                 // int4 group size (even); unused for fp8
  int64_t rows, k;
};
// Dequantises q into dst [rows, k] (rows k apart): round_to(dt, float(q) * float(scale)), exactly quant.dequantize,
// stored in dt, or (wide, the matrix-library path) as fp32 holding those dt values. Vectorised per `isa`.
void moe_dequant_rows(MoeCpuIsa isa, const MoeQuantRows& q, DType dt, bool wide, void* dst);
// Stored bytes (data + scales) of one expert matrix [n, k] in p's format and dtype.
int64_t moe_weight_bytes(const MoeParams& p, int64_t n, int64_t k);
// Below this many tokens per expert the register-blocked microkernel beats the matrix library (measured,
// see moe_gemm_cpu.cpp); kAuto picks per expert with it. fp32: no limit (its sums must not follow the batch).
int64_t moe_micro_max_rows(MoeCpuIsa isa, DType dt);

// ---------------------------------------------------------------------------------------------------
// CUDA. One launch sequence sized for the worst case, no host synchronisation: route (counts, prefix,
// slot lists, compacted active list) -> up (grid: min(E, T*k) expert slots x I tiles; slots past the
// active count exit at once) -> down (same over H tiles, per-slot fp32 outputs) -> combine (per token,
// choices summed in j order). Out-of-range ids: the (token, choice) is skipped (contributes 0) and bit 0
// of the error word is set; the adapter checks it only with TWOTOWER_MOE_DEBUG=1 (that synchronises).
// Every (x dtype, weight format) runs: fp8 / int4 weight tiles are dequantised in registers on the way to the
// tensor cores (or per element on the SIMT kernel); moe_cuda_plan.h's moe_cuda_path picks the kernel. The
// workspace does not depend on the format. A scale dtype that is not the format's: kUnsupportedDType.

constexpr int32_t kMoeErrBadId = 1;
constexpr int64_t kMoeCudaMaxExperts = 12 * 1024;  // the route kernel counts per expert in shared memory

// Bytes of device workspace the CUDA path needs (counts, offsets, lists, hidden, per-slot outputs, error).
int64_t moe_cuda_workspace_bytes(const MoeParams& p);
// Offset (bytes) of the int32 error word inside the workspace.
int64_t moe_cuda_error_offset(const MoeParams& p);
Status moe_experts_cuda(const MoeParams& p, void* workspace, void* stream);

}  // namespace tt
