"""linear: the dense linears of a pass on packed weights (csrc/linear/linear.h) against F.linear on the plain
weights (what the model ran before), at the rows of a pass: 1 (AR step), 16 (a denoiser pass or block
extension), 64 / 256 (batched), 1024 (prefill: the plan hands it to the matrix library).

Shapes: the width-1/8 real-pattern model's LM head [131072, 320] and Mamba in_proj [1288, 320], and the real
model's Mamba out_proj [2688, 4096]; 1 and 2 threads. Each timed call reads one of several copies of the weight,
cycled, together larger than the last-level cache (480 MB here), so the weights come from memory as in a pass.
The bound of a row is max(FLOPs / matmul rate, weight bytes / read rate), both measured in this run at the row's
threads (a 1024^3 matmul in the row's dtype; a pure read of 1 GB); `%bound` = bound / median. `path` is what the
plan chose (linear_cpu_plan).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import harness

COLUMNS = ["dtype", "threads", "weight", "N", "K", "M", "path", "median_us", "GB/s", "GFLOP/s", "bound_us", "%bound",
           "F.linear_us", "speedup", "other_cores", "load1"]
SHAPES = (("lm_head w/8", 131072, 320, (1, 16, 64)), ("in_proj w/8", 1288, 320, (1, 16, 64, 256, 1024)),
          ("out_proj real", 2688, 4096, (1, 16, 64, 256, 1024)))
CYCLE_BYTES = 600 << 20   # weight copies per row: at least this many bytes in all (the L3 here is 480 MB)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device != "cpu":
        raise SystemExit("bench linear: CPU only (CUDA keeps F.linear)")
    threads_before = torch.get_num_threads()
    rows = []
    for threads in (1,) if quick else (1, 2):
        torch.set_num_threads(threads)
        read = harness.measure_read_bandwidth(nbytes=1 << 30) * 1e9
        for dtype in (torch.float32, torch.bfloat16):
            mm = harness.measure_matmul_rate(1024, 1024, 1024, dtype) * 1e12
            for name, N, K, ms in SHAPES[:1] if quick else SHAPES:
                rows += _rows(name, N, K, ms[:2] if quick else ms, dtype, threads, mm, read)
    torch.set_num_threads(threads_before)
    harness.print_table("linear on packed weights vs F.linear (weights cycled from memory)", rows, COLUMNS)
    return rows


def _rows(name: str, N: int, K: int, ms, dtype, threads: int, mm: float, read: float) -> list[dict]:
    from twotower_ext import ops, packed

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    wbytes = w.numel() * w.element_size()
    copies = -(-CYCLE_BYTES // wbytes)
    plain = [w.clone() for _ in range(copies)]
    packs = [packed.pack(t) for t in plain]
    rows = []
    for M in ms:
        x = torch.randn(M, K, generator=g).to(dtype)
        turn = iter(range(1 << 62))
        t = harness.time_cpu(lambda: ops.linear(x, packs[next(turn) % copies]), warmup=min(copies, 20))
        base = harness.time_cpu(lambda: F.linear(x, plain[next(turn) % copies]), warmup=min(copies, 20))
        flops = 2 * M * N * K
        bound = max(flops / mm, wbytes / read)
        path = torch.ops.twotower.linear_cpu_plan(M, N, K, dtype, "", threads)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "threads": threads, "weight": name, "N": N, "K": K,
                     "M": M, "path": path, "median_us": t.median_s * 1e6, "GB/s": wbytes / t.median_s / 1e9,
                     "GFLOP/s": flops / t.median_s / 1e9, "bound_us": bound * 1e6, "%bound": 100 * bound / t.median_s,
                     "F.linear_us": base.median_s * 1e6, "speedup": base.median_s / t.median_s,
                     **harness.load_fields(t, base)})
    return rows
