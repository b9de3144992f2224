"""End to end: diffusion vs AR on the same engine, over a gamma sweep.

Models: the parity checkpoint (fp32) and a random-weight model of the real 52-layer pattern at reduced
width on CPU; on a GPU also the real widths (fewer layers, bf16). Every row: tokens generated, forward
passes (`passes`: batched denoiser passes, or batched AR steps, each over all live rows) and row-NFEs
(`row_nfe`: passes counted once per row they served, the engine's `nfe`), tokens per row-NFE, tokens/s
(generated tokens only, warmed, median over `reps` runs), ms per pass and, labelled separately, ms per
row-NFE; and as the baseline the same decode with every op on its plain-PyTorch reference
(`ops.use_reference`), timed the same way (warmed, median of the same number of runs).

AR step time = (context time of the run - context time of a 1-token run, i.e. the prefill) / (passes - 1).
The summary's "pass / AR step" time ratio is what decides the wall-clock speed-up:
speed-up over AR = tokens per pass / (pass time / AR step time).
"""
from __future__ import annotations

import os
import statistics
import tempfile

import torch

from . import harness

COLUMNS = ["model", "mode", "gamma", "rows", "tokens", "passes", "row_nfe", "tokens/row_nfe", "tokens/s",
           "ms/pass", "ms/row_nfe", "pytorch_tokens/s", "speedup_vs_pytorch", "pass/ar_step", "other_cores", "load1"]
GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95)
PARITY = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "parity", "checkpoint")


def _models(device: str, quick: bool):
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    tmp = tempfile.mkdtemp(prefix="tt-bench-")
    yield "parity (fp32)", PARITY, torch.float32, [[1, 501, 95, 276, 159], [1, 97, 303, 453, 268, 317, 91, 58]]
    if quick:
        return
    cfg = scaled_config(width=0.125, vocab=8192)
    yield ("real pattern, width 1/8 (fp32)", random_checkpoint(os.path.join(tmp, "w8"), cfg, seed=1),
           torch.float32, [[1] + list(range(10, 60))])
    if device == "cuda":
        cfg = scaled_config(width=1.0, layers=13)
        yield ("real widths, 13 layers (bf16)", random_checkpoint(os.path.join(tmp, "real13"), cfg, seed=2,
                                                                  dtype=torch.bfloat16),
               torch.bfloat16, [[1] + list(range(100, 1100))])


def _measure(lm, prompts, reps: int, **kw) -> dict:
    """Warm once, then `reps` runs: median tokens/s and time per pass (denoiser passes, or AR steps without
    the prefill), the run's pass and row-NFE counts, and the Timing of the whole runs (machine load)."""
    lm.generate(prompts, **kw)  # warm (allocations, graph capture)
    runs = []
    timing = harness.time_calls(lambda: runs.append(lm.generate(prompts, **kw)), reps)
    s = runs[0].stats
    ar = kw["mode"] != "diffusion"
    if ar:   # rows leave at EOS: the batched steps are the longest row's tokens; prefill timed on its own
        passes = max(len(t) for t in runs[0].new_tokens)
        one = [lm.generate(prompts, **{**kw, "max_new_tokens": 1}).stats["context_s"] for _ in range(reps)]
        busy = [(r.stats["context_s"] - statistics.median(one)) / max(1, passes - 1) for r in runs]
    else:
        passes = s["executed_passes"]
        busy = [r.stats["denoiser_s"] / max(1, passes) for r in runs]
    return {"stats": s, "passes": passes, "tps": statistics.median(r.stats["tokens"] / r.stats["seconds"] for r in runs),
            "ms_pass": statistics.median(busy) * 1e3, "ms_row_nfe": statistics.median(busy) * 1e3 * passes / max(1, s["nfe"]),
            "timing": timing}


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext import ops

    rows = []
    reps = 2 if quick else 3
    new = 32 if quick else 64
    for name, path, dtype, prompts in _models(device, quick):
        lm = tt.load(path, device=device, dtype=dtype)
        ar_ms = None
        for mode, gamma in [("ar", None)] + [("diffusion", g) for g in (GAMMAS if not quick else (0.8,))]:
            kw = dict(mode=mode, max_new_tokens=new, eos_token_id=None)
            if gamma is not None:
                kw["threshold"] = gamma
            m = _measure(lm, prompts, reps, **kw)
            old = ops.use_reference(True)
            try:
                base = _measure(lm, prompts, reps, **kw)
            finally:
                ops.use_reference(old)
            if mode == "ar":
                ar_ms = m["ms_pass"]
            s = m["stats"]
            rows.append({"model": name, "mode": mode, "gamma": gamma if gamma is not None else "-", "rows": len(prompts),
                         "tokens": s["tokens"], "passes": m["passes"], "row_nfe": s["nfe"],
                         "tokens/row_nfe": s["tokens_per_nfe"], "tokens/s": m["tps"], "ms/pass": m["ms_pass"],
                         "ms/row_nfe": m["ms_row_nfe"], "pytorch_tokens/s": base["tps"],
                         "speedup_vs_pytorch": m["tps"] / base["tps"],
                         "pass/ar_step": m["ms_pass"] / ar_ms if mode == "diffusion" else "-",
                         **harness.load_fields(m["timing"], base["timing"])})
    harness.print_table(f"end to end on {device}: diffusion (gamma sweep) vs AR, {new} new tokens per row "
                        f"(ms/pass: per batched forward pass; ms/row_nfe: per pass per row it served)", rows, COLUMNS)
    _plot(rows, device)
    return rows


def _plot(rows, device):
    plt = harness.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        d = [r for r in rows if r["model"] == model and r["mode"] == "diffusion"]
        ar = next(r for r in rows if r["model"] == model and r["mode"] == "ar")
        g = [r["gamma"] for r in d]
        a.plot(g, [r["tokens/row_nfe"] for r in d], "o-", label=model)
        line = b.plot(g, [r["tokens/s"] for r in d], "o-", label=model)[0]
        b.axhline(ar["tokens/s"], color=line.get_color(), ls="--", lw=1)
    a.set(xlabel="gamma", ylabel="tokens per NFE", title="tokens per denoiser pass")
    b.set(xlabel="gamma", ylabel="tokens/s", title="throughput (dashed: AR)")
    a.legend(fontsize=7)
    out = os.path.join(os.path.dirname(__file__), "results", f"e2e-{device}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"(plot: {out})")
