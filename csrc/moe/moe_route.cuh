// The MoE route on the device (moe.h's plan): count the (token, choice) slots per expert, an exclusive prefix sum
// over the experts with the compacted list of active experts, then each slot's position in the slot-major buffers.
// The prefix sum is a block-wide scan (each thread sums a contiguous run of experts, warps scan by shuffles, one
// warp scans the warp totals), not one thread walking every expert.
// Two users (moe_cuda.cu): moe_route_kernel (one CTA, any number of slots: positions by shared-memory atomics, so
// a slot's place within its expert is arbitrary, which no kernel depends on) and, when the route is fused, every
// CTA of the up GEMM (positions in flat (token, choice) order by one warp, so each CTA derives the same slots on
// its own and CTA (0, 0)'s lists for the down GEMM and the combine agree with every other CTA's rows).
// Block sizes are multiples of 32 (full-warp shuffles).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "moe/moe.h"
#include "moe/moe_cuda_plan.h"  // kMoeScanScratch

namespace tt {

// The workspace's arrays (moe_cuda_plan.h's MoeCudaWorkspace gives their offsets).
struct MoeWs {
  int32_t *counts, *offsets, *active, *n_active, *slot_token, *slot_of, *err;
  double* slot_weight;
  void* hidden;     // [n, I] in x's dtype, slot-major
  float* out_slot;  // [n, H]
};

__device__ __forceinline__ int64_t moe_id_at(const MoeParams& p, int64_t i) {
  return p.ids_int64 ? static_cast<const int64_t*>(p.expert_ids)[i] : static_cast<const int32_t*>(p.expert_ids)[i];
}
__device__ __forceinline__ double moe_weight_at(const MoeParams& p, int64_t i) {
  return p.weights_fp64 ? static_cast<const double*>(p.expert_weights)[i]
                        : double(static_cast<const float*>(p.expert_weights)[i]);
}

// Inclusive prefix sums of a and b across the warp's lanes (all 32 active).
__device__ __forceinline__ void moe_warp_scan2(int32_t& a, int32_t& b) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int32_t x = __shfl_up_sync(0xffffffffu, a, o), y = __shfl_up_sync(0xffffffffu, b, o);
    if (lane >= o) {
      a += x;
      b += y;
    }
  }
}

// cnt[e] = the slots choosing expert e, over the chunk's n slots; an id outside [0, E) sets kMoeErrBadId in *err
// (when err is given) and counts nowhere.
__device__ __forceinline__ void moe_route_count(const MoeParams& p, int64_t n, int32_t* cnt, int32_t* err) {
  for (int64_t e = threadIdx.x; e < p.experts; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t e = moe_id_at(p, i);
    if (e < 0 || e >= p.experts) {
      if (err != nullptr) atomicOr(err, kMoeErrBadId);
    } else {
      atomicAdd(&cnt[e], 1);
    }
  }
  __syncthreads();
}

// off[e] = sum of cnt[< e] (off[E] = the total), active[0 .. na) = the experts with cnt > 0 ascending, *n_active =
// na. off / active / n_active may be shared or global memory; scratch: kMoeScanScratch shared ints.
__device__ __forceinline__ void moe_route_scan(const int32_t* cnt, int64_t E, int32_t* off, int32_t* active,
                                               int32_t* n_active, int32_t* scratch) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid % 32, warp = tid / 32;
  const int64_t per = (E + nt - 1) / nt, b = tid * per < E ? tid * per : E, end = b + per < E ? b + per : E;
  int32_t sum = 0, act = 0;
  for (int64_t e = b; e < end; ++e) {
    sum += cnt[e];
    act += cnt[e] > 0;
  }
  int32_t is = sum, ia = act;  // inclusive within the warp
  moe_warp_scan2(is, ia);
  if (lane == 31) {
    scratch[warp] = is;
    scratch[32 + warp] = ia;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = nt / 32;
    const int32_t v = lane < nw ? scratch[lane] : 0, u = lane < nw ? scratch[32 + lane] : 0;
    int32_t iv = v, iu = u;
    moe_warp_scan2(iv, iu);
    scratch[lane] = iv - v;  // exclusive: the warps before this one
    scratch[32 + lane] = iu - u;
    if (lane == 31) {
      scratch[64] = iv;
      scratch[65] = iu;
    }
  }
  __syncthreads();
  int32_t o = scratch[warp] + is - sum, a = scratch[32 + warp] + ia - act;
  for (int64_t e = b; e < end; ++e) {
    off[e] = o;
    o += cnt[e];
    if (cnt[e] > 0) active[a++] = int32_t(e);
  }
  if (tid == 0) {
    off[E] = scratch[64];
    *n_active = scratch[65];
  }
  __syncthreads();
}

// Warp 0 only, slots in flat (token, choice) order: tok[0 .. count) = the tokens of expert `mine`'s slots (mine < 0:
// none). With `all`, also every slot's position (cur: per-expert cursors starting at the offsets), its token, weight
// and slot_of in w (-1 for an id outside [0, E), which contributes nothing).
__device__ __forceinline__ void moe_route_fill_ordered(const MoeParams& p, int64_t n, int32_t mine, int32_t* tok,
                                                       int32_t* cur, const MoeWs& w, bool all) {
  const int lane = threadIdx.x % 32;
  const unsigned before = (1u << lane) - 1;
  int32_t mine_n = 0;
  for (int64_t c0 = 0; c0 < n; c0 += 32) {
    const int64_t i = c0 + lane;
    const int64_t e = i < n ? moe_id_at(p, i) : -1;
    const bool valid = e >= 0 && e < p.experts;
    const int32_t key = valid ? int32_t(e) : -1;
    if (all) {
      const unsigned peers = __match_any_sync(0xffffffffu, key);
      const int32_t base = valid ? cur[key] : 0;
      __syncwarp();
      if (valid && lane == __ffs(peers) - 1) cur[key] = base + __popc(peers);
      __syncwarp();
      if (i < n) {
        const int32_t s = base + __popc(peers & before);
        w.slot_of[i] = valid ? s : -1;
        if (valid) {
          w.slot_token[s] = int32_t(i / p.topk);
          w.slot_weight[s] = moe_weight_at(p, i);
        }
      }
    }
    const bool is_mine = valid && key == mine;
    const unsigned m = __ballot_sync(0xffffffffu, is_mine);
    if (is_mine) tok[mine_n + __popc(m & before)] = int32_t(i / p.topk);
    mine_n += __popc(m);
  }
}

}  // namespace tt
