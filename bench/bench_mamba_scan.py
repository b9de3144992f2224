"""mamba_block_scan: the compiled seeded scan against the faster of the two PyTorch forms of the same
recurrence, timed the same way: token by token batched over rows and heads (reference.mamba_block_scan: the
natural form for a few tokens) and the chunked SSD form (models/ssd.py: batched matmuls, the fast form for
long blocks); `torch_form` says which one won. With `--baseline` the same calls are also timed on the baseline
build (e.g. main's) right before and after this process's timings (harness.around_baseline): main_us, vs_main.

Shapes: one Mamba layer of the real model (64 heads x 64, state 128, 8 groups, kernel 4) and of the width-1/8
model (8 heads x 64, state 128, 1 group) for a denoiser block (L=16, read-only seed), an AR/mock-AR step (L=1,
state written back) and a prefill piece (L=128). On the CPU, each shape also runs on every vector path of the
recurrence this CPU has (`isa`: TWOTOWER_SCAN_CPU_ISA; the default path first).
Bytes: SSM state read (+ written when updated) + xBC, dt, y. FLOPs: 5 per state element per token
(decay, update, C contraction) + the conv. The bound is max(bytes / read bandwidth, FLOPs / fp32 matmul rate),
both measured in the same run (the read at the row's working-set size: in cache for the small rows; each limit the
best of three measurements).
"""
from __future__ import annotations

import math
import os

import torch

from . import harness

COLUMNS = ["device", "model", "dtype", "B", "L", "write", "isa", "median_us", "p10-p90_us", "main_us", "vs_main", "MB",
           "GB/s", "read_GB/s", "GFLOP/s", "bound_us", "%bound", "torch_us", "torch_form", "speedup", "other_cores",
           "load1"]

MODELS = {"real": (64, 64, 128, 8, 4), "w1/8": (8, 64, 128, 1, 4)}   # heads, head dim, state, groups, kernel
CASES = [("w1/8", 1, 16, False), ("w1/8", 1, 1, True), ("real", 1, 16, False), ("real", 4, 16, False),
         ("real", 16, 16, False), ("real", 4, 1, True), ("real", 1, 128, True)]
QUICK = [("w1/8", 1, 16, False)]
DTYPES = ("float32", "bfloat16")


def make(model, B, L, dtype, device, gen):
    H, P, N, G, K = MODELS[model]
    C = H * P + 2 * G * N
    f = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    dt0 = torch.exp(torch.rand(H, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    return dict(xBC=f(B, L, C).to(dtype), dt=f(B, L, H).to(dtype), conv_state=f(B, K - 1, C).to(dtype),
                ssm_state=f(B, H, P, N), conv_weight=(f(C, K) * 0.5).to(dtype), conv_bias=(f(C) * 0.1).to(dtype),
                dt_bias=(dt0 + torch.log(-torch.expm1(-dt0))).to(device), A_log=torch.log(torch.rand(H, generator=gen) * 15 + 1).to(device),
                D=f(H))


def inputs(case, dtype_name, device):
    """The inputs of one row (n_buf sets: several on CUDA so L2 is cold) and the state outputs it writes."""
    model, B, L, write = case
    gen = torch.Generator().manual_seed(0)
    n_buf = 4 if device == "cuda" else 1
    bufs = [make(model, B, L, getattr(torch, dtype_name), device, gen) for _ in range(n_buf)]
    outs = [dict(conv_state_out=b["conv_state"], ssm_state_out=b["ssm_state"]) if write else {} for b in bufs]
    return bufs, outs


def kernel_timings(cases, dtypes, device="cpu", isa=None) -> list[list]:
    """[median_s, p10_s, p90_s, other_cores] of tt.mamba_block_scan per (dtype, case), in that order; isa: the
    TWOTOWER_SCAN_CPU_ISA path to time (None: the default). Runs here and, for the baseline, in a child process."""
    import twotower_ext as tt

    old = os.environ.pop("TWOTOWER_SCAN_CPU_ISA", None)
    if isa is not None:
        os.environ["TWOTOWER_SCAN_CPU_ISA"] = isa
    try:
        out = []
        for dtype in dtypes:
            for case in cases:
                bufs, outs = inputs(tuple(case), dtype, device)
                t = harness.time_fn(lambda i: (lambda: tt.mamba_block_scan(**bufs[i], **outs[i])), device,
                                    n_buffers=len(bufs))
                out.append([t.median_s, t.p10_s, t.p90_s, t.other_cores])
        return out
    finally:
        os.environ.pop("TWOTOWER_SCAN_CPU_ISA", None)
        if old is not None:
            os.environ["TWOTOWER_SCAN_CPU_ISA"] = old


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext import reference
    from twotower_ext.models.ssd import mamba_chunked_scan

    cases = QUICK if quick else CASES
    mm = harness.best_of(harness.measure_matmul_rate, 1024, 1024, 1024, torch.float32, device)
    paths = [None]   # the default path (AVX-512 where the CPU has it), then AVX2 where that is not the default
    if device == "cpu" and "avx512" in tt.ops.cpu_isas():
        paths.append("avx2")
    timed, main = harness.around_baseline(
        "bench_mamba_scan", "kernel_timings",
        lambda: {isa: kernel_timings(cases, DTYPES, device, isa) for isa in paths},
        cases=cases, dtypes=DTYPES, device=device)
    rows = []
    for d, dtype_name in enumerate(DTYPES):
        dtype = getattr(torch, dtype_name)
        for c, case in enumerate(cases):
            model, B, L, write = case
            H, P, N, G, K = MODELS[model]
            idx = d * len(cases) + c
            bufs, outs = inputs(case, dtype_name, device)
            elt = torch.finfo(dtype).bits // 8
            state = B * H * P * N * 4
            nbytes = state * (2 if write else 1) + B * L * ((H * P + 2 * G * N + H) * elt + H * P * elt)
            rd = harness.best_of(harness.measure_read_bandwidth, device, nbytes if device == "cpu" else 256 << 20)
            flops = B * L * H * (5 * P * N + 2 * K * (P + 2 * N))
            bound = max(nbytes / rd / 1e9, flops / mm / 1e12)
            budget = dict(budget_s=0.3, min_reps=3, warmup=1) if device == "cpu" else {}
            forms = {"token loop": reference.mamba_block_scan,
                     "chunked SSD": lambda **a: mamba_chunked_scan(**a, chunk_size=min(L, 64))}
            base = {name: harness.time_fn(lambda i, f=f: (lambda: f(**bufs[i], **outs[i])), device,
                                          n_buffers=len(bufs), **budget) for name, f in forms.items()}
            form, tref = min(base.items(), key=lambda kv: kv[1].median_s)
            for isa in paths:
                med, p10, p90, others = timed[isa][idx]
                row = {"device": device, "model": model, "dtype": dtype_name, "B": B, "L": L,
                       "write": "yes" if write else "no", "isa": isa or "default", "median_us": med * 1e6,
                       "p10-p90_us": f"{p10 * 1e6:.0f}-{p90 * 1e6:.0f}", "main_us": "-", "vs_main": "-",
                       "MB": nbytes / 1e6, "GB/s": nbytes / med / 1e9, "read_GB/s": rd, "GFLOP/s": flops / med / 1e9,
                       "bound_us": bound * 1e6, "%bound": 100 * bound / med, "torch_us": tref.median_s * 1e6,
                       "torch_form": form, "speedup": tref.median_s / med, **harness.load_fields(*base.values())}
                if others is not None and (row["other_cores"] == "" or others > row["other_cores"]):
                    row["other_cores"] = others
                if isa is None and main is not None:
                    row.update(main_us=main[idx][0] * 1e6, vs_main=main[idx][0] / med)
                rows.append(row)
    harness.print_table(f"mamba_block_scan on {device} (real: H=64 P=64 N=128 G=8; w1/8: H=8 G=1; bound: max(bytes / "
                        f"read, FLOPs / fp32 matmul {mm * 1e3:.0f} GFLOP/s), both measured now)", rows, COLUMNS)
    return rows
