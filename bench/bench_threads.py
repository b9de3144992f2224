"""CPU threads under contention (docs/threads.md). Not part of `python -m bench` (it needs a ~2 GB random
checkpoint and minutes of a loaded machine); run the parts by hand, once per OpenMP wait policy, since
libgomp reads the policy when torch loads:

  python -m bench.bench_threads ops THREADS               # per-op median us at the width-1/8 denoiser shapes
  python -m bench.bench_threads e2e [--checkpoint DIR]    # ms per denoiser pass, 1 vs 2 threads, with and
                                                          # without one extra busy process
  OMP_WAIT_POLICY=PASSIVE python -m bench.bench_threads ...

torch is imported before twotower_ext here, so the package leaves the policy as the environment sets it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import twotower_ext as tt

DEFAULT_CKPT = os.path.join(tempfile.gettempdir(), "twotower_w8e128")   # bench_passes.checkpoint's


def _policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY", "default")


def ops(threads: int) -> dict:
    """Median / p90 us per call of the three ops at the width-1/8 real-pattern denoiser shapes (batch 1)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, L, H, P, N, G, K, V = 1, 16, 8, 64, 128, 1, 4, 131072
    C = H * P + 2 * G * N
    scan_args = (r(B, L, C), r(B, L, H), r(B, K - 1, C), r(B, H, P, N), r(C, K), r(C), r(H), r(H), r(H))
    logits, x0 = r(B, L, V), torch.full((B, L), 3, dtype=torch.long)
    attn_args = (r(B, L, 4, 80), r(B, L, 2, 80), r(B, L, 2, 80), r(B, 256, 2, 80), r(B, 256, 2, 80),
                 torch.tensor([80], dtype=torch.int32), 80 ** -0.5)
    calls = (("mamba_block_scan", lambda: tt.mamba_block_scan(*scan_args), 300),
             ("threshold_unmask", lambda: tt.threshold_unmask(logits, x0.clone(), 3, 0.9, 0, 16), 60),
             ("block_attention", lambda: tt.block_attention(*attn_args), 300))
    out = {"threads": threads, "policy": _policy(), "load1": round(os.getloadavg()[0], 1)}
    for name, fn, n in calls:
        for _ in range(10):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name + "_us"] = round(statistics.median(ts) * 1e6, 1)
        out[name + "_p90_us"] = round(sorted(ts)[int(0.9 * len(ts))] * 1e6, 1)
    return out


def e2e(path: str):
    """ms per denoiser pass (the mean over one 16-token block at threshold 1.0: 16 passes) after a 64-token
    prompt, for 1 and 2 threads, without and with one extra process busy on a core."""
    from .bench_passes import checkpoint

    lm = tt.load(checkpoint(path), dtype=torch.float32, threads=0)
    prompt = list(range(5, 69))
    lm.generate(prompt, max_new_tokens=4, threshold=1.0)   # warm-up
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(1.0 if busy else 0.0)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                load1 = os.getloadavg()[0]
                r = lm.generate(prompt, max_new_tokens=16, threshold=1.0)
                yield {"policy": _policy(), "busy": busy, "threads": threads, "load1": round(load1, 1),
                       "ms_per_pass": round(r.stats["denoiser_s"] / r.stats["nfe"] * 1e3, 1)}
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    o = sub.add_parser("ops", help="per-op timings at one thread count")
    o.add_argument("threads", type=int)
    e = sub.add_parser("e2e", help="ms per denoiser pass on the width-1/8 random model, 1 vs 2 threads")
    e.add_argument("--checkpoint", default=DEFAULT_CKPT, help="written there first if absent (default: %(default)s)")
    a = ap.parse_args(argv)
    rows = [ops(a.threads)] if a.what == "ops" else e2e(a.checkpoint)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
