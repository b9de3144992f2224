"""python -m bench.readme [--check]: regenerate the README's benchmark tables from bench/results/*.json.

Every table (and every number in the sentences around it) between a `<!-- bench:NAME -->` and its
`<!-- /bench:NAME -->` marker in README.md is written here from the JSON that `python -m bench` saved, with
the command, machine and load it was taken under; nothing in those sections is typed by hand. --check: exit 1
if the README is not what the JSON gives (for CI or a pre-commit check).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from .harness import _fmt

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")

# Per kernel benchmark: the columns the README shows (a subset of the JSON's: median, rate, limit measured in
# the same run, share of it, baseline and ratio), a line saying what the baseline is, and optionally which rows.
KERNELS = {
    "merge_states": (["dtype", "parts", "rows", "median_us", "GB/s", "copy_GB/s", "%copy", "lean_torch_us", "speedup"],
                     "baseline: the lean PyTorch merge (logsumexp, exp, one weighted sum); limit: a copy of the same bytes"),
    "block_attention": (["heads", "dtype", "path", "B", "ctx_lens", "median_us", "main_us", "vs_main", "vs_fp32",
                         "GFLOP/s", "mm_GFLOP/s", "%mm", "sdpa_us", "vs_sdpa"],
                        "before: main's build (main_us, default path); bf16 rows once per way of multiplying bf16 "
                        "tiles this CPU runs (amx, avx512_bf16 = vdpbf16ps, avx2 = widened to fp32 sgemm); baseline: "
                        "SDPA over the concatenated [context | block] K/V per row; limit: the faster of the same-dtype "
                        "and fp32 matmul of the kernel's tile shape"),
    "mamba_scan": (["model", "dtype", "B", "L", "write", "isa", "median_us", "main_us", "vs_main", "GB/s", "GFLOP/s",
                    "bound_us", "%bound", "torch_us", "speedup"],
                   "before: main's build (main_us); baseline: the faster PyTorch form (token loop or chunked SSD); "
                   "bound: max(bytes / read bandwidth at the row's working set, FLOPs / fp32 matmul rate), both "
                   "measured in the same run"),
    "moe": (["model", "dtype", "T", "experts", "MB", "median_ms", "main_ms", "vs_main", "GB/s", "%read_bw", "loop_ms",
             "vs_loop"],
            "dense weights (quantised rows below); before: main's build (main_ms); baseline: the per-expert "
            "PyTorch loop; limit: a pure read of DRAM-sized memory",
            lambda r: r.get("weights") == r.get("dtype")),
    "threshold_unmask": (["dtype", "B", "V", "T", "median_us", "GB/s", "read_GB/s", "%read", "lean_torch_us", "speedup"],
                         "baseline: NVIDIA's greedy step (T=0) / torch Gumbel-max (T=1); limit: a pure read of the "
                         "same bytes"),
    "lm_head_unmask": (["dtype", "B", "S", "K", "V", "threads", "unfused_ms", "fused_ms", "speedup", "unfused_MB",
                        "fused_MB"],
                       "the denoiser's LM head and commit step: baseline ops.linear + ops.threshold_unmask (the logits "
                       "written and read back), fused ops.lm_head_unmask (no logits in memory; the head's weight read "
                       "once per 32 fp32 / 64 bf16 masked positions); MB: the bytes each must move at least"),
    "prefill": (["dtype", "L", "chunk", "chunked_ms", "GFLOP/s", "%fp32_mm", "op_ms", "speedup"],
                "the chunked SSD prefill (PyTorch matmuls) against the seeded scan op; limit: the fp32 matmul rate"),
    "linear": (["dtype", "threads", "weight", "M", "path", "median_us", "GB/s", "GFLOP/s", "bound_us", "%bound", "F.linear_us",
                "speedup"],
               "baseline: F.linear on the plain weight; limit: max(FLOPs / matmul rate, weight bytes / read rate), "
               "weights cycled through copies larger than the cache"),
}
E2E_COLUMNS = ["model", "mode", "gamma", "rows", "tokens/row_nfe", "tokens/s", "ms/pass", "ms/row_nfe", "pass/ar_step",
               "pytorch_tokens/s", "speedup_vs_pytorch"]
QUALITY_COLUMNS = ["mode", "gamma", "tokens_per_nfe", "tokens_per_s", "speed_vs_ar", "ll", "ll_ratio", "match16",
                   "match_ratio", "agree16", "agree_all", "ar_chain"]


def load(name: str, results: str = RESULTS) -> dict:
    path = os.path.join(results, f"{name}.json")
    with open(path) as f:
        return json.load(f)


def table(rows: list[dict], columns: list[str], source: str) -> str:
    missing = [c for c in columns if not any(c in r for r in rows)]
    if missing:
        raise SystemExit(f"python -m bench.readme: {source} has no column(s) {missing}: rerun the benchmark that "
                         f"writes it (python -m bench ...)")
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def provenance(d: dict) -> str:
    m = d["machine"]
    load_ = d.get("load") or {}
    busy = (f" **Taken on a busy machine** (other processes up to {load_['max_other_cores']:.2f} cores): not for "
            f"comparison." if d.get("busy") else
            (f" Other processes used at most {load_['max_other_cores']:.2f} cores during it."
             if load_.get("max_other_cores") is not None else ""))
    return f"`{m['command']}` on {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}.{busy}"


def kernels_section(results: str, device: str = "cpu") -> str:
    parts = []
    for name, (cols, note, *keep) in KERNELS.items():
        try:
            d = load(f"{name}-{device}", results)
        except FileNotFoundError:
            continue
        rows = [r for r in d["rows"] if not keep or keep[0](r)]
        parts.append(f"**{name}** ({note}). {provenance(d)}\n\n{table(rows, cols, name)}")
    return "\n\n".join(parts)


def e2e_section(results: str, device: str = "cpu") -> str:
    d = load(f"e2e-{device}", results)
    rows = d["rows"]
    text = [provenance(d), "", table(rows, E2E_COLUMNS, "e2e"), ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        ratios = [r["pass/ar_step"] for r in rows if r["model"] == model and isinstance(r.get("pass/ar_step"), float)]
        if ratios:
            span = f"{min(ratios):.2f}" + (f"-{max(ratios):.2f}" if f"{max(ratios):.2f}" != f"{min(ratios):.2f}" else "")
            text.append(f"- {model}: a denoiser pass costs {span} AR steps, so diffusion beats AR on wall clock where "
                        f"it commits more than that many tokens per pass.")
    return "\n".join(text)


def quality_section(results: str) -> str:
    d = load("quality", results)
    return f"{provenance(d)}\n\n{table(d['rows'], QUALITY_COLUMNS, 'quality')}"


QUANT_SPEED_COLUMNS = ["weights", "T", "experts", "MB", "median_ms", "GB/s", "%copy_bw", "vs_bf16"]
QUANT_QUALITY_COLUMNS = ["model", "experts", "mode", "first_div_mean", "first_div_median", "identical", "ll_ratio",
                         "top1_tf", "kl", "tokens_per_nfe"]
LOAD_MEMORY_COLUMNS = ["model", "checkpoint_MB", "experts", "weights_MB", "peak_above_start_MB", "peak/weights"]


def _optional(name: str, results: str, command: str):
    try:
        return load(name, results), None
    except FileNotFoundError:
        return None, f"(no results yet: run `{command}`)"


def memory_section(results: str) -> str:
    """The real config's memory per expert format: computed (twotower_ext.analysis.memory), not measured."""
    from twotower_ext.analysis.memory import format_memory_table, memory_rows, reserve_note
    from twotower_ext.models.config import NemotronHConfig
    from twotower_ext.models.config import REAL_CONFIG

    del results
    return (f"`twotower info --real-config` (bf16 model):\n\n"
            f"{format_memory_table(memory_rows(NemotronHConfig.from_dict(REAL_CONFIG)))}\n\n{reserve_note()}.")


def quant_speed_section(results: str, device: str = "cpu") -> str:
    d, missing = _optional(f"moe-{device}", results, "python -m bench moe")
    if d is None:
        return missing
    rows = [r for r in d["rows"] if r.get("model", "real") == "real" and r.get("dtype") == "bfloat16"
            and r.get("T") in (1, 16)]
    return f"{provenance(d)}\n\n{table(rows, QUANT_SPEED_COLUMNS, 'moe')}"


def quant_quality_section(results: str) -> str:
    d, missing = _optional("quant_quality", results, "python -m bench.bench_quant_quality")
    if d is None:
        return missing
    text = [provenance(d), "", table(d["rows"], QUANT_QUALITY_COLUMNS, "quant_quality")]
    lm, ld = _optional("load_memory", results, "python -m bench.bench_load_memory")
    text += ["", "Peak host memory while loading (`python -m bench.bench_load_memory`, a fresh process per load, bf16):",
             "", ld or table(lm["rows"], LOAD_MEMORY_COLUMNS, "load_memory")]
    return "\n".join(text)


PASSES_COLUMNS = ["pass", "dtype", "threads", "before ms", "before %bound", "F.linear ms", "loop ms", "4K pages ms",
                  "ms", "%bound", "vs F.linear", "vs loop", "vs 4K pages", "bound ms", "bound"]


def passes_section(results: str, device: str = "cpu") -> str:
    """Each pass against its bound: the model as loaded (ms: packed linears, the layers as one op, the weights in huge
    pages), the same run with the weights in 4 KB pages (4K pages ms), then also the layers in the Python loop (loop
    ms), then also plain linears (F.linear ms), and the run on the code before the packed linears (passes_before);
    then the op profile of one denoiser pass, before and now."""
    after, missing = _optional(f"passes-{device}", results, "python -m bench passes")
    if after is None:
        return missing
    before, _ = _optional(f"passes_before-{device}", results, "python -m bench.bench_passes --before")
    key = lambda r: (r["pass"], r["dtype"], r["threads"])  # noqa: E731
    old = {key(r): r for r in before["rows"]} if before else {}
    plain = {key(r): r for r in after["rows"] if r.get("linears") == "F.linear"}
    loop = {key(r): r for r in after["rows"] if r.get("linears") == "packed" and r.get("layers") == "Python"}
    main: dict = {}   # the first packed + op row of each key: the model as loaded
    for r in after["rows"]:
        if r.get("linears", "packed") == "packed" and r.get("layers", "op") == "op":
            main.setdefault(key(r), r)
    small = {key(r): r for r in after["rows"] if r.get("linears") == "packed" and r.get("layers") == "op"
             and r.get("pages") == "4K" and r is not main[key(r)]}
    rows = []
    for r in main.values():
        b, f, lp, sp = old.get(key(r), {}), plain.get(key(r), {}), loop.get(key(r), {}), small.get(key(r), {})
        rows.append({**r, "before ms": b.get("ms", ""), "before %bound": b.get("%bound", ""),
                     "F.linear ms": f.get("ms", ""), "loop ms": lp.get("ms", ""), "4K pages ms": sp.get("ms", ""),
                     "vs F.linear": f["ms"] / r["ms"] if f else "", "vs loop": lp["ms"] / r["ms"] if lp else "",
                     "vs 4K pages": sp["ms"] / r["ms"] if sp else "", "bound ms": r["bound_ms"]})
    text = [f"Now: {provenance(after)}"] + ([f"Before: {provenance(before)}"] if before else [])
    text += ["", table(rows, PASSES_COLUMNS, "passes")]
    for dtype, ops in after.get("profile", {}).items():
        prev = (before or {}).get("profile", {}).get(dtype, [])
        prof = [{"before: op": b.get("op", ""), "ms ": b.get("self_ms", ""), "now: op": a.get("op", ""),
                 "ms": a.get("self_ms", "")} for a, b in zip(ops, prev + [{}] * len(ops))]
        text += ["", f"One denoiser pass, {dtype}, 1 thread: the ops by self time (torch.profiler, profiled run):", "",
                 table(prof, ["before: op", "ms ", "now: op", "ms"], "passes profile")]
    return "\n".join(text)


PREFIX_COLUMNS = ["model", "workload", "mode", "cache", "requests", "prompt_tokens", "hit_%", "ttft_p50_s",
                  "ttft_p99_s", "tokens/s", "p50_speedup", "same_output"]


def prefix_section(results: str, device: str = "cpu") -> str:
    """`python -m bench prefix`: time to the first token / block with the prefix cache off and on."""
    d, missing = _optional(f"prefix-{device}", results, "python -m bench prefix")
    if d is None:
        return missing
    threads = ", ".join(map(str, sorted({r["threads"] for r in d["rows"]})))
    faster = [f"- {r['model']}, {r['workload']}, {r['mode']}: p50 time to the first "
              f"{'token' if r['mode'] == 'ar' else 'block'} {r['p50_speedup']:.1f}x lower with the cache."
              for r in d["rows"] if r["cache"] == "on"]
    return "\n".join([f"{provenance(d)} Torch threads during the runs: {threads}.", "",
                      table(d["rows"], PREFIX_COLUMNS, "prefix"), "", *faster])


def demo_section(results: str) -> str:
    """What `twotower generate --prompt "def "` prints with the shipped model (bench/bench_demo.py), described
    from its numbers: the first line, how much one phrase repeats, tokens per pass next to the quality table's."""
    d, missing = _optional("demo-cpu", results, "python -m bench demo")
    if d is None:
        return missing
    r = d["rows"][0]
    lines = r["text"].splitlines()
    shown = "\n".join(lines[:4]) + (f"\n... ({len(lines) - 4} more lines of the same)" if len(lines) > 4 else "")
    repeats = (f"then falls into repeating `{r['top_phrase'].strip()}`: that phrase covers {r['top_phrase_share']:.0%} of "
               f"the {r['tokens']} tokens, and only {r['distinct_4grams']:.0%} of their token 4-grams are distinct"
               if r["top_phrase_share"] >= 0.25 else
               f"and no phrase dominates (the most repeated, `{r['top_phrase'].strip()}`, covers "
               f"{r['top_phrase_share']:.0%} of the {r['tokens']} tokens)")
    text = [f"{provenance(d)}", "", "```", f"$ twotower generate --prompt {r['prompt']!r}", shown, "```",
            f"The shipped model (\"The shipped model\" below says what it is and how it was trained) writes "
            f"`{r['first_line']}` and {repeats}. It took {r['nfe']} denoiser passes: {r['tokens/nfe']:.2f} tokens per "
            f"pass at gamma {r['threshold']} on this one prompt."]
    q, _ = _optional("quality", results, "python -m bench.bench_quality")
    row = next((x for x in (q or {}).get("rows", []) if x.get("mode") == "diffusion" and x.get("gamma") == r["threshold"]),
               None)
    if row is not None:
        text[-1] += (f" Over 32 held-out prompts x 64 tokens the same setting averages {row['tokens_per_nfe']:.2f} "
                     f"(the quality table in \"The shipped model\"): that is the figure to compare.")
    return "\n".join(text)


SOAK_COLUMNS = ["kind", "requests", "finished", "cancelled", "4xx", "unexpected", "p50_s", "p99_s", "first_event_p50_s"]


def soak_section(results: str) -> str:
    """`python -m bench soak`: every request accounted for, rows, RSS, latency (bench/bench_soak.py)."""
    d, missing = _optional("soak-cpu", results, "python -m bench soak")
    if d is None:
        return missing
    rows = d["rows"]
    a = rows[-1]
    return (f"{provenance(d)}\n\n{table(rows, SOAK_COLUMNS, 'soak')}\n\n"
            f"{a['requests']} requests in {a['duration_s']:.0f} s ({a['tokens/s']:.0f} generated tokens/s), every one "
            f"accounted for by the clients and, in its `request_success_total`, by the server; /health's live_rows "
            f"after the run: {a['live_rows_after']}. Server RSS: {a['rss_start_MB']:.0f} MB after loading, "
            f"{a['rss_warm_MB']:.0f} MB after warm-up (the first 10 % of the requests), {a['rss_end_MB']:.0f} MB at "
            f"the end.")


SCALE_COLUMNS = ["run", "router", "max_imbalance", "replicas", "threads", "tokens/s", "vs_1x1", "%linear", "p50_s", "replica_cores",
                 "ray_cores", "hit_prev", "hit_any", "replicas/prefix"]


def scale_section(results: str, device: str = "cpu") -> str:
    d, missing = _optional(f"scale-{device}", results, "python -m bench scale")
    if d is None:
        return missing
    rows = d["rows"]
    text = [provenance(d), "", table(rows, SCALE_COLUMNS, "scale"), ""]
    two = next((r for r in rows if r["run"] == "throughput" and r["replicas"] == 2), None)
    if two is not None:
        text.append(f"- 2 replicas x 1 thread: {two['vs_1x1']:.2f}x one replica's tokens/s ({two['%linear']:.0f}% of "
                    f"linear scaling); the replicas used {two['replica_cores']:.2f} cores and Ray's proxy, ingress "
                    f"and router {two['ray_cores']:.2f}, of the machine's 2.")
    for r in rows:
        if r["run"] == "shared prefixes":
            bound = f" (bound {r['max_imbalance']})" if r.get("max_imbalance") != "" else ""
            text.append(f"- {r['router']}{bound}: {r['hit_prev']:.0%} of the shared-prefix requests on the replica of "
                        f"their prefix's previous request, {r['replicas/prefix']:.2f} replicas per prefix.")
    return "\n".join(text)


SERVE_COLUMNS = ["model", "mode", "concurrency", "requests", "tokens/s", "p50_s", "p99_s", "ttfb_p50_s", "tokens/nfe",
                 "rows/pass", "static_batch_tokens/s"]


def serve_section(results: str, device: str = "cpu") -> str:
    """`python -m bench serve`: closed-loop clients against the same requests as one static `generate` batch."""
    d, missing = _optional(f"serve-{device}", results, "python -m bench serve")
    if d is None:
        return missing
    return f"{provenance(d)}\n\n{table(d['rows'], SERVE_COLUMNS, 'serve')}"


CORE_COLUMNS = ["part", "model", "mode", "rows", "measure", "value", "reference", "ratio", "goal"]


def core_section(results: str, device: str = "cpu") -> str:
    """`python -m bench core --baseline ...`: (a) mixed parameters, (b) host time per iteration, (c) vs the static
    batch and the old engine; then which goals the run met."""
    d, missing = _optional(f"core-{device}", results, "python -m bench core --baseline TREE:LIB")
    if d is None:
        return missing
    rows = d["rows"]
    text = [provenance(d), "", table(rows, CORE_COLUMNS, "core"), ""]
    for measure in dict.fromkeys(r["measure"] for r in rows if r.get("goal")):
        sel = [r for r in rows if r["measure"] == measure and r.get("goal")]
        goal = sel[0]["goal"]
        op, bound = goal.split()
        ok = [r for r in sel if (r["ratio"] <= float(bound) if op == "<=" else r["ratio"] >= float(bound))]
        lo, hi = min(r["ratio"] for r in sel), max(r["ratio"] for r in sel)
        text.append(f"- {measure}: {len(ok)} of {len(sel)} rows meet {goal} (ratios {lo:.2f}-{hi:.2f}).")
    return "\n".join(text)


SECTIONS = {"kernels-cpu": kernels_section, "passes-cpu": passes_section, "e2e-cpu": e2e_section,
            "quality": quality_section, "memory": memory_section, "quant-speed-cpu": quant_speed_section,
            "quant-quality": quant_quality_section, "demo": demo_section, "soak-cpu": soak_section,
            "scale-cpu": scale_section, "prefix-cpu": prefix_section, "core-cpu": core_section,
            "serve-cpu": serve_section}


def render(text: str, results: str = RESULTS) -> str:
    """text with every benchmark section rewritten from the JSON in `results`."""
    for name, fn in SECTIONS.items():
        pat = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /bench:{re.escape(name)} -->)", re.S)
        if not pat.search(text):
            raise SystemExit(f"python -m bench.readme: README.md has no <!-- bench:{name} --> section")
        body = fn(results)
        text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from what the JSON gives")
    args = ap.parse_args(argv)
    with open(README) as f:
        old = f.read()
    new = render(old)
    if args.check:
        if new != old:
            print("python -m bench.readme: README.md's benchmark sections are stale; run python -m bench.readme",
                  file=sys.stderr)
            return 1
        return 0
    with open(README, "w") as f:
        f.write(new)
    print(f"README.md: {len(SECTIONS)} benchmark sections regenerated from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
