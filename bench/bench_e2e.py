"""End to end: diffusion vs AR on the same engine, per token and per NFE, over a gamma sweep.

Models: the parity checkpoint (fp32) and a random-weight model of the real 52-layer pattern at reduced
width on CPU; on a GPU also the real widths (fewer layers, bf16). Every row: tokens generated, NFE,
tokens/NFE, tokens/s (generated tokens only, warmed, median over repeats), ms per denoiser NFE and per AR
step, and the same decode with every op on its plain-PyTorch reference (`ops.use_reference`) as the
baseline. The summary's "NFE / AR step" time ratio is what decides the wall-clock speed-up:
speed-up over AR = tokens per NFE / (NFE time / AR step time).
"""
from __future__ import annotations

import os
import statistics
import tempfile

import torch

from . import harness

COLUMNS = ["model", "mode", "gamma", "tokens", "nfe", "tokens/nfe", "tokens/s", "ms/nfe", "ms/ar_step",
           "pytorch_tokens/s", "speedup_vs_pytorch"]
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


def _measure(lm, prompts, reps: int, **kw):
    lm.generate(prompts, **kw)  # warm (allocations, graph capture)
    runs = [lm.generate(prompts, **kw) for _ in range(reps)]
    res = runs[0]
    s = res.stats
    tps = statistics.median(r.stats["tokens"] / r.stats["seconds"] for r in runs)
    nfe_ms = statistics.median(r.stats["denoiser_s"] / max(1, r.stats["nfe"]) for r in runs) * 1e3
    ar_ms = statistics.median(r.stats["context_s"] / max(1, r.stats["tokens"]) for r in runs) * 1e3
    return s, tps, nfe_ms, ar_ms


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
            s, tps, nfe_ms, step_ms = _measure(lm, prompts, reps, **kw)
            old = ops.use_reference(True)
            try:
                _, base_tps, _, _ = _measure(lm, prompts, 1, **kw)
            finally:
                ops.use_reference(old)
            if mode == "ar":
                ar_ms = step_ms
            rows.append({"model": name, "mode": mode, "gamma": gamma if gamma is not None else "-",
                         "tokens": s["tokens"], "nfe": s["nfe"], "tokens/nfe": s["tokens_per_nfe"],
                         "tokens/s": tps, "ms/nfe": nfe_ms if mode != "ar" else "-",
                         "ms/ar_step": step_ms if mode == "ar" else "-", "pytorch_tokens/s": base_tps,
                         "speedup_vs_pytorch": tps / base_tps})
        for r in rows:
            if r["model"] == name and r["mode"] == "diffusion":
                r["nfe/ar_step"] = r["ms/nfe"] / ar_ms
    harness.print_table(f"end to end on {device}: diffusion (gamma sweep) vs AR, {new} new tokens per row",
                        rows, COLUMNS + ["nfe/ar_step"])
    _plot(rows, device)
    return rows


def _plot(rows, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        d = [r for r in rows if r["model"] == model and r["mode"] == "diffusion"]
        ar = next(r for r in rows if r["model"] == model and r["mode"] == "ar")
        g = [r["gamma"] for r in d]
        a.plot(g, [r["tokens/nfe"] for r in d], "o-", label=model)
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
