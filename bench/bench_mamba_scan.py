"""mamba_block_scan: the compiled seeded scan against the faster of the two PyTorch forms of the same
recurrence, timed the same way: token by token batched over rows and heads (reference.mamba_block_scan: the
natural form for a few tokens) and the chunked SSD form (models/ssd.py: batched matmuls, the fast form for
long blocks); `torch_form` says which one won.

Shapes: one Mamba layer of the real model (64 heads x 64, state 128, 8 groups, kernel 4) for a denoiser
block (L=16, read-only seed), an AR/mock-AR step (L=1, state written back) and a prefill piece (L=128).
Bytes: SSM state read (+ written when updated) + xBC, dt, y. FLOPs: 5 per state element per token
(decay, update, C contraction) + the conv. Short blocks are bound by the state traffic, long ones by
the arithmetic: both rates are shown against a copy of the same bytes (measured next to each row: in cache
for B=1, DRAM-sized for B=16) and the fp32 matmul rate, both measured in the same run.
"""
from __future__ import annotations

import math

import torch

from . import harness

COLUMNS = ["device", "dtype", "B", "L", "write", "median_us", "p10-p90_us", "MB", "GB/s", "copy_GB/s", "%copy",
           "GFLOP/s", "%fp32_mm", "torch_us", "torch_form", "speedup", "other_cores", "load1"]

H, P, N, G, K = 64, 64, 128, 8, 4


def make(B, L, dtype, device, gen):
    C = H * P + 2 * G * N
    f = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    dt0 = torch.exp(torch.rand(H, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    return dict(xBC=f(B, L, C).to(dtype), dt=f(B, L, H).to(dtype), conv_state=f(B, K - 1, C).to(dtype),
                ssm_state=f(B, H, P, N), conv_weight=(f(C, K) * 0.5).to(dtype), conv_bias=(f(C) * 0.1).to(dtype),
                dt_bias=(dt0 + torch.log(-torch.expm1(-dt0))).to(device), A_log=torch.log(torch.rand(H, generator=gen) * 15 + 1).to(device),
                D=f(H))


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext import reference
    from twotower_ext.models.ssd import mamba_chunked_scan

    mm = harness.measure_matmul_rate(1024, 1024, 1024, torch.float32, device)
    gen = torch.Generator().manual_seed(0)
    cases = [(1, 16, False), (4, 16, False), (16, 16, False), (4, 1, True), (1, 128, True)]
    if quick:
        cases = [(1, 16, False)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for B, L, write in cases:
            n_buf = 4 if device == "cuda" else 1
            bufs = [make(B, L, dtype, device, gen) for _ in range(n_buf)]
            outs = [dict(conv_state_out=b["conv_state"], ssm_state_out=b["ssm_state"]) if write else {} for b in bufs]
            elt = torch.finfo(dtype).bits // 8
            state = B * H * P * N * 4
            nbytes = state * (2 if write else 1) + B * L * ((H * P + 2 * G * N + H) * elt + H * P * elt)
            bw = harness.measure_copy_bandwidth(device, nbytes if device == "cpu" else 256 << 20)
            t = harness.time_fn(lambda i: (lambda: tt.mamba_block_scan(**bufs[i], **outs[i])), device, n_buffers=n_buf)
            budget = dict(budget_s=0.3, min_reps=3, warmup=1) if device == "cpu" else {}
            forms = {"token loop": reference.mamba_block_scan,
                     "chunked SSD": lambda **a: mamba_chunked_scan(**a, chunk_size=min(L, 64))}
            base = {name: harness.time_fn(lambda i, f=f: (lambda: f(**bufs[i], **outs[i])), device, n_buffers=n_buf,
                                          **budget) for name, f in forms.items()}
            form, tref = min(base.items(), key=lambda kv: kv[1].median_s)
            flops = B * L * H * (5 * P * N + 2 * K * (P + 2 * N))
            s = t.median_s
            rows.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "B": B, "L": L,
                         "write": "yes" if write else "no", "median_us": s * 1e6, "p10-p90_us": t.spread,
                         "MB": nbytes / 1e6, "GB/s": nbytes / s / 1e9, "copy_GB/s": bw,
                         "%copy": 100 * nbytes / s / 1e9 / bw, "GFLOP/s": flops / s / 1e9,
                         "%fp32_mm": 100 * flops / s / 1e12 / mm, "torch_us": tref.median_s * 1e6, "torch_form": form,
                         "speedup": tref.median_s / s, **harness.load_fields(t, *base.values())})
    harness.print_table(f"mamba_block_scan on {device} (H={H} P={P} N={N} G={G}; %copy: of a copy of the same bytes; "
                        f"fp32 matmul {mm * 1e3:.0f} GFLOP/s measured now)", rows, COLUMNS)
    return rows
