"""python -m bench [names...] [--device cpu|cuda] [--quick] [--no-save]

Runs the named microbenchmarks (all by default), prints markdown tables and writes
bench/results/<name>-<device>.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {"merge_states": "bench_merge_states", "mamba_scan": "bench_mamba_scan",
           "block_attention": "bench_block_attention", "threshold_unmask": "bench_threshold_unmask", "e2e": "bench_e2e",
           "prefill": "bench_prefill", "moe": "bench_moe", "serve": "bench_serve",
           "roofline": "bench_roofline"}   # roofline: each pass measured vs the cost model's prediction


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", choices=[[], *BENCHES], help="benchmarks to run (default: all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one shape each (smoke run)")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    from . import harness

    for name in args.names or list(BENCHES):
        mod = importlib.import_module(f".{BENCHES[name]}", __package__)
        rows = mod.run(args.device, quick=args.quick)
        if not args.no_save:
            out = harness.write_results(f"{name}-{args.device}", f"{name} on {args.device}", rows, mod.COLUMNS)
            print(f"(written to {out}/{name}-{args.device}.md/.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
