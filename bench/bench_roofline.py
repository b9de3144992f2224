"""Measured vs predicted: an AR step, a denoiser pass and a block extension next to the roofline.

Each pass is timed alone on a cache prefilled with `CTX` tokens per row (the AR step and the extension
reset the row lengths after each call, so every call sees the same context): median wall time (CPU) or
CUDA events. The prediction is `twotower_ext.analysis.costmodel.estimate` with this run's copy bandwidth and
matmul rate (bench/harness.py), so `measured/predicted` says how far the engine is from streaming each
pass's bytes at the machine's bandwidth (or its FLOPs at the matmul rate, whichever binds). The distinct
experts a pass touched are counted on the device (`costmodel.distinct_experts`, around the router) and
shown next to the uniform-routing expectation: a block's first pass (every position the mask token, and
no positional encoding) routes its 16 tokens alike, so it touches fewer experts than uniform routing
predicts; a half-committed block is closer to a typical later pass. The last column puts the break-even
tokens per pass of the measured times (AR step, the mean of the two passes, extension) next to the
predicted one.

Models: the parity checkpoint, the shipped model and a random-weight model of the real 52-layer pattern at
width 1/8 (vocab 8192), fp32 on CPU (bf16 on CUDA). The passes run the sparse MoE op (`ops.moe_experts`:
the chosen experts only) on every device.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from . import harness

COLUMNS = ["model", "batch", "pass", "MB", "MFLOP", "measured ms", "predicted ms", "measured/predicted", "bound",
           "experts/layer", "expected experts", "break-even tok/pass (measured/predicted)"]
CTX = 256
BLOCK = 16
PARITY = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "parity", "checkpoint")


def _models(quick: bool):
    import twotower_ext as tt
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    yield "parity", PARITY
    if quick:
        return
    if tt.default_model_path() is not None:
        yield "shipped", tt.default_model_path()
    tmp = tempfile.mkdtemp(prefix="tt-roofline-")
    yield "real pattern, width 1/8", random_checkpoint(os.path.join(tmp, "w8"), scaled_config(width=1 / 8, vocab=8192),
                                                       seed=1)


@contextlib.contextmanager
def expert_tally(n_experts: int, model=None):
    """Counts the distinct experts of every routing call on the device (read once when the block ends). The calls
    made inside ops.tower_layers (the CPU's layers as one op) are not Python's to count, so `model`'s layers run the
    Python loop inside the block: the same routing bit for bit (tests/test_tower_layers.py)."""
    from twotower_ext.analysis import costmodel
    from twotower_ext.models import layers

    route, counts = layers.route, []
    op = getattr(model, "tower_op", None)

    def counted(x, w, cfg):
        idx, weights = route(x, w, cfg)
        counts.append(costmodel.distinct_experts(idx, n_experts))
        return idx, weights

    layers.route = counted
    if op is not None:
        model.tower_op = False
    try:
        yield counts
    finally:
        layers.route = route
        if op is not None:
            model.tower_op = op


def _timer(device: str):
    if device == "cuda":
        return lambda fn: harness.time_cuda([fn], warmup=3, reps=20)
    return lambda fn: harness.time_cpu(fn, warmup=2, min_reps=5, budget_s=0.5)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext.analysis import costmodel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    wbytes = torch.finfo(dtype).bits // 8
    bw = harness.measure_copy_bandwidth(device) * 1e9
    mm = harness.measure_matmul_rate(1024, 1024, 1024, dtype, device) * 1e12
    time_it = _timer(device)
    rows = []
    for name, path in _models(quick):
        lm = tt.load(path, device=device, dtype=dtype)
        model, cfg = lm.model, lm.config
        g = torch.Generator().manual_seed(0)
        for batch in (1,) if quick else (1, 4):
            prompt = torch.randint(4, cfg.vocab_size, (batch, CTX), generator=g)
            cache = model.new_cache(batch, CTX + BLOCK + 1)
            model.prefill(prompt, cache, logits=False)

            def reset():   # every call sees CTX context tokens (the Mamba states keep advancing: same cost)
                cache.lens.fill_(CTX)
                cache.lens_host[:] = [CTX] * batch

            mask = torch.full((batch, BLOCK), 3, dtype=torch.long, device=device)
            block = prompt[:, :BLOCK].to(device)
            half = torch.where(torch.arange(BLOCK, device=device) % 2 == 0, block, mask)
            passes = {"ar_step": lambda: (model.decode(block[:, 0], cache), reset()),
                      "nfe": lambda: model.denoise(mask, cache, 1.0),
                      "nfe, half committed": lambda: model.denoise(half, cache, 0.5),
                      "extension": lambda: (model.extend(block, cache), reset())}
            est = costmodel.estimate(cfg, batch, CTX, BLOCK, wbytes, bw, mm)
            ms = {}
            for label, fn in passes.items():
                key = label.split(",")[0]
                t = time_it(fn)
                with expert_tally(cfg.n_routed_experts, model) as counts:
                    fn()
                touched = torch.stack(counts).double().mean().item() if counts else float("nan")
                ms[label] = t.median_s * 1e3
                rows.append({"model": name, "batch": batch, "pass": label, "MB": est[f"{key}_bytes"] / 1e6,
                             "MFLOP": est[f"{key}_flops"] / 1e6, "measured ms": ms[label],
                             "predicted ms": est[f"{key}_ms"], "measured/predicted": ms[label] / est[f"{key}_ms"],
                             "bound": est[f"{key}_bound"], "experts/layer": touched,
                             "expected experts": est[f"distinct_experts_{key}"]})
            # a block's passes: its first all-masked, the rest partly committed: their mean stands for a pass
            nfe_ms = (ms["nfe"] + ms["nfe, half committed"]) / 2
            measured = costmodel.break_even(ms["ar_step"], nfe_ms, ms["extension"], BLOCK)
            rows[-1]["break-even tok/pass (measured/predicted)"] = f"{measured:.3g} / {est['break_even_tokens_per_nfe']:.3g}"
    harness.print_table(f"each pass measured vs its roofline on {device} ({dtype}, context {CTX}, block {BLOCK}; "
                        f"copy {bw / 1e9:.1f} GB/s, matmul {mm / 1e9:.1f} GFLOP/s measured in this run)",
                        rows, COLUMNS)
    return rows
