"""Peak host memory of loading a checkpoint with each routed-expert format (the streamed quantising loader).

  python -m bench.bench_load_memory [--width 0.25] [--dtype bf16]

Each load runs in a fresh process: RSS after importing twotower_ext and torch, the peak (VmHWM) during tt.load(path, dtype, experts=...) above it, and the bytes the loaded weights hold (QuantizedExperts data +
scales, every other tensor). The models: the shipped one and a random bf16 checkpoint of the real 52-layer
pattern at --width (written once into a temporary directory). A loader that held the unquantised experts
before quantising would peak near the bf16 row; the streamed one peaks near its own weights.
Writes bench/results/load_memory.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from . import harness

COLUMNS = ["model", "checkpoint_MB", "dtype", "experts", "weights_MB", "peak_above_start_MB", "peak/weights",
           "load_s"]

_CHILD = r"""
import json, sys, time
import torch
import twotower_ext as tt
from twotower_ext.quant import QuantizedExperts

def status(key):   # VmRSS now, VmHWM: this process's peak (ru_maxrss would carry the parent's over exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

path, dtype, experts = sys.argv[1], sys.argv[2], (None if sys.argv[3] == "bf16" else sys.argv[3])
start = status("VmRSS")
t0 = time.perf_counter()
lm = tt.load(path, dtype=dtype, experts=experts)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
seen, total = set(), 0
def walk(o):
    global total
    if isinstance(o, torch.Tensor):
        if o.untyped_storage().data_ptr() not in seen:
            seen.add(o.untyped_storage().data_ptr())
            total += o.untyped_storage().nbytes()
    elif isinstance(o, QuantizedExperts):
        walk(o.data); walk(o.scale)
    elif hasattr(o, "__dataclass_fields__"):
        for k in o.__dataclass_fields__:
            walk(getattr(o, k))
    elif isinstance(o, list):
        for v in o:
            walk(v)
walk(lm.model.weights)
print(json.dumps({"start": start, "peak": peak, "weights": total, "seconds": seconds}))
"""


def measure(path: str, dtype: str, experts: str) -> dict:
    p = subprocess.run([sys.executable, "-c", _CHILD, path, dtype, experts], capture_output=True, text=True,
                       timeout=1200)
    if p.returncode:
        raise SystemExit(f"bench_load_memory: the load failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def checkpoint_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_load_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.25, help="random model's width relative to the real one")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", help="results directory (default bench/results)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--allow-busy", action="store_true", help="save even if other processes used the CPU (marked busy)")
    a = ap.parse_args(argv)
    import torch

    import twotower_ext as tt
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = os.path.join(tmp, "random")
        random_checkpoint(big, scaled_config(a.width), seed=0, dtype=torch.bfloat16)
        for name, path in (("shipped", tt.default_model_path()), (f"random real pattern, width {a.width:g}", big)):
            for experts in ("bf16", "fp8", "int4"):
                m = measure(path, a.dtype, experts)
                rows.append({"model": name, "checkpoint_MB": checkpoint_mb(path), "dtype": a.dtype,
                             "experts": experts if experts != "bf16" else f"{a.dtype} (unquantised)",
                             "weights_MB": m["weights"] / 1e6, "peak_above_start_MB": (m["peak"] - m["start"]) / 1e6,
                             "peak/weights": (m["peak"] - m["start"]) / m["weights"], "load_s": m["seconds"]})
                print(rows[-1], file=sys.stderr)
    title = "peak host memory of tt.load per routed-expert format (fresh process each; RSS peak above the start)"
    harness.print_table(title, rows, COLUMNS)
    if not a.no_save:
        out = harness.write_results("load_memory", title, rows, COLUMNS, {"width": a.width}, out_dir=a.out,
                                     allow_busy=a.allow_busy or None)
        print(f"(written to {out}/load_memory.md/.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
