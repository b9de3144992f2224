"""Prefix caching: time to the first token (AR) / first block (diffusion) and throughput, cache on vs off.

Two workloads, on the decode core (runtime.DecodeCore: what `twotower serve`'s scheduler thread steps,
stepped here by the bench's thread so a burst is one admission), each run with the prefix cache off and on,
side by side in one process:
- shared prefix: 32 requests submitted at once, sharing a 2,000-token prefix (a system prompt, a document)
  and each with its own 20-token suffix, on an empty cache;
- conversation: one conversation of 8 turns: each turn's prompt is the previous prompt, its answer and a new
  64-token user message, after a 500-token system prompt; each turn is submitted when the previous one ended.
AR (16 new tokens, the first token timed) and diffusion (one 16-token block at gamma 0.8, the first block
timed), greedy, no EOS stop. Per row: p50 / p99 of submit -> first token (block), generated tokens per second
over the workload's wall time, the share of prompt tokens the cache supplied, and on the cache-on row the
p50 speedup over cache-off and whether every request's tokens equal its cache-off tokens. Models: the
shipped model and a random-weight model of the real 52-layer pattern at width 1/8 (vocab 8192), fp32.
"""
from __future__ import annotations

import os
import random
import tempfile

import torch

from . import harness

COLUMNS = ["model", "workload", "mode", "cache", "requests", "prompt_tokens", "hit_%", "ttft_p50_s", "ttft_p99_s",
           "tokens/s", "wall_s", "p50_speedup", "same_output", "threads", "other_cores", "load1"]
NEW_TOKENS = 16
CACHE_GB = 4.0


def _models(quick: bool):
    import twotower_ext as tt
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    yield "shipped (fp32)", tt.default_model_path()
    if quick:
        return
    tmp = tempfile.mkdtemp(prefix="tt-bench-prefix-")
    yield "real pattern, width 1/8, random (fp32)", random_checkpoint(
        os.path.join(tmp, "w8"), scaled_config(width=0.125, vocab=8192), seed=1)


def _pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _serve(core, prompts, params) -> list:
    """Submit every prompt at once (one admission) and step the core until they are done."""
    from twotower_ext.runtime import Request

    reqs = [Request(p, params) for p in prompts]
    core.submit(reqs)
    while core.step():
        pass
    return reqs


def _shared_prefix(core, params, rng, V: int, n: int, prefix_len: int) -> list:
    prefix = [1] + [rng.randrange(4, V) for _ in range(prefix_len - 1)]
    return _serve(core, [prefix + [rng.randrange(4, V) for _ in range(20)] for _ in range(n)], params)


def _conversation(core, params, rng, V: int, turns: int, system_len: int) -> list:
    prompt, done = [1] + [rng.randrange(4, V) for _ in range(system_len - 1)], []
    for _ in range(turns):
        prompt = prompt + [rng.randrange(4, V) for _ in range(64)]
        done += _serve(core, [prompt], params)
        prompt = prompt + done[-1].tokens
    return done


def _measure(core, params, workload, seed: int, V: int, quick: bool) -> dict:
    before = core.prefix_stats()
    out = {}

    def go():
        rng = random.Random(seed)   # the same prompts with the cache on and off
        if workload == "shared prefix":
            out["done"] = _shared_prefix(core, params, rng, V, 8 if quick else 32, 600 if quick else 2000)
        else:
            out["done"] = _conversation(core, params, rng, V, 4 if quick else 8, 200 if quick else 500)

    t = harness.time_calls(go, reps=1)
    done, after = out["done"], core.prefix_stats()
    ttft = [h.t_first - h.t_submit for h in done]
    prompt_tokens = sum(len(h.prompt) for h in done)
    hits = after.get("prefix_cache_hits", 0) - before.get("prefix_cache_hits", 0)
    return {"requests": len(done), "prompt_tokens": prompt_tokens, "hit_%": 100.0 * hits / prompt_tokens,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99), "wall_s": t.median_s,
            "tokens/s": sum(len(h.tokens) for h in done) / t.median_s, "tokens": [h.tokens for h in done],
            **harness.load_fields(t)}


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext.runtime import DecodeCore, DecodeParams
    from twotower_ext.runtime.prefix_store import PrefixStore, budget_bytes

    rows, summary = [], []
    old_threads = torch.get_num_threads()
    for name, path in _models(quick):
        lm = tt.load(path, device=device, dtype=torch.float32)
        if device == "cpu" and lm.config.hidden_size < 1024:
            torch.set_num_threads(1)   # as `twotower serve` does for small models
        V = lm.config.vocab_size
        try:
            points = [(w, m) for w in ("shared prefix", "conversation") for m in ("ar", "diffusion")]
            for seed, (workload, mode) in enumerate(points):
                params = DecodeParams(mode=mode, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                      threshold=0.8).validate(V)
                point = {}
                for cache in ("off", "on"):   # a fresh core each: an empty cache, the same prompts
                    store = PrefixStore(lm.model, budget_bytes(CACHE_GB, "bench")) if cache == "on" else None
                    core = DecodeCore(lm.model, max_rows=32, max_len=2048 + 1024, max_queue=32, prefix_cache=store)
                    _serve(core, [[1, 5, 6, 7]], params)   # warm
                    point[cache] = _measure(core, params, workload, seed, V, quick)
                    del core, store
                same = point["on"].pop("tokens") == point["off"].pop("tokens")
                speed = point["off"]["ttft_p50_s"] / point["on"]["ttft_p50_s"]
                for cache in ("off", "on"):
                    rows.append({"model": name, "workload": workload, "mode": mode, "cache": cache,
                                 **point[cache], "p50_speedup": speed if cache == "on" else "",
                                 "same_output": ("yes" if same else "NO") if cache == "on" else "",
                                 "threads": torch.get_num_threads()})
                summary.append(f"{name}, {workload}, {mode}: p50 time to the first "
                               f"{'token' if mode == 'ar' else 'block'} {speed:.1f}x lower with the cache; "
                               f"outputs {'identical' if same else 'DIFFERENT'}")
                print(f"  {summary[-1]}", flush=True)
        finally:
            torch.set_num_threads(old_threads)
    harness.print_table(f"prefix cache on {device}: time to the first token / block, cache off vs on", rows, COLUMNS)
    for line in summary:
        print(line)
    return rows
