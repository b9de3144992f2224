"""Throughput points of a loaded model, written against the public API that every version of twotower_ext has
(`lm.generate`, `serve.Scheduler(...).submit(...).result()`), so bench/bench_core.py can run the same points on
an older build in a child process (its baseline, harness.run_in_baseline) and on this tree, side by side in one
run."""
from __future__ import annotations

import threading
import time


def static_batch(lm, prompts, mode: str, new: int, reps: int = 5) -> float:
    """Generated tokens/s of the prompts as one `generate` batch (EOS off), the median of reps runs."""
    rates = []
    for _ in range(reps):
        res = lm.generate(prompts, mode=mode, max_new_tokens=new, eos_token_id=None, threshold=0.8)
        rates.append(res.stats["tokens"] / res.stats["seconds"])
    return sorted(rates)[len(rates) // 2]


def closed_loop(lm, prompts, mode: str, new: int, clients: int, waves: int) -> float:
    """Generated tokens/s of `clients` closed-loop clients that each submit `waves` requests one after another
    to a serving scheduler with a row for every client (arrivals and departures at any pass)."""
    from twotower_ext.serve import Scheduler

    sched = Scheduler(lm, max_batch=clients, max_queue=clients, max_len=max(len(p) for p in prompts) + new + 16)
    params = dict(mode=mode, max_tokens=new, eos_token_id=None, threshold=0.8)
    try:
        sched.submit(prompts[0], **params).result(timeout=3600)   # warm
        tokens = []
        lock = threading.Lock()

        def client(k):
            for w in range(waves):
                h = sched.submit(prompts[(k * waves + w) % len(prompts)], **params).result(timeout=3600)
                with lock:
                    tokens.append(len(h.tokens))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(tokens) / (time.perf_counter() - t0)
    finally:
        sched.shutdown()


def run_job(job: dict) -> dict:
    """job: {"path", "threads", "points": [{"kind": "static" | "loop", "mode", "new", "c", "waves", "prompts"}]}."""
    import torch

    import twotower_ext as tt

    torch.set_num_threads(job["threads"])
    lm = tt.load(job["path"], dtype=torch.float32)
    out = []
    for p in job["points"]:
        with torch.inference_mode():
            if p["kind"] == "static":
                out.append(static_batch(lm, p["prompts"][:p["c"]], p["mode"], p["new"]))
            else:
                out.append(closed_loop(lm, p["prompts"], p["mode"], p["new"], p["c"], p["waves"]))
    return {"tokens_per_s": out}
