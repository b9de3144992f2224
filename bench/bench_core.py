"""The decode core (runtime/): what one decode loop with per-row parameters as tensors costs and gains.

(a) params: microseconds per row-pass of 32 diffusion requests decoded at once with uniform parameters vs mixed
    ones (4 thresholds, greedy and sampling rows with their own seeds, two step counts). Guard: mixed <= 1.15x.
(b) host: host time per iteration outside the model's passes — the wall time of DecodeCore.step minus the time
    inside the model's passes (prefill, extension, denoiser / mock-AR pass) and the commit op — at 1, 8 and 32
    rows, AR and diffusion. Goal: at 32 rows <= 1.5x its time at 1 row.
(c) throughput, generated tokens/s, EOS off, gamma 0.8, on the three models of the README's serving table: this
    core's static batch (one `generate` of c requests) against the old engine's (`python -m bench core
    --baseline TREE:LIB` with a built checkout of main at the start of this work: `git worktree add DIR
    502abbf && tools/dev_build.sh DIR/build/dev`), and this core serving c closed-loop clients (arrivals and
    departures at any pass) against its own static batch; the old scheduler's closed loop is shown beside
    it. Goal: >= 0.95x at every concurrency. Both builds run the same points (bench/serve_points.py: the
    public API both have), the baseline in a child process right before this one's (harness.run_in_baseline).
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time

import torch

from . import harness, serve_points

COLUMNS = ["part", "model", "mode", "rows", "measure", "value", "reference", "ratio", "goal"]
PARITY = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "parity", "checkpoint")


def _prompts(vocab: int, n: int = 64, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(4, vocab) for _ in range(rng.randint(8, 40))] for _ in range(n)]


def _params_ab(lm, quick: bool) -> list[dict]:
    """(a): us per row-pass, uniform vs mixed, 32 rows at once."""
    n, new = 32, 32
    prompts = _prompts(lm.config.vocab_size, n)
    rng = random.Random(1)
    mixed = dict(threshold=[[0.5, 0.7, 0.8, 0.95][i % 4] for i in range(n)],
                 temperature=[rng.choice([0.0, 0.7]) for _ in range(n)], seed=[rng.randrange(2**40) for _ in range(n)],
                 steps_per_block=[[16, 12][i % 2] for i in range(n)])
    out = {}
    for name, kw in (("uniform", {}), ("mixed", mixed)):
        per = []
        for _ in range(1 if quick else 5):
            res = lm.generate(prompts, mode="diffusion", max_new_tokens=new, eos_token_id=None, **kw)
            per.append(res.stats["seconds"] / res.stats["nfe"] * 1e6)
        out[name] = sorted(per)[len(per) // 2]
    return [{"part": "a", "mode": "diffusion", "rows": n, "measure": "us per row-pass: mixed vs uniform parameters",
             "value": out["mixed"], "reference": out["uniform"], "ratio": out["mixed"] / out["uniform"],
             "goal": "<= 1.15"}]


def _host_b(lm, quick: bool) -> list[dict]:
    """(b): host time per iteration outside the model's passes."""
    from twotower_ext import ops
    from twotower_ext.runtime import DecodeCore, DecodeParams, Request

    model = lm.model
    inside = [0.0]
    depth = [0]   # a wrapped call inside another (denoise_commit's linear + threshold_unmask off the CPU) counts once
    wrapped = []

    def wrap(obj, name):
        f = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            depth[0] += 1
            try:
                return f(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    inside[0] += time.perf_counter() - t0
        setattr(obj, name, timed)
        wrapped.append((obj, name, f))

    for name in ("prefill", "extend_step", "denoise_commit", "mock_ar"):
        wrap(model, name)
    wrap(ops, "threshold_unmask")
    rows = []
    try:
        for mode in ("ar", "diffusion"):
            host = {}
            for n in (1, 8, 32):
                core = DecodeCore(model, n, 128)
                reqs = [Request(p, DecodeParams(mode=mode, max_new_tokens=16 if quick else 48, eos_token_id=None))
                        for p in _prompts(lm.config.vocab_size, n, seed=n)]
                core.submit(reqs)
                core.step()                     # admission and prefill aside
                inside[0], iters = 0.0, 0
                t0 = time.perf_counter()
                while core.step():
                    iters += 1
                host[n] = (time.perf_counter() - t0 - inside[0]) / max(1, iters) * 1e6
            for n in (1, 8, 32):
                rows.append({"part": "b", "mode": mode, "rows": n, "measure": "host us per iteration (vs 1 row)",
                             "value": host[n], "reference": host[1], "ratio": host[n] / host[1],
                             "goal": "<= 1.5" if n == 32 else ""})
    finally:
        for obj, name, f in wrapped:
            setattr(obj, name, f)
    return rows


def _throughput_c(name: str, path: str, vocab: int, new: int, conc, waves_max: int) -> list[dict]:
    prompts = _prompts(vocab)
    rows = []
    for mode in ("diffusion", "ar"):
        points = []
        for c in conc:
            points.append({"kind": "static", "mode": mode, "new": new, "c": c, "waves": 1, "prompts": prompts})
            points.append({"kind": "loop", "mode": mode, "new": new, "c": c,
                           "waves": max(1, min(waves_max, 32 // c)), "prompts": prompts})
        job = {"path": path, "threads": torch.get_num_threads(), "points": points}
        old = harness.run_in_baseline("serve_points", "run_job", job=job)
        new_tps = serve_points.run_job(job)["tokens_per_s"]
        old_tps = old["tokens_per_s"] if old else [None] * len(points)
        for i, c in enumerate(conc):
            static, loop = new_tps[2 * i], new_tps[2 * i + 1]
            old_static, old_loop = old_tps[2 * i], old_tps[2 * i + 1]
            if old_static is not None:
                rows.append({"part": "c", "model": name, "mode": mode, "rows": c,
                             "measure": "static batch tokens/s: this core vs the old engine", "value": static,
                             "reference": old_static, "ratio": static / old_static, "goal": ">= 0.95"})
            rows.append({"part": "c", "model": name, "mode": mode, "rows": c,
                         "measure": "serving (closed loop) tokens/s vs this core's static batch", "value": loop,
                         "reference": static, "ratio": loop / static, "goal": ">= 0.95"})
            if old_loop is not None:
                rows.append({"part": "c", "model": name, "mode": mode, "rows": c,
                             "measure": "before: the old scheduler's closed loop vs the old static batch",
                             "value": old_loop, "reference": old_static, "ratio": old_loop / old_static, "goal": ""})
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    if device != "cpu":
        print("bench core: the CPU measurements only (the GPU's are in tools/gpu_check.sh)", file=sys.stderr)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as `twotower serve` does for these small models
    rows = []
    try:
        lm = tt.load(tt.default_model_path(), dtype=torch.float32)
        parity = tt.load(PARITY, dtype=torch.float32)
        with torch.inference_mode():
            rows += [{"model": "parity checkpoint (fp32)", **r} for r in _params_ab(parity, quick)]
            rows += [{"model": "shipped (fp32)", **r} for r in _host_b(lm, quick)]
        if harness.baseline() is None:
            print("bench core: no --baseline: (c) runs without the old engine's columns", file=sys.stderr)
        conc = (1, 4) if quick else (1, 4, 8, 16, 32)
        models = [("shipped (fp32)", tt.default_model_path(), lm.config.vocab_size, 32, 4)]
        if not quick:
            tmp = tempfile.mkdtemp(prefix="tt-bench-core-")
            models += [("parity checkpoint (fp32)", PARITY, 512, 32, 4),
                       ("real pattern, width 1/8, random (fp32)",
                        random_checkpoint(os.path.join(tmp, "w8"), scaled_config(width=0.125, vocab=8192), seed=1),
                        8192, 16, 2)]
        for name, path, vocab, new, waves in models:
            rows += _throughput_c(name, path, vocab, new, conc, waves)
            print(f"  {name}: done", flush=True)
    finally:
        torch.set_num_threads(old_threads)
    harness.print_table(f"decode core on {device}: (a) mixed parameters, (b) host time per iteration, (c) vs the "
                        f"static batch and the old engine", rows, COLUMNS)
    return rows
