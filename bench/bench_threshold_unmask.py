"""threshold_unmask: the compiled kernel against the step written the lean PyTorch way, timed the same way:
greedy (T=0) as NVIDIA's code writes it (-1e12 on the mask logit, log_softmax, max, exp, then the commit rule);
sampled (T=1) as torch's Gumbel-max (l / T + Gumbel noise from torch.rand, argmax, softmax confidence, commit
rule): the same work, torch's RNG instead of Philox. The clarity-first reference.threshold_unmask (checks, edge
cases, the bit-exact Philox in int64 ops) is a test oracle and is not timed.

Shapes: one commit step of the denoiser's S=16 block over a 131072-token vocabulary, B in {1, 8}, fp32 and
bf16 logits, greedy and, at B=1 fp32, sampled; and B=32 with uniform parameters (every row the same gamma,
step, steps_per_block, temperature, seed, block) against mixed ones (each row its own; greedy rows at T=0, or
every row sampling at its own T in [0.5, 1.5]), so the pair shows what per-row parameters cost. Every masked
position is scanned, so the step reads all logits once: bytes = B*S*V*elt + x (read and written); the limit
is a pure read of that many bytes measured next to the row. The kernel gets every per-row parameter as a [B]
device tensor and preallocated outputs, as a captured step does; every call starts from an all-masked block
(CPU: x is reset inside the timed call, 2*B*16*8 bytes). The lean PyTorch baselines take the same per-row
parameters (one commit rule over [B] tensors, per-row temperatures).
CUDA: 32 calls, each on its own logits buffer (cold L2) and x, captured in one CUDA graph and timed per call,
so host launch overhead is excluded as in the engine; the PyTorch baselines run eagerly (they synchronise).
"""
from __future__ import annotations

import itertools

import torch

from . import harness

COLUMNS = ["device", "dtype", "B", "S", "V", "params", "T", "median_us", "p10-p90_us", "MB", "GB/s", "read_GB/s", "%read",
           "lean_torch_us", "speedup", "other_cores", "load1"]
MASK, S, V, SPB, GAMMA = 3, 16, 131072, 16, 0.9


def _nvidia_style(logits, x, p):
    """NVIDIA's step as its code writes it (greedy): -1e12 on the mask logit, log_softmax, max, exp; then the
    commit rule (p: the per-row gamma, step, steps_per_block). No validation or edge cases: the lean PyTorch-ops
    version."""
    from twotower_ext import reference

    l = logits.float().clone()
    l[..., MASK] = -1e12
    logp, pred = torch.log_softmax(l, dim=-1).max(-1)
    reference.unmask_commit(x, pred, logp.exp(), MASK, p["gamma"], p["step"], p["steps_per_block"])


def _torch_gumbel(logits, x, p):
    """The sampled step the lean PyTorch way: Gumbel-max over logits / T (per row) with torch.rand noise."""
    from twotower_ext import reference

    l = logits.float().clone()
    l[..., MASK] = -1e12
    g = -torch.log(-torch.log(torch.rand_like(l).clamp_(1e-20, 1.0 - 1e-7)))
    pred = (l / p["temperature"].view(-1, 1, 1) + g).argmax(-1)
    conf = torch.log_softmax(l, dim=-1).gather(-1, pred[..., None]).squeeze(-1).exp()
    reference.unmask_commit(x, pred, conf, MASK, p["gamma"], p["step"], p["steps_per_block"])


def _row_params(B: int, temp: float, mixed: bool, device: str) -> dict:
    """Per-row parameters as [B] device tensors: uniform (gamma 0.9, first step of 16, T = temp, one seed and
    block) or mixed (gamma, steps_per_block, step, seed, block and kept per row; T per row in [0.5, 1.5] when
    temp > 0)."""
    g = torch.Generator().manual_seed(B)
    if not mixed:
        p = {"gamma": torch.full((B,), GAMMA), "step": torch.zeros(B, dtype=torch.int32),
             "steps_per_block": torch.full((B,), SPB, dtype=torch.int32), "temperature": torch.full((B,), temp),
             "seed": torch.full((B,), 1234), "block": torch.zeros(B, dtype=torch.int64),
             "kept": torch.full((B,), S, dtype=torch.int32)}
    else:
        spb = torch.randint(2, 2 * SPB, (B,), generator=g, dtype=torch.int32)
        p = {"gamma": 0.5 + 0.5 * torch.rand(B, generator=g),
             "step": (torch.randint(0, 2**20, (B,), generator=g) % (spb - 1)).to(torch.int32),   # not the last
             "steps_per_block": spb,
             "temperature": 0.5 + torch.rand(B, generator=g) if temp > 0 else torch.zeros(B),
             "seed": torch.randint(-2**62, 2**62, (B,), generator=g), "block": torch.randint(0, 2**20, (B,), generator=g),
             "kept": torch.randint(1, S + 1, (B,), generator=g, dtype=torch.int32)}
    return {k: v.to(device) for k, v in p.items()}


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

    rows = []
    configs = [(1, torch.float32, 0.0, False), (1, torch.bfloat16, 0.0, False), (1, torch.float32, 1.0, False),
               (8, torch.float32, 0.0, False), (8, torch.bfloat16, 0.0, False)]
    configs += [(32, dtype, temp, mixed) for dtype, temp in ((torch.float32, 0.0), (torch.bfloat16, 0.0),
                                                             (torch.float32, 1.0)) for mixed in (False, True)]
    if quick:
        configs = configs[:1]
    for B, dtype, temp, mixed in configs:
        # CUDA: enough distinct logits buffers (>= 256 MiB) that a call never finds its input in L2.
        n_buf = max(2, (256 << 20) // (B * S * V * 4)) if device == "cuda" else 1
        bufs = [torch.randn(B, S, V, device=device).to(dtype) for _ in range(n_buf)]
        p = _row_params(B, temp, mixed, device)
        counts = torch.empty(B, dtype=torch.int32, device=device)
        done = torch.empty(B, dtype=torch.bool, device=device)

        def kernel(logits, x):
            tt.threshold_unmask(logits, x, MASK, **p, out_counts=counts, out_done=done)

        nbytes = B * S * V * bufs[0].element_size() + 2 * B * S * 8
        limit = harness.measure_read_bandwidth(device, nbytes if device == "cpu" else 256 << 20)
        if device == "cuda":
            t = _time_cuda_graph(kernel, bufs, B)
        else:
            t = harness.time_fn(_timer(device, kernel, bufs, B), device)
        lean = (lambda lg, x: _nvidia_style(lg, x, p)) if temp == 0 else (lambda lg, x: _torch_gumbel(lg, x, p))
        tlean = harness.time_fn(_timer(device, lean, bufs, B), device, n_buffers=n_buf)
        gbps = nbytes / t.median_s / 1e9
        rows.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "B": B, "S": S, "V": V,
                     "params": "mixed" if mixed else "uniform", "T": ("0.5-1.5" if mixed else temp) if temp else 0.0,
                     "median_us": t.median_s * 1e6, "p10-p90_us": t.spread, "MB": nbytes / 1e6, "GB/s": gbps,
                     "read_GB/s": limit, "%read": 100 * gbps / limit, "lean_torch_us": tlean.median_s * 1e6,
                     "speedup": tlean.median_s / t.median_s, **harness.load_fields(t, tlean)})
    harness.print_table(f"threshold_unmask on {device} (%read: of a pure read of the same bytes measured next to "
                        f"each row; lean_torch: NVIDIA's greedy step / torch Gumbel-max)", rows, COLUMNS)
    return rows
