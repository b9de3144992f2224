// The MoE experts on the CPU (torch-free): the routing plan and the up / down work items (see moe.h).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half_cpu.h"
#include "common/vec8_cpu.h"
#include "moe/moe.h"

namespace tt {
namespace {

// 48 = a multiple of the microkernels' NR (6 on AVX-512, 3 on AVX2), so only a matrix's last tile has a
// narrower column block; 48 weight rows x K=2688 x 2 B = 258 KB streamed per item, enough to amortise the
// item's start, and H = 2688 gives 56 down items (dynamic scheduling over 2..16 threads stays balanced).
constexpr int64_t kTile = 48;
// Matrices with short rows get items of up to kMaxItemTiles 48-row tiles, up to ~kItemBytes of weights (tile_rows).
constexpr int64_t kItemBytes = int64_t(128) << 10;
constexpr int64_t kMaxItemTiles = 2;
// Columns per library call on the up path (weights widened to fp32 in chunks of this many rows).
constexpr int64_t kLibraryChunk = 192;

template <typename T> const T* at_row(const void* base, int64_t row, int64_t stride) {
  return static_cast<const T*>(base) + row * stride;
}

int64_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

float widen(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kBFloat16: return to_float(static_cast<const bf16_t*>(p)[i]);
    case DType::kFloat16: return to_float(static_cast<const fp16_t*>(p)[i]);
  }
  return 0.f;
}

// relu(v)^2, NaN-propagating (a NaN compares false and passes through).
inline float relu2(float v) {
  const float r = v < 0.f ? 0.f : v;
  return r * r;
}

// Round fp32 values to dt (stored at dst[i]); for fp32, a copy.
template <typename F>
void store_rounded(DType dt, void* dst, int64_t n, F&& value) {
  switch (dt) {
    case DType::kFloat32: {
      float* d = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = value(i);
      break;
    }
    case DType::kBFloat16: {
      bf16_t* d = static_cast<bf16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = from_float<bf16_t>(value(i));
      break;
    }
    case DType::kFloat16: {
      fp16_t* d = static_cast<fp16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = from_float<fp16_t>(value(i));
      break;
    }
  }
}

// x's dtype rounding of an fp32 value, back in fp32 (the library path's hidden values).
inline float round_to(DType dt, float v) {
  switch (dt) {
    case DType::kFloat32: return v;
    case DType::kBFloat16: return to_float(from_float<bf16_t>(v));
    case DType::kFloat16: return to_float(from_float<fp16_t>(v));
  }
  return v;
}

// rows x cols of `src` (row stride ld, elements of dt) widened into dst [rows, cols] fp32.
void widen_rows(DType dt, const void* src, int64_t ld, int64_t rows, int64_t cols, const int32_t* row_idx,
                float* dst) {
  const int64_t es = elem_size(dt);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t sr = row_idx ? row_idx[r] : r;
    const char* s = static_cast<const char*>(src) + sr * ld * es;
    float* d = dst + r * cols;
    if (dt == DType::kFloat32) {
      std::memcpy(d, s, cols * 4);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = widen(dt, s, c);
    }
  }
}

// `rows` weight rows (ld apart) as fp32: in place for fp32, else widened into buf; *ldb gets their stride.
const float* fp32_rows(DType dt, const void* w, int64_t ld, int64_t rows, int64_t cols, std::vector<float>& buf,
                       int64_t* ldb) {
  if (dt == DType::kFloat32) {
    *ldb = ld;
    return static_cast<const float*>(w);
  }
  buf.resize(rows * cols);
  widen_rows(dt, w, ld, rows, cols, nullptr, buf.data());
  *ldb = cols;
  return buf.data();
}

// Expert e's weight rows [n0, n0 + rows) of w_up (up) or w_down as a GEMM's B operand (rows contiguous, *ldb
// elements apart): in x's dtype for the microkernel, or (wide) in fp32 holding x's dtype's values for the matrix
// library. Dense weights are used in place where they already are that, else widened into buf; quantised ones are
// dequantised into buf, one tile (or library chunk) at a time, never a whole expert.
const void* weight_rows(const MoeParams& p, MoeCpuIsa isa, bool up, int64_t e, int64_t n0, int64_t rows, bool wide,
                        std::vector<float>& buf, int64_t* ldb) {
  const int64_t K = up ? p.hidden : p.inter, N = up ? p.inter : p.hidden;
  const int64_t se = up ? p.up_stride_e : p.down_stride_e, sn = up ? p.up_stride_n : p.down_stride_n;
  if (p.format == MoeWeightFormat::kDense) {
    const void* w = static_cast<const char*>(up ? p.w_up : p.w_down) + (e * se + n0 * sn) * elem_size(p.dtype);
    if (wide) return fp32_rows(p.dtype, w, sn, rows, K, buf, ldb);
    *ldb = sn;
    return w;
  }
  const int64_t per_row = p.format == MoeWeightFormat::kFp8 ? 1 : (K + p.group - 1) / p.group;
  const MoeQuantRows q{p.format, static_cast<const uint8_t*>(up ? p.w_up : p.w_down) + e * se + n0 * sn, sn,
                       static_cast<const char*>(up ? p.up_scale : p.down_scale) +
                           (e * N + n0) * per_row * elem_size(p.scale_dtype),
                       p.scale_dtype, p.group, rows, K};
  buf.resize((rows * K * (wide ? 4 : elem_size(p.dtype)) + 3) / 4);
  moe_dequant_rows(isa, q, p.dtype, wide, buf.data());
  *ldb = K;
  return buf.data();
}

// The matrix library on fp32 operands: C[M, N] = A[M, K] @ B[N, K]^T.
void library_nt(const CpuGemm& g, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                int64_t ldb, float* C, int64_t ldc) {
  g.fn(g.ctx, M, N, K, A, lda, B, ldb, true, C, ldc, false);
}

// Rows per work item for an [n, k] weight matrix: kTile, or for short rows (the width-1/8 model's experts: k = 320
// or 232, 15-60 KB per 48 rows) kMaxItemTiles tiles where they stay under kItemBytes, at most the whole matrix.
// An expert's items are contiguous weight rows that the threads claim one after another, so 48-row items of short
// rows broke each thread's stream into small pieces. Measured on the 2-core Xeon, the width-1/8 model's 23 MoE calls
// of a pass replayed with the experts evicted (medians of 7, three alternating runs each), 2 threads, bf16:
// denoiser 18.2-19.3 ms -> 16.4-17.1 with 96-row items, AR step 2.10-2.60 -> 1.95-2.14; fp32 unchanged (33.8-34.6
// both). Items of a whole matrix (192-240 rows) were slower at 2 threads (bf16 denoiser 20.3-21.4: 2 uneven items
// per matrix do not balance). Equal widths (78 / 84 rows) instead of 96 + a remainder, alternating with 96-row items:
// fp32 denoiser 31.2-32.3 -> 30.0-30.7 ms, bf16 18.3-19.0 -> 16.1-18.5 (a slower hour of the machine).
int64_t tile_rows(const MoeParams& p, int64_t n, int64_t k) {
  // A quantised row is dequantised into a scratch of x's dtype: its bytes there bound the item too.
  const int64_t row_bytes = std::max({int64_t(1), moe_weight_bytes(p, 1, k), k * elem_size(p.dtype)});
  const int64_t tiles = std::clamp<int64_t>(kItemBytes / (row_bytes * kTile), 1, kMaxItemTiles);
  if (tiles == 1) return kTile;
  // As many items as tiles of tiles * kTile rows would give, of equal width (a multiple of 6, every microkernel's
  // NR): a down call's items are its only ones (each spans every active expert), and 96 + 96 + 96 + 32 rows over 2
  // threads leave one idle for a third of the phase, 84 + 84 + 84 + 68 do not.
  const int64_t items = (n + tiles * kTile - 1) / (tiles * kTile);
  return ((n + items - 1) / items + 5) / 6 * 6;
}

}  // namespace

void moe_cpu_plan(const MoeParams& p, const MoeCpuConfig& cfg, MoeCpuPlan& pl) {
  const int64_t T = p.tokens, k = p.topk, E = p.experts, n = T * k;
  pl.active.clear();
  pl.begin.clear();
  pl.library.clear();
  pl.up_items.clear();
  pl.any_library = false;
  pl.bad_index = -1;
  pl.bad_value = 0;
  std::vector<int64_t>& count = pl.work_count;
  std::vector<int32_t>& ids = pl.work_ids;
  count.assign(E + 1, 0);
  ids.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = p.ids_int64 ? static_cast<const int64_t*>(p.expert_ids)[i]
                                  : static_cast<const int32_t*>(p.expert_ids)[i];
    if (e < 0 || e >= E) {
      pl.bad_index = i;
      pl.bad_value = e;
      return;
    }
    ids[i] = int32_t(e);
    ++count[e];
  }
  std::vector<int64_t>& pos = count;  // reused in place: each active expert's next slot
  pl.begin.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    if (count[e] == 0) continue;
    const int64_t c = count[e];
    pos[e] = pl.begin.back();
    pl.active.push_back(int32_t(e));
    pl.begin.push_back(pl.begin.back() + c);
  }
  pl.slot_token.resize(n);
  pl.slot_weight.resize(n);
  for (int64_t i = 0; i < n; ++i) {  // row-major (t, j): tokens ascending within each expert
    const int64_t s = pos[ids[i]]++;
    pl.slot_token[s] = int32_t(i / k);
    pl.slot_weight[s] = p.weights_fp64 ? static_cast<const double*>(p.expert_weights)[i]
                                       : double(static_cast<const float*>(p.expert_weights)[i]);
  }
  pl.tile_up = tile_rows(p, p.inter, p.hidden);
  pl.tile_down = tile_rows(p, p.hidden, p.inter);
  const int64_t na = int64_t(pl.active.size()), max_micro = moe_micro_max_rows(cfg.isa, p.dtype);
  pl.library.resize(na);
  for (int64_t a = 0; a < na; ++a) {
    const int64_t rows = pl.begin[a + 1] - pl.begin[a];
    pl.library[a] = cfg.gemm == MoeCpuGemmChoice::kLibrary ||
                    (cfg.gemm == MoeCpuGemmChoice::kAuto && rows > max_micro);
    pl.any_library = pl.any_library || pl.library[a];
  }
  const int64_t tiles = (p.inter + pl.tile_up - 1) / pl.tile_up;
  for (int64_t a = 0; a < na; ++a)
    if (pl.library[a]) pl.up_items.push_back({int32_t(a), -1});
  for (int64_t a = 0; a < na; ++a)
    if (!pl.library[a])
      for (int64_t t = 0; t < tiles; ++t) pl.up_items.push_back({int32_t(a), int32_t(t)});
}

Status moe_cpu_up_item(const MoeParams& p, const MoeCpuPlan& pl, const MoeCpuConfig& cfg, const MoeUpItem& item,
                       const MoeCpuBuffers& buf, MoeCpuScratch& s) {
  const int64_t a = item.a, e = pl.active[a], s0 = pl.begin[a], M = pl.begin[a + 1] - s0;
  const int64_t H = p.hidden, I = p.inter, es = elem_size(p.dtype);
  const int32_t* tok = pl.slot_token.data() + s0;
  int64_t ldb = 0;
  if (item.tile >= 0) {  // microkernel: x rows read in place through the token list
    const int64_t n0 = item.tile * pl.tile_up, nt = std::min(pl.tile_up, I - n0);
    s.c.resize(M * nt);
    const void* b = weight_rows(p, cfg.isa, true, e, n0, nt, false, s.wb, &ldb);
    moe_gemm_nt(cfg.isa, p.dtype, M, nt, H, p.x, tok, p.x_stride, b, ldb, s.c.data(), nt);
    for (int64_t i = 0; i < M; ++i) {
      float* c = s.c.data() + i * nt;
      void* h = static_cast<char*>(buf.hidden) + ((s0 + i) * I + n0) * es;
      if (p.dtype == DType::kBFloat16) {  // 8 at a time: the scalar rounding's NaN branch keeps GCC from vectorising
        int64_t j = 0;
        for (; j + kLanes8 <= nt; j += kLanes8) {
          const f32x8 v = load8(c + j), r = v < splat8(0.f) ? splat8(0.f) : v;  // relu(NaN) = NaN
          store_bf16x8(static_cast<uint16_t*>(h) + j, r * r);
        }
        for (; j < nt; ++j) static_cast<bf16_t*>(h)[j] = from_float<bf16_t>(relu2(c[j]));
      } else {
        store_rounded(p.dtype, h, nt, [c](int64_t j) { return relu2(c[j]); });
      }
    }
    return Status::kOk;
  }
  // Library path: the expert's x rows gathered (and widened) once, the weights widened chunk by chunk.
  s.wa.resize(M * H);
  widen_rows(p.dtype, p.x, p.x_stride, M, H, tok, s.wa.data());
  const int64_t chunk = std::min(kLibraryChunk, I);
  s.c.resize(M * chunk);
  for (int64_t n0 = 0; n0 < I; n0 += chunk) {
    const int64_t nt = std::min(chunk, I - n0);
    const float* b = static_cast<const float*>(weight_rows(p, cfg.isa, true, e, n0, nt, true, s.wb, &ldb));
    library_nt(cfg.library, M, nt, H, s.wa.data(), H, b, ldb, s.c.data(), nt);
    for (int64_t i = 0; i < M; ++i) {
      const float* c = s.c.data() + i * nt;
      float* h = buf.hidden32 + (s0 + i) * I + n0;
      for (int64_t j = 0; j < nt; ++j) h[j] = round_to(p.dtype, relu2(c[j]));
    }
  }
  return Status::kOk;
}

Status moe_cpu_down_item(const MoeParams& p, const MoeCpuPlan& pl, const MoeCpuConfig& cfg, int64_t tile,
                         const MoeCpuBuffers& buf, MoeCpuScratch& s) {
  const int64_t T = p.tokens, H = p.hidden, I = p.inter, es = elem_size(p.dtype);
  const int64_t n0 = tile * pl.tile_down, nt = std::min(pl.tile_down, H - n0);
  s.acc.assign(T * nt, 0.0);
  const int64_t na = int64_t(pl.active.size());
  for (int64_t a = 0; a < na; ++a) {
    const int64_t e = pl.active[a], s0 = pl.begin[a], M = pl.begin[a + 1] - s0;
    s.c.resize(M * nt);
    int64_t ldb = 0;
    const void* b = weight_rows(p, cfg.isa, false, e, n0, nt, pl.library[a], s.wb, &ldb);
    if (!pl.library[a]) {
      moe_gemm_nt(cfg.isa, p.dtype, M, nt, I, static_cast<const char*>(buf.hidden) + s0 * I * es, nullptr, I, b, ldb,
                  s.c.data(), nt);
    } else {
      library_nt(cfg.library, M, nt, I, buf.hidden32 + s0 * I, I, static_cast<const float*>(b), ldb, s.c.data(), nt);
    }
    // The combine: each slot's output, times its weight, into its token's fp64 row.
    for (int64_t i = 0; i < M; ++i) {
      const double wt = pl.slot_weight[s0 + i];
      const float* c = s.c.data() + i * nt;
      double* acc = s.acc.data() + int64_t(pl.slot_token[s0 + i]) * nt;
      for (int64_t j = 0; j < nt; ++j) acc[j] += wt * double(c[j]);
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const double* acc = s.acc.data() + t * nt;
    store_rounded(p.dtype, static_cast<char*>(p.y) + (t * p.y_stride + n0) * es, nt,
                  [acc](int64_t j) { return float(acc[j]); });
  }
  return Status::kOk;
}

}  // namespace tt
