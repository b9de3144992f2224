"""moe_experts: one MoE layer of the real model (E 128 experts, top-6, hidden 2688, expert inter 1856) for an AR
step (T=1), a 16-token denoiser pass (T=16) and larger passes (T=64, 256), routed experts only; and of the
width-1/8 model with the real expert count (E 128, top-6, hidden 336, inter 232: experts of 0.6 MB in fp32, where
per-expert and per-call costs would show first), each call on the next of 8 layers' expert stacks, as in a pass.

Bytes: the expert weights the pass touches (distinct chosen experts x 2 x H x I x element size), against the
machine's read bandwidth (a large tensor sum) and copy bandwidth (read + write), both measured in the same run
on buffers larger than the last-level cache. Each timed call routes to a fresh random expert set (cycled from
several), so the touched weights are not left in the cache by the previous call.

Baselines side by side: the per-expert Python loop the engine ran before this op (tokens grouped by expert,
counts read on the host, one matmul pair per active expert, fp64 combine) and the dense path (every expert over
every token, only run for T <= 16: it does E / (distinct experts) times the work).

With `--baseline` every dense kernel row is also timed on the baseline build (e.g. main's) right before and after
this process times its group (harness.around_baseline): main_ms, vs_main.

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

COLUMNS = ["device", "model", "dtype", "weights", "T", "experts", "MB", "median_ms", "p10-p90_us", "main_ms", "vs_main",
           "GB/s", "%read_bw", "%copy_bw", "vs_bf16", "loop_ms", "vs_loop", "dense_ms", "vs_dense"]

E, K, H, I = 128, 6, 2688, 1856   # models/config.REAL_CONFIG's
W8_H, W8_I, W8_LAYERS = 336, 232, 8   # the width-1/8 model's expert size (real expert count); layers cycled per call
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


def routings(T, gen, device, n=ROUTINGS):
    sets = []
    for _ in range(n):
        idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        w = torch.rand(T, K, generator=gen, dtype=torch.float64)
        sets.append((idx.to(device), (w / w.sum(1, keepdim=True) * 2.5).to(device)))
    return sets


def cycling(fn, x, sets, up, down):
    return cycling_calls(fn, [(x, idx, w, up, down) for idx, w in sets])


def cycling_calls(fn, calls):
    """fn(*call) for the next of `calls` on each invocation (round robin)."""
    it = itertools.cycle(calls)

    def call():
        return fn(*next(it))
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


def w8_calls(dtype, T, gen, device):
    """The width-1/8 rows' calls: (x, ids, weights, up, down) on each of W8_LAYERS layers' stacks, one routing each."""
    x = torch.randn(T, W8_H, generator=gen).to(dtype).to(device)
    out = []
    for idx, w in routings(T, gen, device, n=W8_LAYERS):
        up = (torch.randn(E, W8_I, W8_H, generator=gen) / W8_H ** 0.5).to(dtype).to(device)
        down = (torch.randn(E, W8_H, W8_I, generator=gen) / W8_I ** 0.5).to(dtype).to(device)
        out.append((x, idx, w, up, down))
    return out


def kernel_timings(specs, device="cpu") -> list[list]:
    """[median_s, p10_s, p90_s] of tt.ops.moe_experts per (model, dtype, T) spec, dense weights, inputs from a fresh
    seed per spec (the same shapes, routings cycled, as run's rows); run in the baseline build's child process."""
    import twotower_ext as tt

    out = []
    for model, dtype, T in specs:
        gen = torch.Generator().manual_seed(1)
        dt = getattr(torch, dtype)
        if model == "w1/8":
            calls = w8_calls(dt, T, gen, device)
        else:
            up = (torch.randn(E, I, H, generator=gen) / H ** 0.5).to(dt).to(device)
            down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dt).to(device)
            x = torch.randn(T, H, generator=gen).to(dt).to(device)
            calls = [(x, idx, w, up, down) for idx, w in routings(T, gen, device)]
        t = harness.time_fn(lambda i: cycling_calls(tt.ops.moe_experts, calls), device, budget_s=1.0,
                            min_reps=len(calls))
        out.append([t.median_s, t.p10_s, t.p90_s])
        del calls
    return out


def dense_row(device, spec, touched, nbytes, t, tl, read_bw, copy_bw) -> dict:
    """A dense-weight row: the kernel's timing t against the read / copy bandwidth and the per-expert loop tl."""
    model, name, T = spec
    return {"device": device, "model": model, "dtype": name, "weights": name, "T": T, "experts": touched,
            **bandwidth_fields(nbytes, t, read_bw, copy_bw), "main_ms": "-", "vs_main": "-", "vs_bf16": "-",
            "loop_ms": tl.median_s * 1e3, "vs_loop": tl.median_s / t.median_s, "dense_ms": "-", "vs_dense": "-"}


def fill_main(rows, main, specs) -> None:
    """The baseline build's times (kernel_timings over specs) into the dense rows: main_ms, vs_main."""
    for row in rows if main is not None else ():
        if row["weights"] == row["dtype"]:
            m = main[specs.index((row["model"], row["dtype"], row["T"]))][0] * 1e3
            row.update(main_ms=m, vs_main=m / row["median_ms"])


def w8_rows(device, dtypes, tokens, read_bw, copy_bw) -> list[dict]:
    """The width-1/8 rows (kernel and the per-expert loop)."""
    import twotower_ext as tt

    rows = []
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for T in tokens:
            gen = torch.Generator().manual_seed(1)
            calls = w8_calls(dtype, T, gen, device)
            touched = sum(len(torch.unique(c[1])) for c in calls) / len(calls)
            nbytes = touched * 2 * W8_H * W8_I * calls[0][0].element_size()
            t = harness.time_fn(lambda i: cycling_calls(tt.ops.moe_experts, calls), device, budget_s=1.0,
                                min_reps=len(calls))
            tl = harness.time_fn(lambda i: cycling_calls(loop_baseline, calls), device, budget_s=0.5, min_reps=3,
                                 warmup=1)
            rows.append(dense_row(device, ("w1/8", name, T), touched, nbytes, t, tl, read_bw, copy_bw))
            del calls
    return rows


def real_rows(device, dtype, tokens, gen, read_bw, copy_bw) -> list[dict]:
    """One dtype's rows of the real model: the dense stack at each T (kernel, per-expert loop, dense baseline for
    T <= 16) and, for bf16 at QUANT_TOKENS, the same stack quantised to each format."""
    import twotower_ext as tt

    slow = dict(budget_s=0.5, min_reps=3, warmup=1) if device == "cpu" else {}
    rows = []
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
        row = dense_row(device, ("real", name, T), touched, nbytes, t, tl, read_bw, copy_bw)
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
            rows.append({"device": device, "model": "real", "dtype": name, "weights": fmt, "T": T, "experts": touched,
                         **bandwidth_fields(qbytes, tq, read_bw, copy_bw), "main_ms": "-", "vs_main": "-",
                         "vs_bf16": t.median_s / tq.median_s,
                         "loop_ms": "-", "vs_loop": "-", "dense_ms": "-", "vs_dense": "-"})
    del up, down, quantized
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    tokens = [1, 16] if quick else [1, 16, 64, 256]
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    names = [str(d).replace("torch.", "") for d in dtypes]
    # The baseline build runs each group's rows right before and after this process times them
    # (harness.around_baseline), and never while this process holds that group's weights.
    big = 768 << 20
    read_bw = harness.best_of(harness.measure_read_bandwidth, device, big)
    copy_bw = harness.best_of(harness.measure_copy_bandwidth, device, big)
    specs = [("w1/8", n, T) for n in names for T in (1, 16)]
    rows, main = harness.around_baseline("bench_moe", "kernel_timings",
                                         lambda: w8_rows(device, dtypes, (1, 16), read_bw, copy_bw), specs=specs,
                                         device=device)
    fill_main(rows, main, specs)
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        specs = [("real", str(dtype).replace("torch.", ""), T) for T in tokens]
        group, main = harness.around_baseline("bench_moe", "kernel_timings",
                                              lambda: real_rows(device, dtype, tokens, gen, read_bw, copy_bw),
                                              specs=specs, device=device)
        fill_main(group, main, specs)
        rows += group
    load = "load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else "load unknown"
    harness.print_table(f"moe_experts on {device}, {torch.get_num_threads()} threads (real: E={E} k={K} H={H} I={I}; "
                        f"w1/8: H={W8_H} I={W8_I}, {W8_LAYERS} layers cycled; "
                        f"read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s measured now; {load})", rows, COLUMNS)
    return rows
