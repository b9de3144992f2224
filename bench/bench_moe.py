"""moe_experts: one MoE layer of the real model (E 128 experts, top-6, hidden 2688, expert inter 1856) for an AR
step (T=1), a 16-token denoiser pass (T=16) and larger passes (T=64, 256), routed experts only.

Bytes: the expert weights the pass touches (distinct chosen experts x 2 x H x I x element size), against the
machine's read bandwidth (a large tensor sum) and copy bandwidth (read + write), both measured in the same run
on buffers larger than the last-level cache. Each timed call routes to a fresh random expert set (cycled from
several), so the touched weights are not left in the cache by the previous call.

Baselines side by side: the per-expert Python loop the engine ran before this op (tokens grouped by expert,
counts read on the host, one matmul pair per active expert, fp64 combine) and the dense path (every expert over
every token, only run for T <= 16: it does E / (distinct experts) times the work).

Quantised rows (weights fp8 / int4, quant.py; bf16 activations, T = 1 and 16): the same bf16 stacks quantised
expert by expert, timed in the same run on the same routings; MB and GB/s count the stored bytes of the touched
experts (data + scales), so GB/s is the effective weight bandwidth, and vs_bf16 is the bf16 row's median over
this one's: the speed-up a bandwidth-bound decode step gets from the format.
"""
from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

from . import harness

COLUMNS = ["device", "dtype", "weights", "T", "experts", "MB", "median_ms", "p10-p90_us", "GB/s", "%read_bw",
           "%copy_bw", "vs_bf16", "loop_ms", "vs_loop", "dense_ms", "vs_dense"]

E, K, H, I = 128, 6, 2688, 1856   # models/random_init.REAL_CONFIG's
QUANT_FORMATS = ("fp8", "int4")
QUANT_TOKENS = (1, 16)
ROUTINGS = 12  # expert sets cycled through (12 x 6 experts x 20 MB > the 480 MB L3 of the Xeon we measure on)


def loop_baseline(x, idx, weights, up, down):
    """The engine's MoE before moe_experts (models/layers.py, grouped path), routed part only."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=up.shape[0]).tolist()
    xs = x[order // k]
    sorted_out = torch.empty(flat.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c:
            h = torch.square(F.relu(F.linear(xs[start:start + c], up[e])))
            sorted_out[start:start + c] = F.linear(h, down[e])
            start += c
    per_choice = torch.empty_like(sorted_out).index_copy_(0, order, sorted_out).view(-1, k, x.shape[-1])
    return (per_choice.double() * weights.unsqueeze(-1)).sum(1).float().to(x.dtype)


def dense_baseline(x, idx, weights, up, down):
    """The engine's former CUDA path: every expert over every token, unselected ones weighted 0."""
    gates = torch.zeros(x.shape[0], up.shape[0], dtype=torch.float32, device=x.device)
    gates.scatter_(1, idx, weights.float())
    hid = torch.square(F.relu(torch.matmul(x, up.transpose(1, 2))))
    outs = torch.matmul(hid, down.transpose(1, 2)).float()
    return torch.einsum("te,eth->th", gates, outs).to(x.dtype)


def bandwidth_fields(nbytes: float, t, read_bw: float, copy_bw: float) -> dict:
    """MB, median, spread, GB/s of the stored weight bytes and their share of the read / copy bandwidth."""
    gbps = nbytes / t.median_s / 1e9
    return {"MB": nbytes / 1e6, "median_ms": t.median_s * 1e3, "p10-p90_us": t.spread, "GB/s": gbps,
            "%read_bw": 100 * gbps / read_bw, "%copy_bw": 100 * gbps / copy_bw}


def routings(T, gen, device):
    sets = []
    for _ in range(ROUTINGS):
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        w = torch.rand(T, K, generator=gen, dtype=torch.float64)
        sets.append((idx.to(device), (w / w.sum(1, keepdim=True) * 2.5).to(device)))
    return sets


def cycling(fn, x, sets, up, down):
    it = itertools.cycle(sets)

    def call():
        idx, w = next(it)
        return fn(x, idx, w, up, down)
    return call


def quantized_stack(w, fmt):
    """quant.quantize(w, fmt), expert by expert (as the loader does), so no fp32 copy of the whole stack exists."""
    from twotower_ext import quant

    q = quant.empty(fmt, w.shape, w.device)
    for e in range(w.shape[0]):
        quant.quantize_into(q, e, w[e])
    return q


def stored_bytes(fmt, es: int) -> int:
    """Bytes of one expert (up [I, H] + down [H, I]) as stored: es per weight, or data + scales of `fmt`."""
    from twotower_ext.quant import expert_bytes

    f = None if fmt in ("bfloat16", "float32") else fmt
    return expert_bytes(f, I, H, es) + expert_bytes(f, H, I, es)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt

    big = 768 << 20
    read_bw = harness.measure_read_bandwidth(device, big)
    copy_bw = harness.measure_copy_bandwidth(device, big)
    gen = torch.Generator().manual_seed(0)
    tokens = [1, 16] if quick else [1, 16, 64, 256]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    slow = dict(budget_s=0.5, min_reps=3, warmup=1) if device == "cpu" else {}
    rows = []
    for dtype in dtypes:
        up = (torch.randn(E, I, H, generator=gen) / H ** 0.5).to(dtype).to(device)
        down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype).to(device)
        es = up.element_size()
        name = str(dtype).replace("torch.", "")
        quantized = ({f: (quantized_stack(up, f), quantized_stack(down, f)) for f in QUANT_FORMATS}
                     if dtype == torch.bfloat16 else {})
        for T in tokens:
            x = torch.randn(T, H, generator=gen).to(dtype).to(device)
            sets = routings(T, gen, device)
            touched = sum(len(torch.unique(i)) for i, _ in sets) / len(sets)
            nbytes = touched * stored_bytes(name, es)
            t = harness.time_fn(lambda i: cycling(tt.ops.moe_experts, x, sets, up, down), device,
                                budget_s=1.0, min_reps=ROUTINGS)
            tl = harness.time_fn(lambda i: cycling(loop_baseline, x, sets, up, down), device, **slow)
            row = {"device": device, "dtype": name, "weights": name, "T": T, "experts": touched,
                   **bandwidth_fields(nbytes, t, read_bw, copy_bw), "vs_bf16": "-", "loop_ms": tl.median_s * 1e3,
                   "vs_loop": tl.median_s / t.median_s, "dense_ms": "-", "vs_dense": "-"}
            if T <= 16:
                td = harness.time_fn(lambda i: cycling(dense_baseline, x, sets, up, down), device, **slow)
                row.update({"dense_ms": td.median_s * 1e3, "vs_dense": td.median_s / t.median_s})
            rows.append(row)
            if T not in QUANT_TOKENS:
                continue
            for fmt, (qu, qd) in quantized.items():   # same x, same routings, side by side with the bf16 row
                tq = harness.time_fn(lambda i: cycling(tt.ops.moe_experts, x, sets, qu, qd), device,
                                     budget_s=1.0, min_reps=ROUTINGS)
                qbytes = touched * stored_bytes(fmt, es)
                rows.append({"device": device, "dtype": name, "weights": fmt, "T": T, "experts": touched,
                             **bandwidth_fields(qbytes, tq, read_bw, copy_bw), "vs_bf16": t.median_s / tq.median_s,
                             "loop_ms": "-", "vs_loop": "-", "dense_ms": "-", "vs_dense": "-"})
        del up, down, quantized
    load = "load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "load unknown"
    harness.print_table(f"moe_experts on {device}, {torch.get_num_threads()} threads (E={E} k={K} H={H} I={I}; "
                        f"read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s measured now; {load})", rows, COLUMNS)
    return rows
