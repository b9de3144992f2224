"""Long-prompt Mamba prefill: the chunked SSD scan (models/ssd.py, batched matmuls) against the seeded scan
op (token by token) that short passes keep using, at one real Mamba layer's shapes (64 heads x 64, state
128, 8 groups, kernel 4), from a nonzero seed state with both states written back, as the context tower
calls it. Both include the conv + SiLU.

FLOPs of the chunked path per token: C.B scores 2*Q*G*N, intra-chunk 2*Q*H*P, chunk states 2*H*P*N, state
to output 2*H*P*N (the op's recurrence is 5*H*P*N, done as scalar-vector loops). Its rate is shown against
the machine's fp32 matmul rate measured in the same run; the baseline (the op) next to it.
"""
from __future__ import annotations

import torch

from . import harness
from .bench_mamba_scan import MODELS, make

H, P, N, G, _K = MODELS["real"]

COLUMNS = ["device", "dtype", "B", "L", "chunk", "threads", "chunked_ms", "p10-p90_us", "GFLOP", "GFLOP/s",
           "%fp32_mm", "op_ms", "speedup", "other_cores", "load1"]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext.models.ssd import mamba_chunked_scan

    mm = harness.measure_matmul_rate(1024, 1024, 1024, torch.float32, device)
    gen = torch.Generator().manual_seed(0)
    lengths, chunks, dtypes = ((512,), (128,), (torch.float32,)) if quick else \
        ((512, 2048), (64, 128), (torch.float32, torch.bfloat16))
    budget = dict(budget_s=0.5, min_reps=3, warmup=1) if device == "cpu" else {}
    rows = []
    for dtype in dtypes:
        for L in lengths:
            a = make("real", 1, L, dtype, device, gen)
            seeds = a["conv_state"].clone(), a["ssm_state"].clone()

            def call(scan, **kw):
                def f():  # fresh copies of the seed (the state is written back in place, like prefill)
                    conv, ssm = seeds[0].clone(), seeds[1].clone()
                    scan(**{**a, "conv_state": conv, "ssm_state": ssm}, conv_state_out=conv, ssm_state_out=ssm,
                         **kw)
                return lambda i: f

            top = harness.time_fn(call(tt.mamba_block_scan), device, **budget)
            for q in chunks:
                t = harness.time_fn(call(mamba_chunked_scan, chunk_size=q), device, **budget)
                flops = L * (2 * q * G * N + 2 * q * H * P + 4 * H * P * N)
                s = t.median_s
                rows.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "B": 1, "L": L, "chunk": q,
                             "threads": torch.get_num_threads() if device == "cpu" else "-", "chunked_ms": s * 1e3,
                             "p10-p90_us": t.spread, "GFLOP": flops / 1e9, "GFLOP/s": flops / s / 1e9,
                             "%fp32_mm": 100 * flops / s / 1e12 / mm, "op_ms": top.median_s * 1e3,
                             "speedup": top.median_s / s, **harness.load_fields(t, top)})
    harness.print_table(f"Mamba prefill, chunked SSD vs sequential op, on {device} (H={H} P={P} N={N} G={G}; "
                        f"fp32 matmul {mm * 1e3:.0f} GFLOP/s measured now)", rows, COLUMNS)
    return rows
