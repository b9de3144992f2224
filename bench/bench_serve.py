"""Serving: throughput and latency of the continuous-batching scheduler at concurrency 1, 4, 8, 16, 32.

Closed loop: `c` client threads each submit a request, wait for it, submit the next, for `waves` requests
each; the scheduler (max_batch = the largest concurrency, so every client gets a row) batches whatever is
live. Diffusion at gamma 0.8 against AR on the same scheduler, same prompts, same new tokens (no EOS
stop), on the shipped model and on a random-weight model of the real 52-layer pattern at width 1/8.
Every row: generated tokens/s over the wall time of the point, p50 / p99 request latency, p50 time to the
first block (token), tokens per NFE and the mean rows per batched pass; the in-process scheduler, no HTTP
(the HTTP layer adds a constant per request, measured by nothing here). Baseline side by side: the same c
requests as one static `generate` batch (what a server without continuous batching could do at best).
The parity checkpoint (tiny, random-ish weights whose denoiser commits ~2.4 tokens per pass) is added as
the one model here where tokens per pass exceed 1. The summary says at which
concurrency diffusion's throughput passes AR's, if it does.
"""
from __future__ import annotations

import os
import random
import tempfile
import threading
import time

import torch

from . import harness

COLUMNS = ["model", "mode", "concurrency", "requests", "tokens", "tokens/s", "p50_s", "p99_s", "ttfb_p50_s",
           "tokens/nfe", "rows/pass", "passes", "static_batch_tokens/s"]
CONCURRENCY = (1, 4, 8, 16, 32)
PARITY = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "parity", "checkpoint")


def _models(quick: bool):
    import twotower_ext as tt
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    # (name, checkpoint, new tokens per request, requests per client at most)
    yield "shipped (fp32)", tt.default_model_path(), 32, 4
    if quick:
        return
    # the parity checkpoint's denoiser commits ~2.4 tokens per pass at gamma 0.8 (bench e2e): where
    # batching and tokens per pass meet
    yield "parity checkpoint (fp32)", PARITY, 32, 4
    tmp = tempfile.mkdtemp(prefix="tt-bench-serve-")
    yield "real pattern, width 1/8, random (fp32)", random_checkpoint(
        os.path.join(tmp, "w8"), scaled_config(width=0.125, vocab=8192), seed=1), 16, 2


def _pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _point(sched, prompts, c: int, waves: int, params: dict) -> dict:
    """c closed-loop clients x `waves` requests each; returns the point's measurements."""
    done = []
    lock = threading.Lock()
    m = sched.metrics
    passes0, rows0 = m.value("passes_total"), m.value("rows_per_pass_sum")

    def client(k):
        for w in range(waves):
            h = sched.submit(prompts[(k * waves + w) % len(prompts)], **params).result(timeout=3600)
            with lock:
                done.append(h)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(len(h.tokens) for h in done)
    lat = [h.t_done - h.t_submit for h in done]
    passes = int(m.value("passes_total") - passes0)
    return {"requests": len(done), "tokens": tokens, "tokens/s": tokens / wall, "p50_s": _pct(lat, 0.5),
            "p99_s": _pct(lat, 0.99), "ttfb_p50_s": _pct([h.t_first - h.t_submit for h in done], 0.5),
            "tokens/nfe": tokens / sum(h.nfe for h in done), "rows/pass": (m.value("rows_per_pass_sum") - rows0) / max(1, passes),
            "passes": passes}


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext.serve import Scheduler

    conc = (1, 4) if quick else CONCURRENCY
    rows, summary = [], []
    old_threads = torch.get_num_threads()
    for name, path, new, max_waves in _models(quick):
        lm = tt.load(path, device=device, dtype=torch.float32)
        if device == "cpu" and lm.config.hidden_size < 1024:
            torch.set_num_threads(1)   # as `twotower serve` does for small models
        rng = random.Random(0)
        V = lm.config.vocab_size
        prompts = [[1] + [rng.randrange(4, V) for _ in range(rng.randint(8, 40))] for _ in range(64)]
        sched = Scheduler(lm, max_batch=max(conc), max_queue=max(conc), max_len=64 + new)
        try:
            sched.submit(prompts[0], mode="diffusion", max_tokens=new).result()   # warm
            tps = {}
            for mode in ("diffusion", "ar"):
                params = dict(mode=mode, max_tokens=new, eos_token_id=None, threshold=0.8)
                for c in conc:
                    waves = 1 if quick else max(1, min(max_waves, 32 // c))
                    r = {"model": name, "mode": mode, "concurrency": c, **_point(sched, prompts, c, waves, params)}
                    # the baseline: the same c requests as one static batch of `generate` (no arrivals, no
                    # departures until the end of its blocks; EOS off so every row runs to the end)
                    res = lm.generate(prompts[:c], mode=mode, max_new_tokens=new, eos_token_id=None, threshold=0.8)
                    r["static_batch_tokens/s"] = res.stats["tokens_per_s"]
                    rows.append(r)
                    tps[mode, c] = r["tokens/s"]
                    print(f"  {name} {mode} c={c}: {r['tokens/s']:.1f} tokens/s, p50 {r['p50_s']:.3f} s", flush=True)
        finally:
            sched.shutdown()
            torch.set_num_threads(old_threads)
        over = [c for c in conc if tps["diffusion", c] > tps["ar", c]]
        summary.append(f"{name}: diffusion/AR throughput " +
                       ", ".join(f"c={c} {tps['diffusion', c] / tps['ar', c]:.2f}x" for c in conc) +
                       (f"; diffusion ahead at concurrency {', '.join(map(str, over))}" if over
                        else "; AR ahead at every concurrency"))
    harness.print_table(f"serving on {device}: closed-loop clients, diffusion (gamma 0.8) vs AR", rows, COLUMNS)
    for line in summary:
        print(line)
    _plot(rows, device)
    return rows


def _plot(rows, device):
    plt = harness.pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in models:
        for mode, ls in (("diffusion", "o-"), ("ar", "s--")):
            d = [r for r in rows if r["model"] == model and r["mode"] == mode]
            axes[0].plot([r["concurrency"] for r in d], [r["tokens/s"] for r in d], ls, label=f"{model} {mode}")
            axes[1].plot([r["concurrency"] for r in d], [r["p50_s"] for r in d], ls, label=f"{model} {mode}")
    axes[0].set(xlabel="concurrency", ylabel="generated tokens/s", title="throughput", xscale="log", yscale="log")
    axes[1].set(xlabel="concurrency", ylabel="p50 latency (s)", title="request latency", xscale="log", yscale="log")
    axes[0].legend(fontsize=6)
    out = os.path.join(os.path.dirname(__file__), "results", f"serve-{device}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"(plot: {out})")
