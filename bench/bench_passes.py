"""Each CPU pass next to its roofline: ms per denoiser pass, AR step and block extension on the width-1/8
real-pattern random model (hidden 320, 52 layers, 128 experts top-6, vocab 131072; written once as a bf16
checkpoint, see `checkpoint`), batch 1 after a 100-token context, at 1 and 2 threads, fp32 and bf16. The
denoiser pass is timed as the engine runs it (`model.denoise_commit`: the layers, then the LM head fused with the
commit step, ops.lm_head_unmask), on a block with every other position masked.

The bound of a pass is max(FLOPs / matmul rate, weight bytes / read rate), both rates measured in this run at
the row's thread count (the best of 3 measurements each): the matmul rate by a 1024^3 matmul in the row's dtype, the
read rate by a pure read of 256 MB (bench/harness.py) from 2 MB pages where the weights live in them
(twotower_ext.hugepages; `read_pages`). FLOPs: every matmul (experts k per token), attention and the
Mamba scan, counted by `twotower_ext.analysis.costmodel`; weight bytes: the tower's dense weights, the LM head when the
pass has logits, and the routed experts the pass touched (counted on the device around the router, as bench_roofline does).
`%bound` = bound / measured. Each pass is timed on four variants of the model, each removing one more change:
the model as loaded (`linears` packed, `layers` op: the tower's layers as one op, ops.tower_layers; `pages` 2M: the
weights in huge pages); the same checkpoint loaded again into torch's memory (`pages` 4K, TWOTOWER_HUGEPAGES=0); that
model with its layers in the Python loop of models/towers.py (`layers` Python, tower_op off); and that model with its
linears unpacked into plain tensors (`linears` F.linear: what the model ran before the packed linears; the LM head then
unfused, F.linear and threshold_unmask). The first three are timed in turn, pass by pass, three rounds each
(harness.time_cpu_interleaved), so the machine's drift within a run moves them alike. The profile of one denoiser pass
(the model as loaded, 1 thread, torch.profiler, ops by self time) goes into the results beside the table.

  python -m bench passes                  # results/passes-cpu.{md,json}
  python -m bench.bench_passes --before   # results/passes_before-cpu.{md,json}: run on the code before a change,
                                          # which `python -m bench.readme` puts next to the current numbers
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile

import torch

from . import harness
from .bench_roofline import expert_tally

COLUMNS = ["pass", "dtype", "linears", "layers", "pages", "threads", "ms", "spread_us", "GFLOP", "weight_MB",
           "experts/layer", "matmul_GFLOP/s", "read_GB/s", "read_pages", "bound_ms", "bound", "%bound", "other_cores",
           "load1"]
PASSES = ("denoiser pass (16 tokens)", "AR step", "block extension (16 tokens)")
CTX = 100
BLOCK = 16
PROFILE_TOP = 10
EXTRA: dict = {}   # the profiles, saved beside the rows (bench/__main__.py passes it to write_results)


def checkpoint(path: str | None = None) -> str:
    """The width-1/8 real-pattern random checkpoint with 128 experts (bf16), written into `path` (default:
    <tmp>/twotower_w8e128) unless a complete one is there already (config.json is written last)."""
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    path = path or os.path.join(tempfile.gettempdir(), "twotower_w8e128")
    if not os.path.exists(os.path.join(path, "config.json")):
        random_checkpoint(path, scaled_config(width=1 / 8, n_routed_experts=128), seed=1, dtype=torch.bfloat16)
    return path


def _passes(model, cfg):
    """{label: (fn, cost key, tokens in the pass)} on a cache holding CTX tokens; the AR step and the extension
    reset the length after each call so every call sees the same context."""
    from twotower_ext.runtime.params import DecodeParams

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, cfg.vocab_size, (1, CTX), generator=g)
    cache = model.new_cache(1, CTX + BLOCK + 1)
    model.prefill(prompt, cache, logits=False)

    def reset():
        cache.lens.fill_(CTX)
        cache.lens_host[:] = [CTX]

    block = torch.randint(4, cfg.vocab_size, (1, BLOCK), generator=g)
    mask = DecodeParams.mask_token_id
    half = torch.where(torch.arange(BLOCK) % 2 == 0, block, torch.full_like(block, mask))   # a typical later pass

    def denoise_commit():   # as the engine runs it: the pass, the LM head and the commit step (on a copy of x)
        model.denoise_commit(half.clone(), cache, 0.5, mask_id=mask, gamma=0.8, step=0, steps_per_block=BLOCK)

    return {PASSES[0]: (denoise_commit, "nfe"),
            PASSES[1]: (lambda: (model.decode(block[:, 0], cache), reset()), "ar_step"),
            PASSES[2]: (lambda: (model.extend(block, cache), reset()), "extension")}


def _weight_bytes(est: dict, key: str, touched: float) -> float:
    """The pass's weight bytes with the routed experts it touched (the cost model assumes uniform routing)."""
    parts = est[f"{key}_parts"]
    expected = est[f"distinct_experts_{key}"]
    experts = parts["experts"] * touched / expected if expected else 0.0
    return parts["weights"] + parts["embeddings"] + parts["lm_head"] + experts


def unpack_linears(obj) -> None:
    """Every packed linear weight in a weights dataclass tree replaced by its plain tensor (ops.linear is then
    F.linear)."""
    from twotower_ext import packed

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, packed.PackedLinear):
            setattr(obj, f.name, packed.unpack(v))
        elif dataclasses.is_dataclass(v):
            unpack_linears(v)
        elif isinstance(v, list):
            for item in v:
                unpack_linears(item)


def _profile(fn) -> list[dict]:
    """The ops of one call of fn by self CPU time (torch.profiler), the top PROFILE_TOP."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "%": 100 * e.self_cpu_time_total / total} for e in events[:PROFILE_TOP]]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext.analysis import costmodel

    if device != "cpu":
        raise SystemExit("bench passes: CPU only (the GPU passes are in bench roofline)")
    path = checkpoint()
    threads_before = torch.get_num_threads()
    rows, EXTRA["profile"] = [], {}
    read_huge = _huge_pages()   # every row's bound takes the huge-page read rate where the model's weights have them
    threads = (1,) if quick else (1, 2)
    budget = 0.3 if quick else 1.0   # seconds of timing per pass and variant
    for dtype in (torch.float32, torch.bfloat16):
        lm = tt.load(path, dtype=dtype, threads=0)
        model, cfg = lm.model, lm.config
        del lm
        dname = str(dtype).removeprefix("torch.")
        est = costmodel.estimate(cfg, 1, CTX, BLOCK, torch.finfo(dtype).bits // 8)
        passes = _passes(model, cfg)
        torch.set_num_threads(1)
        EXTRA["profile"][dname] = _profile(passes[PASSES[0]][0])
        packs = type(model.weights.denoiser.lm_head).__name__ == "PackedLinear"   # not on the code before them
        loops = hasattr(model, "tower_op")                                         # likewise
        # Each variant removes one change: the weights' huge pages (the same checkpoint loaded again into torch's
        # memory), the layers as one op, the packed linears. All but F.linear are timed in turn, pass by pass
        # (harness.time_cpu_interleaved): they differ by 5-40%, as much as the machine drifts within a run.
        small, small_passes = model, passes
        variants = []
        if packs and loops:
            variants.append(("packed", "op", "2M" if read_huge else "4K", model, passes))
            if read_huge:
                small = _load_small_pages(path, dtype)
                small_passes = _passes(small, cfg)
                variants.append(("packed", "op", "4K", small, small_passes))
        if packs:
            variants.append(("packed", "Python", "4K", small, small_passes))
        if variants:
            rows += _time_passes(variants, dtype, read_huge, est, cfg, threads, budget)
        if packs:
            unpack_linears(small.weights)
        rows += _time_passes([("F.linear", "Python", "4K", small, small_passes)], dtype, read_huge, est, cfg, threads,
                             budget)
        del model, passes, small, small_passes, variants
        gc.collect()
    torch.set_num_threads(threads_before)
    harness.print_table("each pass next to its bound (width-1/8 real pattern, 128 experts, vocab 131072, batch 1, "
                        f"context {CTX})", rows, COLUMNS)
    for dname, ops in EXTRA["profile"].items():
        harness.print_table(f"one denoiser pass, {dname}, 1 thread: ops by self time", ops,
                            ["op", "calls", "self_ms", "%"])
    return rows


def _huge_pages() -> bool:
    """Whether the weights live in huge pages (twotower_ext.hugepages): the read rate of the bound is then measured
    on huge pages too, the faster limit (1.4x on the 2-core Xeon VM). False on code from before that module."""
    try:
        from twotower_ext import hugepages
    except ImportError:
        return False
    return hugepages.enabled()


def _load_small_pages(path: str, dtype: torch.dtype):
    """The model loaded again with its weights in torch's memory (TWOTOWER_HUGEPAGES=0: 4 KB pages)."""
    import twotower_ext as tt

    before = os.environ.get("TWOTOWER_HUGEPAGES")
    os.environ["TWOTOWER_HUGEPAGES"] = "0"
    try:
        return tt.load(path, dtype=dtype, threads=0).model
    finally:
        if before is None:
            del os.environ["TWOTOWER_HUGEPAGES"]
        else:
            os.environ["TWOTOWER_HUGEPAGES"] = before


def _time_passes(variants, dtype, read_huge: bool, est: dict, cfg, thread_counts, budget_s: float) -> list[dict]:
    """One row per (threads, pass, variant): its median time next to its bound, both rates measured now (the read
    rate on huge pages if read_huge). variants: (linears, layers, pages, model, passes), timed in turn."""
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        # the best of 3 of each rate, as the other benchmarks take their limits (harness.best_of): at 2 threads a
        # single read measurement moved between 24 and 36 GB/s within an hour on the 2-core VM
        mm = harness.best_of(harness.measure_matmul_rate, 1024, 1024, 1024, dtype) * 1e12
        read = harness.best_of(harness.measure_read_bandwidth, huge_pages=read_huge) * 1e9
        for label in PASSES:
            fns = [_with_layers(model, layers, passes[label][0]) for _, layers, _, model, passes in variants]
            timings = harness.time_cpu_interleaved(fns, budget_s=budget_s * len(fns))
            for (linears, layers, pages, model, passes), t in zip(variants, timings):
                key = passes[label][1]
                with expert_tally(cfg.n_routed_experts, model) as counts:
                    passes[label][0]()
                touched = torch.stack(counts).double().mean().item()
                flops, wbytes = est[f"{key}_flops"], _weight_bytes(est, key, touched)
                compute, memory = flops / mm, wbytes / read
                bound = max(compute, memory)
                rows.append({"pass": label, "dtype": str(dtype).removeprefix("torch."), "linears": linears,
                             "layers": layers, "pages": pages, "threads": threads, "ms": t.median_s * 1e3,
                             "spread_us": t.spread, "GFLOP": flops / 1e9, "weight_MB": wbytes / 1e6,
                             "experts/layer": touched, "matmul_GFLOP/s": mm / 1e9, "read_GB/s": read / 1e9,
                             "read_pages": "2M" if read_huge else "4K", "bound_ms": bound * 1e3,
                             "bound": "compute" if compute >= memory else "memory", "%bound": 100 * bound / t.median_s,
                             **harness.load_fields(t)})
    return rows


def _with_layers(model, layers: str, fn):
    """fn with the model's layers set to run as one op ("op") or in the Python loop first (on code with the op)."""
    if not hasattr(model, "tower_op"):
        return fn
    op = layers == "op"

    def call():
        model.tower_op = op
        fn()
    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_passes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", action="store_true",
                    help="save as results/passes_before-cpu (the numbers of the code before a change)")
    ap.add_argument("--allow-busy", action="store_true", help="save even if other processes used the CPU")
    a = ap.parse_args(argv)
    rows = run()
    name = "passes_before-cpu" if a.before else "passes-cpu"
    try:
        harness.write_results(name, f"passes on cpu{' (before)' if a.before else ''}", rows, COLUMNS, extra=EXTRA,
                              allow_busy=a.allow_busy or None)
    except harness.BusyMachineError as e:
        print(f"python -m bench.bench_passes: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
