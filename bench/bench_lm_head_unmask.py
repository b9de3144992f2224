"""lm_head_unmask: the denoiser's LM head fused with the commit step (csrc/lm_head_unmask/lm_head_unmask.h) against
the two ops it replaces, as the runner called them: ops.linear(hidden, w).float() then ops.threshold_unmask, timed
next to each other in one run.

Shape: the width-1/8 model's head, K = 336, V = 131072, one S = 16 block per row, B in {1, 8}, fp32 and bf16, one
thread, greedy, per-row parameters as [B] tensors and an all-masked block at every call (x reset inside the timed
call). Each timed call reads one of several copies of the packed weight, cycled, together larger than the last-level
cache, so the weights come from memory as in a pass. MB is the memory traffic each design needs at least: unfused,
the weight once + the logits written by the linear, widened to fp32 by .float() (bf16: read + written again) and
read by the scan; fused, the weight once per group of positions (lm_head_unmask_group_rows: 32 fp32, 64 bf16), the
logits staying in each thread's L2-sized scratch.
"""
from __future__ import annotations

import torch

from . import harness

COLUMNS = ["dtype", "B", "S", "K", "V", "threads", "unfused_ms", "fused_ms", "speedup", "unfused_MB", "fused_MB",
           "other_cores", "load1"]
MASK, S, K, V = 3, 16, 336, 131072
CYCLE_BYTES = 600 << 20   # weight copies per dtype: at least this many bytes in all (the L3 here is 480 MB)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device != "cpu":
        raise SystemExit("bench lm_head_unmask: CPU only (CUDA composes F.linear and threshold_unmask)")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            rows += _rows(dtype, quick)
    finally:
        torch.set_num_threads(threads_before)
    harness.print_table("the denoiser's LM head + commit: ops.linear + ops.threshold_unmask vs lm_head_unmask "
                        "(1 thread, weights cycled from memory)", rows, COLUMNS)
    return rows


def _rows(dtype, quick: bool) -> list[dict]:
    from twotower_ext import ops, packed

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(V, K, generator=g) * 3 / K ** 0.5).to(dtype)
    elt = w.element_size()
    wbytes = V * K * elt
    copies = -(-CYCLE_BYTES // wbytes)
    packs = [packed.pack(w) for _ in range(copies)]
    group = (1 << 20) // (8192 * elt) // 16 * 16   # lm_head_unmask_group_rows
    rows = []
    for B in (1, 8):
        hidden = torch.randn(B, S, K, generator=g).to(dtype)
        p = {"gamma": torch.full((B,), 0.9), "step": torch.zeros(B, dtype=torch.int32),
             "steps_per_block": torch.full((B,), 16, dtype=torch.int32), "temperature": torch.zeros(B),
             "seed": torch.full((B,), 1234), "block": torch.zeros(B, dtype=torch.int64)}
        counts, done = torch.empty(B, dtype=torch.int32), torch.empty(B, dtype=torch.bool)
        x0 = torch.full((B, S), MASK)
        x = x0.clone()
        turn = iter(range(1 << 62))

        def unfused():
            x.copy_(x0)
            logits = ops.linear(hidden, packs[next(turn) % copies]).float()
            ops.threshold_unmask(logits, x, MASK, **p, out_counts=counts, out_done=done)

        def fused():
            x.copy_(x0)
            ops.lm_head_unmask(hidden, packs[next(turn) % copies], x, MASK, **p, out_counts=counts, out_done=done)

        kw = dict(warmup=min(copies, 4), min_reps=5 if quick else 10, budget_s=0.3 if quick else 1.0)
        tu, tf = harness.time_cpu(unfused, **kw), harness.time_cpu(fused, **kw)
        logits = B * S * V
        unfused_mb = wbytes + logits * elt + (logits * (2 + 4) if elt == 2 else 0) + logits * 4
        fused_mb = wbytes * -(-B * S // group)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "B": B, "S": S, "K": K, "V": V, "threads": 1,
                     "unfused_ms": tu.median_s * 1e3, "fused_ms": tf.median_s * 1e3,
                     "speedup": tu.median_s / tf.median_s,
                     "unfused_MB": unfused_mb / 1e6, "fused_MB": fused_mb / 1e6, **harness.load_fields(tu, tf)})
    return rows
