"""python -m bench [names...] [--device cpu|cuda] [--quick] [--no-save] [--allow-busy] [--baseline installed|TREE:LIB]

Runs the named microbenchmarks (all by default), prints markdown tables and writes
bench/results/<name>-<device>.{md,json}, unless other processes kept the CPU busy during a timing (then
nothing is saved: rerun on a quiet machine, or --allow-busy to save results marked busy).
`python -m bench.readme` then regenerates the README's benchmark tables from those JSON files. --baseline: the
benchmarks that support it (mamba_scan, moe, block_attention, core) also time the same calls on another build of the
package (`installed`: the one installed in this interpreter, e.g. main's wheel; or a source tree and its built
_C*.so) in the same run, as the "main_*" / "vs_main" columns (harness.run_in_baseline).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

BENCHES = {"merge_states": "bench_merge_states", "mamba_scan": "bench_mamba_scan",
           "block_attention": "bench_block_attention", "threshold_unmask": "bench_threshold_unmask", "e2e": "bench_e2e",
           "prefill": "bench_prefill", "moe": "bench_moe", "linear": "bench_linear", "serve": "bench_serve",
           "roofline": "bench_roofline",   # roofline: each pass measured vs the cost model's prediction
           "passes": "bench_passes",       # passes: each CPU pass vs max(FLOPs / matmul rate, bytes / read rate)
           "soak": "bench_soak",           # soak: a `twotower serve` subprocess under load, disconnects, bad input
           "demo": "bench_demo",           # demo: what `twotower generate --prompt "def "` prints (README)
           "scale": "bench_scale",         # scale: replicas on Ray Serve (needs the ray extra)
           "prefix": "bench_prefix",       # prefix: time to the first token with the prefix cache off / on
           "core": "bench_core",           # core: the decode core's per-row parameters, host time, vs the old engine
           "lm_head_unmask": "bench_lm_head_unmask"}   # the denoiser's LM head + commit: unfused vs fused


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", choices=[[], *BENCHES], help="benchmarks to run (default: all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="one shape each (smoke run)")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results")
    ap.add_argument("--allow-busy", action="store_true",
                    help="save results even if other processes used the CPU during a timing (marked busy)")
    ap.add_argument("--baseline", metavar="installed|TREE:LIB",
                    help="also time the kernels on this build of the package (before / after in one run)")
    args = ap.parse_args(argv)
    import torch

    from . import harness

    if args.baseline:
        os.environ[harness.BASELINE_ENV] = args.baseline
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2

    refused = 0
    for name in args.names or list(BENCHES):
        mod = importlib.import_module(f".{BENCHES[name]}", __package__)
        start = len(harness.TIMINGS)
        rows = mod.run(args.device, quick=args.quick)
        if not rows:   # nothing measured (a benchmark whose optional dependency is missing says so itself)
            continue
        if not args.no_save:
            try:
                out = harness.write_results(f"{name}-{args.device}", f"{name} on {args.device}", rows,
                                            mod.COLUMNS, extra=getattr(mod, "EXTRA", None),
                                            allow_busy=args.allow_busy or None, timings=harness.TIMINGS[start:])
            except harness.BusyMachineError as e:
                print(f"python -m bench: {e}", file=sys.stderr)
                refused += 1
                continue
            print(f"(written to {out}/{name}-{args.device}.md/.json)")
    return 3 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
