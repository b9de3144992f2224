// CPU block attention: per task (b, kv head, key chunk) an online softmax over K/V tiles of kTileKeys keys,
// with all M = S*G query rows of the KV head in one GEMM per tile: fp32 tiles through the params' GEMM callback (the
// binding's matrix library), bf16 tiles natively where the CPU multiplies bf16 (block_attention_bf16_cpu.cpp). The
// softmax is vectorised with GCC vector extensions (8 lanes; AVX2 here, generic code elsewhere), no intrinsics.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "block_attention/block_attention.h"
#include "common/cpu_isa.h"
#include "common/half_cpu.h"
#include "common/vec8_cpu.h"

namespace tt {
namespace {

constexpr int64_t kTileKeys = 256;  // keys per GEMM: 256x128 @ 128x256 keeps Q, K^T, V, S, O in L2
inline float hmax(f32x8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes8; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hmin(f32x8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes8; ++i) m = std::min(m, v[i]);
  return m;
}
inline float hsum(f32x8 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes8; ++i) s += v[i];
  return s;
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Per-thread scratch, reused across tasks (sized for the largest task seen). Every tile starts on a 64-byte
// boundary: the native paths' 64-byte vector and tile rows then never straddle two cache lines.
struct Scratch {
  std::vector<float> m, l;
  std::vector<unsigned char> s, o, q, kt, v, p;
  template <typename E> static E* get(std::vector<unsigned char>& buf, int64_t n) {
    if (buf.size() < size_t(n) * sizeof(E) + 64) buf.resize(size_t(n) * sizeof(E) + 64);
    const uintptr_t a = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<E*>((a + 63) & ~uintptr_t(63));
  }
};

// A task's tiles, multiplied one of two ways:
//   kBf16 = false: fp32 tiles for the matrix library (fp32 inputs as they are; bf16 / fp16 widened exactly).
//   kBf16 = true (bf16 inputs, x86): packed bf16 tiles for ba_bf16_gemm on p.bf16's instructions; the
//     probabilities are rounded to bf16 for P V (their row sums stay fp32). Rows are padded to 16, the head dim
//     and the keys to 32, with zeros, so the GEMMs need no tails.
template <typename T, bool kBf16>
void run_task(const BlockAttentionParams& p, const BlockAttentionTask& task, int64_t slot) {
  thread_local Scratch sc;
  const int64_t G = ba_group(p), M = ba_rows(p), D = p.head_dim, Lt = kTileKeys, b = task.b, h = task.h;
  const int64_t ctx = p.ctx_lens[b];
  const int64_t Mp = kBf16 ? round_up(M, 16) : M, dq = kBf16 ? round_up(D, 32) : D, ldo = kBf16 ? round_up(D, 32) : D;
  if (sc.m.size() < size_t(M)) { sc.m.resize(M); sc.l.resize(M); }
  using Q = std::conditional_t<kBf16, uint16_t, float>;  // element of the packed Q, K and V tiles
  Q* qc = Scratch::get<Q>(sc.q, Mp * dq);
  Q* kt = Scratch::get<Q>(sc.kt, dq * Lt);
  Q* vt = Scratch::get<Q>(sc.v, Lt * ldo);
  uint16_t* pc = kBf16 ? Scratch::get<uint16_t>(sc.p, Mp * Lt) : nullptr;
  float *s = Scratch::get<float>(sc.s, Mp * Lt), *o = Scratch::get<float>(sc.o, Mp * ldo);
  float *mrow = sc.m.data(), *lrow = sc.l.data();

  // Pack the M = S*G query rows of this KV head (row m = s*G + g).
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * G * p.q_stride_h;
  if constexpr (kBf16) {
    std::fill(qc, qc + Mp * dq, uint16_t(0));
    std::fill(pc + M * Lt, pc + Mp * Lt, uint16_t(0));  // padding rows: zero probabilities
  }
  for (int64_t si = 0; si < p.block_len; ++si)
    for (int64_t g = 0; g < G; ++g) {
      const T* src = q + si * p.q_stride_s + g * p.q_stride_h;
      Q* dst = qc + (si * G + g) * dq;
      if constexpr (kBf16) std::memcpy(dst, src, D * sizeof(uint16_t));
      else for (int64_t d = 0; d < D; ++d) dst[d] = to_float(src[d]);
    }
  std::fill(o, o + Mp * ldo, 0.f);
  std::fill(mrow, mrow + M, -INFINITY);
  std::fill(lrow, lrow + M, 0.f);
  if constexpr (kBf16) ba_bf16_begin(p.bf16);

  // Row b's keys: context 0..ctx, then the block's S keys.
  const T* kc = static_cast<const T*>(p.k_ctx) + b * p.kc_stride_b + h * p.kc_stride_h;
  const T* vc = static_cast<const T*>(p.v_ctx) + b * p.vc_stride_b + h * p.vc_stride_h;
  const T* kb = static_cast<const T*>(p.k_blk) + b * p.kb_stride_b + h * p.kb_stride_h;
  const T* vb = static_cast<const T*>(p.v_blk) + b * p.vb_stride_b + h * p.vb_stride_h;
  const f32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const float c = p.scale;
  for (int64_t t0 = task.key_begin, n; t0 < task.key_end; t0 += n) {
    // A tile never straddles the context / block boundary, so its rows are evenly strided in one tensor.
    n = std::min(Lt, task.key_end - t0);
    if (t0 < ctx) n = std::min(n, ctx - t0);
    const int64_t n8 = round_up(n, kLanes8), n32 = round_up(n, 32);
    // Causal: block query s sees key t0 iff t0 < ctx + s + 1, so the rows of queries s < t0 - ctx see none
    // of this tile: both GEMMs and the softmax start at row r0 (the rows are ordered by query); the bf16 GEMMs at
    // r0 rounded down to 16, with zero probabilities in the rows between.
    const int64_t r0 = p.causal ? std::clamp<int64_t>(t0 - ctx, 0, p.block_len) * G : 0;
    if (r0 == M) continue;
    const int64_t rg = kBf16 ? r0 / 16 * 16 : r0;
    const bool in_ctx = t0 < ctx;
    const T* kt0 = in_ctx ? kc + t0 * p.kc_stride_l : kb + (t0 - ctx) * p.kb_stride_s;
    const T* vt0 = in_ctx ? vc + t0 * p.vc_stride_l : vb + (t0 - ctx) * p.vb_stride_s;
    const int64_t kld = in_ctx ? p.kc_stride_l : p.kb_stride_s, vld = in_ctx ? p.vc_stride_l : p.vb_stride_s;
    if constexpr (kBf16) {  // S = Q K^T (unscaled) on the packed tiles
      ba_pack_k_bf16(reinterpret_cast<const uint16_t*>(kt0), kld, n, D, kt);
      ba_pack_v_bf16(reinterpret_cast<const uint16_t*>(vt0), vld, n, D, vt);
      ba_bf16_gemm(p.bf16, Mp - rg, n32, dq, qc + rg * dq, dq, kt, s + rg * Lt, Lt, false);
    } else {  // K [n, D] as B^T: fp32 rows copied, 16-bit rows widened; V [n, D] in place for fp32
      for (int64_t j = 0; j < n; ++j) {
        if constexpr (std::is_same_v<T, float>) std::memcpy(kt + j * D, kt0 + j * kld, D * sizeof(float));
        else for (int64_t d = 0; d < D; ++d) kt[j * D + d] = to_float(kt0[j * kld + d]);
      }
      if constexpr (!std::is_same_v<T, float>)
        for (int64_t j = 0; j < n; ++j)
          for (int64_t d = 0; d < D; ++d) vt[j * D + d] = to_float(vt0[j * vld + d]);
      p.gemm.fn(p.gemm.ctx, M - r0, n, D, qc + r0 * D, D, kt, D, true, s + r0 * Lt, Lt, false);
    }

    // Online softmax per row. Pass 1 reads only (max and min of the raw scores, so any sign of scale
    // works); pass 2 writes the probabilities. Lanes past the row's live count count as -inf, i.e. exp = 0:
    // past n for every row, and causal block query s sees keys < ctx + s + 1 only.
    for (int64_t r = r0; r < M; ++r) {
      float* row = s + r * Lt;
      const int64_t live_n = p.causal ? std::min(ctx + r / G + 1 - t0, n) : n;  // >= 1 from row r0 on
      float m_new, row_sum;
      if constexpr (kBf16) {
        row_sum = ba_softmax_row_bf16(row, live_n, n32, c, mrow[r], pc + r * Lt, &m_new);
      } else {
        const f32x8 vlive = splat8(float(live_n));
        f32x8 vmax = splat8(-INFINITY), vmin = splat8(INFINITY);
        for (int64_t j = 0; j < n8; j += kLanes8) {
          const f32x8 x = load8(row + j);
          const i32x8 live = lane + splat8(float(j)) < vlive;
          vmax = (live & (x > vmax)) ? x : vmax;
          vmin = (live & (x < vmin)) ? x : vmin;
        }
        m_new = std::max(mrow[r], c >= 0.f ? c * hmax(vmax) : c * hmin(vmin));
        const f32x8 vm = splat8(m_new), vc8 = splat8(c);
        f32x8 vsum = splat8(0.f);
        for (int64_t j = 0; j < n8; j += kLanes8) {
          f32x8 x = load8(row + j) * vc8 - vm;
          if (j + kLanes8 > live_n) x = (lane + splat8(float(j)) < vlive) ? x : splat8(-INFINITY);
          const f32x8 e = exp8(x);
          vsum += e;
          store8(row + j, e);
        }
        row_sum = hsum(vsum);
      }
      const float alpha = exp8(splat8(mrow[r] - m_new))[0];  // 0 on the first tile (m = -inf)
      lrow[r] = lrow[r] * alpha + row_sum;
      mrow[r] = m_new;
      if (alpha != 1.f) {
        float* orow = o + r * ldo;
        for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
      }
    }
    if constexpr (kBf16) {  // O += P V
      for (int64_t r = rg; r < r0; ++r) std::fill(pc + r * Lt, pc + r * Lt + n32, uint16_t(0));
      ba_bf16_gemm(p.bf16, Mp - rg, ldo, n32, pc + rg * Lt, Lt, vt, o + rg * ldo, ldo, true);
    } else {
      const float* vop = vt;
      int64_t vop_ld = D;
      if constexpr (std::is_same_v<T, float>) {
        vop = vt0;
        vop_ld = vld;
      }
      p.gemm.fn(p.gemm.ctx, M - r0, D, n, s + r0 * Lt, Lt, vop, vop_ld, false, o + r0 * D, D, true);
    }
  }
  if constexpr (kBf16) ba_bf16_end(p.bf16);

  float* po = p.part_o + slot * M * D;
  float* pl = p.part_lse + slot * M;
  // l = 0: the row saw no key in this task (an empty part, lse = -inf, ignored by the merge). l NaN: a NaN
  // score or one from inf inputs (inf - inf): the part is NaN, as in the reference, never a plausible 0.
  for (int64_t r = 0; r < M; ++r) {
    const float l = lrow[r];
    const float inv = l > 0.f ? 1.f / l : std::isnan(l) ? NAN : 0.f;
    for (int64_t d = 0; d < D; ++d) po[r * D + d] = o[r * ldo + d] * inv;
    pl[r] = l > 0.f ? mrow[r] + std::log(l) : std::isnan(l) ? NAN : -INFINITY;
  }
}

template <typename T>
void merge_pairs(const BlockAttentionParams& p, const BlockAttentionCpuPlan& plan, int64_t bh_begin, int64_t bh_end) {
  const int64_t G = ba_group(p), M = ba_rows(p), D = p.head_dim;
  std::vector<float> acc(D);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const int64_t b = bh / p.num_kv_heads, h = bh % p.num_kv_heads;
    const int64_t first = plan.part_begin[bh], parts = plan.part_begin[bh + 1] - first;
    for (int64_t r = 0; r < M; ++r) {
      const float* lse = p.part_lse + first * M + r;
      bool nan = false;  // merge_max_lse's fmaxf skips NaN: a NaN part makes the row NaN here
      for (int64_t i = 0; i < parts; ++i) nan |= std::isnan(lse[i * M]);
      const float m = nan ? NAN : merge_max_lse(lse, parts, M);
      float wsum = nan ? NAN : 0.f;
      std::fill(acc.begin(), acc.end(), nan ? NAN : 0.f);
      for (int64_t i = 0; i < parts && m != -INFINITY && !nan; ++i) {
        const float w = merge_weight(lse[i * M], m);
        if (w == 0.f) continue;
        wsum += w;
        const float* src = p.part_o + ((first + i) * M + r) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
      }
      const float inv = wsum > 0.f ? 1.f / wsum : nan ? NAN : 0.f;
      const int64_t si = r / G, qh = h * G + r % G;
      T* dst = static_cast<T*>(p.out) + b * p.o_stride_b + si * p.o_stride_s + qh * p.o_stride_h;
      for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(acc[d] * inv);
      p.lse[b * p.lse_stride_b + qh * p.lse_stride_h + si] = nan ? NAN : merge_final_lse(m, wsum);
    }
  }
}

}  // namespace

BlockAttentionCpuPlan block_attention_cpu_plan(const BlockAttentionParams& p) {
  BlockAttentionCpuPlan plan;
  plan.tile_keys = kTileKeys;
  plan.part_begin.push_back(0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = int64_t(p.ctx_lens[b]) + p.block_len;
    // Chunks from the row's own key count only: its sums (and their merge) are then the same alone, in any batch
    // and at any thread count (fp32's batch invariance, docs/semantics.md). 4 tiles at least amortise a task's Q
    // packing; at most kMaxParts parts bound the merge.
    constexpr int64_t kMaxParts = 32;
    const int64_t chunk = std::max(4 * kTileKeys, round_up((n + kMaxParts - 1) / kMaxParts, kTileKeys));
    for (int64_t h = 0; h < p.num_kv_heads; ++h) {
      for (int64_t k0 = 0; k0 < n; k0 += chunk) plan.tasks.push_back({b, h, k0, std::min(n, k0 + chunk)});
      plan.part_begin.push_back(int64_t(plan.tasks.size()));
    }
  }
  plan.order.resize(plan.tasks.size());
  for (size_t i = 0; i < plan.order.size(); ++i) plan.order[i] = int64_t(i);
  std::stable_sort(plan.order.begin(), plan.order.end(), [&](int64_t a, int64_t c) {
    const auto &x = plan.tasks[a], &y = plan.tasks[c];
    return x.key_end - x.key_begin > y.key_end - y.key_begin;
  });
  return plan;
}

Status block_attention_cpu_run_task(const BlockAttentionParams& p, const BlockAttentionCpuPlan& plan, int64_t task) {
  if (p.gemm.fn == nullptr) return Status::kUnsupportedShape;
  const auto& t = plan.tasks[task];
  switch (p.dtype) {
    case DType::kFloat32: run_task<float, false>(p, t, task); break;
    case DType::kBFloat16:
#ifdef TT_X86
      if (p.bf16 != BaCpuBf16::kWiden) {
        run_task<bf16_t, true>(p, t, task);
        break;
      }
#endif
      run_task<bf16_t, false>(p, t, task);
      break;
    case DType::kFloat16: run_task<fp16_t, false>(p, t, task); break;
    default: return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

Status block_attention_cpu_merge(const BlockAttentionParams& p, const BlockAttentionCpuPlan& plan, int64_t bh_begin,
                                 int64_t bh_end) {
  switch (p.dtype) {
    case DType::kFloat32: merge_pairs<float>(p, plan, bh_begin, bh_end); break;
    case DType::kBFloat16: merge_pairs<bf16_t>(p, plan, bh_begin, bh_end); break;
    case DType::kFloat16: merge_pairs<fp16_t>(p, plan, bh_begin, bh_end); break;
    default: return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

}  // namespace tt
