"""threshold_unmask: the compiled kernel against the step written the lean PyTorch way, timed the same way:
greedy (T=0) as NVIDIA's code writes it (-1e12 on the mask logit, log_softmax, max, exp, then the commit rule);
sampled (T=1) as torch's Gumbel-max (l / T + Gumbel noise from torch.rand, argmax, softmax confidence, commit
rule): the same work, torch's RNG instead of Philox. The clarity-first reference.threshold_unmask (checks, edge
cases, the bit-exact Philox in int64 ops) is a test oracle and is not timed.

Shapes: one commit step of the denoiser's S=16 block over a 131072-token vocabulary, B in {1, 8}, fp32 and
bf16 logits, greedy and, at B=1 fp32, sampled. Every masked position is scanned, so the step reads all logits
once: bytes = B*S*V*elt + x (read and written); the limit is a pure read of that many bytes measured next to
the row. The kernel gets step/seed/offset as device tensors and preallocated outputs, as the engine's captured
step does; every call starts from an all-masked block (CPU: x is reset inside the timed call, 2*B*16*8 bytes).
CUDA: 32 calls, each on its own logits buffer (cold L2) and x, captured in one CUDA graph and timed per call,
so host launch overhead is excluded as in the engine; the PyTorch baselines run eagerly (they synchronise).
"""
from __future__ import annotations

import itertools

import torch

from . import harness

COLUMNS = ["device", "dtype", "B", "S", "V", "T", "median_us", "p10-p90_us", "MB", "GB/s", "read_GB/s", "%read",
           "lean_torch_us", "speedup", "other_cores", "load1"]
MASK, S, V, SPB, GAMMA = 3, 16, 131072, 16, 0.9


def _nvidia_style(logits, x):
    """NVIDIA's step as its code writes it (greedy): -1e12 on the mask logit, log_softmax, max, exp; then the
    commit rule. No validation or edge cases: the lean PyTorch-ops version."""
    from twotower_ext import reference

    l = logits.float().clone()
    l[..., MASK] = -1e12
    logp, pred = torch.log_softmax(l, dim=-1).max(-1)
    reference.unmask_commit(x, pred, logp.exp(), MASK, GAMMA, 0, SPB)


def _torch_gumbel(logits, x, temperature=1.0):
    """The sampled step the lean PyTorch way: Gumbel-max over logits / T with torch.rand noise."""
    from twotower_ext import reference

    l = logits.float().clone()
    l[..., MASK] = -1e12
    g = -torch.log(-torch.log(torch.rand_like(l).clamp_(1e-20, 1.0 - 1e-7)))
    pred = (l / temperature + g).argmax(-1)
    conf = torch.log_softmax(l, dim=-1).gather(-1, pred[..., None]).squeeze(-1).exp()
    reference.unmask_commit(x, pred, conf, MASK, GAMMA, 0, SPB)


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

        nbytes = B * S * V * bufs[0].element_size() + 2 * B * S * 8
        limit = harness.measure_read_bandwidth(device, nbytes if device == "cpu" else 256 << 20)
        if device == "cuda":
            t = _time_cuda_graph(kernel, bufs, B)
        else:
            t = harness.time_fn(_timer(device, kernel, bufs, B), device)
        lean = _nvidia_style if temp == 0 else (lambda lg, x: _torch_gumbel(lg, x, temp))
        tlean = harness.time_fn(_timer(device, lean, bufs, B), device, n_buffers=n_buf)
        gbps = nbytes / t.median_s / 1e9
        rows.append({"device": device, "dtype": str(dtype).replace("torch.", ""), "B": B, "S": S, "V": V, "T": temp,
                     "median_us": t.median_s * 1e6, "p10-p90_us": t.spread, "MB": nbytes / 1e6, "GB/s": gbps,
                     "read_GB/s": limit, "%read": 100 * gbps / limit, "lean_torch_us": tlean.median_s * 1e6,
                     "speedup": tlean.median_s / t.median_s, **harness.load_fields(t, tlean)})
    harness.print_table(f"threshold_unmask on {device} (%read: of a pure read of the same bytes measured next to "
                        f"each row; lean_torch: NVIDIA's greedy step / torch Gumbel-max)", rows, COLUMNS)
    return rows
