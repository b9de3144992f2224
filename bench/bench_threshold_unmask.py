"""threshold_unmask: the compiled kernel against the same rule written with PyTorch ops (reference.py, with
its checks and edge cases: torch_us) and against NVIDIA's greedy step as its code writes it (nvidia_us).

Shapes: one commit step of the denoiser's S=16 block over a 131072-token vocabulary, B in {1, 8}, fp32 and
bf16 logits, greedy (T=0) and, at B=1 fp32, sampled (T=1: Philox + Gumbel per entry). Every masked position
is scanned, so the step reads all logits once: bytes = B*S*V*elt + x (read and written). The kernel gets
step/seed/offset as device tensors and preallocated outputs, as the engine's captured step does; every
call starts from an all-masked block (CPU: x is reset inside the timed call, 2*B*16*8 bytes). CUDA: 32
calls, each on its own logits buffer (cold L2) and x, captured in one CUDA graph and timed per call, so
host launch overhead is excluded as in the engine; the PyTorch-ops baseline runs eagerly (it cannot be
captured: it synchronises).
"""
from __future__ import annotations

import itertools

import torch

from . import harness

COLUMNS = ["device", "dtype", "B", "S", "V", "T", "median_us", "p10-p90_us", "MB", "GB/s", "%copy_bw", "torch_us",
           "speedup", "nvidia_us", "speedup_nv"]
MASK, S, V, SPB, GAMMA = 3, 16, 131072, 16, 0.9


def _nvidia_style(logits, x):
    """NVIDIA's step as its code writes it (greedy): -1e12 on the mask logit, log_softmax, max, exp; then the
    commit rule. No validation or edge cases: the leanest PyTorch-ops version, a second baseline."""
    from twotower_ext import reference

    l = logits.float().clone()
    l[..., MASK] = -1e12
    logp, pred = torch.log_softmax(l, dim=-1).max(-1)
    reference.unmask_commit(x, pred, logp.exp(), MASK, GAMMA, 0, SPB)


def _timer(device: str, op, logits_bufs, B: int):
    """A closure factory for harness.time_fn: op(logits, x) on an all-masked x."""
    if device == "cpu":
        x0 = torch.full((B, S), MASK)
        x = x0.clone()
        return lambda i: (lambda: (x.copy_(x0), op(logits_bufs[i], x)))
    pool = itertools.cycle([torch.full((B, S), MASK, device=device) for _ in range(64)])
    return lambda i: (lambda: op(logits_bufs[i], next(pool)))


def _time_cuda_graph(op, bufs, B: int, calls: int = 32, reps: int = 20) -> harness.Timing:
    """Device time per call of `calls` ops captured in one CUDA graph; the x reset runs before the timing."""
    xs = [torch.full((B, S), MASK, device="cuda") for _ in range(calls)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        op(bufs[0], xs[0].clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i, x in enumerate(xs):
            op(bufs[i % len(bufs)], x)
    samples = []
    for _ in range(reps):
        for x in xs:
            x.fill_(MASK)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e-3 / calls)
    return harness._summarise(samples)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext import reference

    limit = harness.measure_copy_bandwidth(device)   # CUDA: HBM read+write rate of a large copy
    rows = []
    configs = [(1, torch.float32, 0.0), (1, torch.bfloat16, 0.0), (1, torch.float32, 1.0),
               (8, torch.float32, 0.0), (8, torch.bfloat16, 0.0)]
    if quick:
        configs = configs[:1]
    for B, dtype, temp in configs:
        # CUDA: enough distinct logits buffers (>= 256 MiB) that a call never finds its input in L2.
        n_buf = max(2, (256 << 20) // (B * S * V * 4)) if device == "cuda" else 1
        bufs = [torch.randn(B, S, V, device=device).to(dtype) for _ in range(n_buf)]
        step, seed, offset = (torch.tensor([v], device=device) for v in (0, 1234, 0))
        counts = torch.empty(B, dtype=torch.int32, device=device)
        done = torch.empty(B, dtype=torch.bool, device=device)

        def kernel(logits, x):
            tt.threshold_unmask(logits, x, MASK, GAMMA, step, SPB, temp, seed, offset, counts, done)

        def torch_ops(logits, x):
            reference.threshold_unmask(logits, x, MASK, GAMMA, 0, SPB, temp, 1234, 0)

        if device == "cuda":
            t = _time_cuda_graph(kernel, bufs, B)
        else:
            t = harness.time_fn(_timer(device, kernel, bufs, B), device)
        slow = temp > 0 or B > 1   # the PyTorch-ops Philox takes seconds: fewer repetitions
        kw = dict(warmup=1, min_reps=3, budget_s=0.3) if slow and device == "cpu" else {}
        tref = harness.time_fn(_timer(device, torch_ops, bufs, B), device, n_buffers=n_buf, **kw)
        tnv = None if temp > 0 else harness.time_fn(
            _timer(device, _nvidia_style, bufs, B), device, n_buffers=n_buf, **kw)
        nbytes = B * S * V * bufs[0].element_size() + 2 * B * S * 8
        gbps = nbytes / t.median_s / 1e9
        rows.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "B": B, "S": S, "V": V, "T": temp,
                     "median_us": t.median_s * 1e6, "p10-p90_us": t.spread, "MB": nbytes / 1e6, "GB/s": gbps,
                     "%copy_bw": 100 * gbps / limit, "torch_us": tref.median_s * 1e6,
                     "speedup": tref.median_s / t.median_s,
                     "nvidia_us": tnv.median_s * 1e6 if tnv else "", "speedup_nv": tnv.median_s / t.median_s if tnv else ""})
    harness.print_table(f"threshold_unmask on {device} (copy bandwidth measured now: {limit:.1f} GB/s)", rows, COLUMNS)
    return rows
