"""moe_experts: one MoE layer of the real model (E 128 experts, top-6, hidden 2688, expert inter 1856) for an AR
step (T=1), a 16-token denoiser pass (T=16) and larger passes (T=64, 256), routed experts only.

Bytes: the expert weights the pass touches (distinct chosen experts x 2 x H x I x element size), against the
machine's read bandwidth (a large tensor sum) and copy bandwidth (read + write), both measured in the same run
on buffers larger than the last-level cache. Each timed call routes to a fresh random expert set (cycled from
several), so the touched weights are not left in the cache by the previous call.

Baselines side by side: the per-expert Python loop the engine ran before this op (tokens grouped by expert,
counts read on the host, one matmul pair per active expert, fp64 combine) and the dense path (every expert over
every token, only run for T <= 16: it does E / (distinct experts) times the work).
"""
from __future__ import annotations

import itertools
import os

import torch
import torch.nn.functional as F

from . import harness

COLUMNS = ["device", "dtype", "T", "experts", "MB", "median_ms", "p10-p90_us", "GB/s", "%read_bw", "%copy_bw",
           "loop_ms", "vs_loop", "dense_ms", "vs_dense"]

E, K, H, I = 128, 6, 2688, 1856
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


def measure_read_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of summing a large fp32 tensor (bytes read only)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = harness.time_fn(lambda i: (lambda: buf.sum()), device, budget_s=0.5, min_reps=5)
    return nbytes / t.median_s / 1e9


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


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt

    big = 768 << 20
    read_bw = measure_read_bandwidth(device, big)
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
        for T in tokens:
            x = torch.randn(T, H, generator=gen).to(dtype).to(device)
            sets = routings(T, gen, device)
            touched = sum(len(torch.unique(i)) for i, _ in sets) / len(sets)
            nbytes = touched * 2 * H * I * es
            t = harness.time_fn(lambda i: cycling(tt.ops.moe_experts, x, sets, up, down), device,
                                budget_s=1.0, min_reps=ROUTINGS)
            tl = harness.time_fn(lambda i: cycling(loop_baseline, x, sets, up, down), device, **slow)
            row = {"device": device, "dtype": str(dtype).replace("torch.", ""), "T": T, "experts": touched,
                   "MB": nbytes / 1e6, "median_ms": t.median_s * 1e3, "p10-p90_us": t.spread,
                   "GB/s": nbytes / t.median_s / 1e9, "%read_bw": 100 * nbytes / t.median_s / 1e9 / read_bw,
                   "%copy_bw": 100 * nbytes / t.median_s / 1e9 / copy_bw, "loop_ms": tl.median_s * 1e3,
                   "vs_loop": tl.median_s / t.median_s, "dense_ms": "-", "vs_dense": "-"}
            if T <= 16:
                td = harness.time_fn(lambda i: cycling(dense_baseline, x, sets, up, down), device, **slow)
                row.update({"dense_ms": td.median_s * 1e3, "vs_dense": td.median_s / t.median_s})
            rows.append(row)
        del up, down
    load = "load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "load unknown"
    harness.print_table(f"moe_experts on {device}, {torch.get_num_threads()} threads (E={E} k={K} H={H} I={I}; "
                        f"read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s measured now; {load})", rows, COLUMNS)
    return rows
