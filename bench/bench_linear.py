"""linear: the dense linears of a pass on packed weights (csrc/linear/linear.h) against F.linear on the plain
weights (what the model ran before), at the rows of a pass: 1 (AR step), 16 (a denoiser pass or block
extension), 64 / 256 (batched), 1024 (prefill: the plan hands it to the matrix library).

Shapes: the width-1/8 real-pattern model's LM head [131072, 320] and Mamba in_proj [1288, 320], and the real
model's Mamba out_proj [2688, 4096]. Each timed call reads one of several copies of the weight, cycled, together
larger than the last-level cache, so the weights come from memory as in a pass. The bound of a row is
max(FLOPs / matmul rate, weight bytes / read rate), both measured in this run (a 1024^3 matmul in the row's
dtype; a pure read of 1 GB); `%bound` = bound / median. `path` is what the plan chose (linear_cpu_plan).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import harness

COLUMNS = ["dtype", "weight", "N", "K", "M", "path", "median_us", "GB/s", "GFLOP/s", "bound_us", "%bound",
           "F.linear_us", "speedup", "other_cores", "load1"]
SHAPES = (("lm_head w/8", 131072, 320, (1, 16, 64)), ("in_proj w/8", 1288, 320, (1, 16, 64, 256, 1024)),
          ("out_proj real", 2688, 4096, (1, 16, 64, 256, 1024)))
CYCLE_BYTES = 1 << 30   # weight copies per row: at least this many bytes in all (the L3 here is 480 MB)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    from twotower_ext import ops, packed

    if device != "cpu":
        raise SystemExit("bench linear: CPU only (CUDA keeps F.linear)")
    read = harness.measure_read_bandwidth(nbytes=CYCLE_BYTES) * 1e9
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        mm = harness.measure_matmul_rate(1024, 1024, 1024, dtype) * 1e12
        for name, N, K, ms in SHAPES[:1] if quick else SHAPES:
            g = torch.Generator().manual_seed(0)
            w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
            wbytes = w.numel() * w.element_size()
            copies = max(1, min(8, -(-CYCLE_BYTES // wbytes)))
            plain = [w.clone() for _ in range(copies)]
            packs = [packed.pack(t) for t in plain]
            for M in ms[:2] if quick else ms:
                x = torch.randn(M, K, generator=g).to(dtype)
                turn = iter(range(1 << 62))
                t = harness.time_cpu(lambda: ops.linear(x, packs[next(turn) % copies]), warmup=copies)
                base = harness.time_cpu(lambda: F.linear(x, plain[next(turn) % copies]), warmup=copies)
                flops = 2 * M * N * K
                bound = max(flops / mm, wbytes / read)
                path = torch.ops.twotower.linear_cpu_plan(M, N, K, dtype, "", torch.get_num_threads(), False)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "weight": name, "N": N, "K": K, "M": M,
                             "path": path, "median_us": t.median_s * 1e6, "GB/s": wbytes / t.median_s / 1e9,
                             "GFLOP/s": flops / t.median_s / 1e9, "bound_us": bound * 1e6,
                             "%bound": 100 * bound / t.median_s, "F.linear_us": base.median_s * 1e6,
                             "speedup": base.median_s / t.median_s, **harness.load_fields(t, base)})
            del plain, packs
    harness.print_table(f"linear on packed weights vs F.linear ({torch.get_num_threads()} threads; read "
                        f"{read / 1e9:.1f} GB/s measured in this run)", rows, COLUMNS)
    return rows
