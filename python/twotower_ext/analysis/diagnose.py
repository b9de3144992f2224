"""Where a non-finite value came from, for the error the decode core raises when the commit step finds NaN
logits: the first context-tower layer whose cached state (K/V of the rows' tokens, Mamba conv/SSM state)
is non-finite, else the first denoiser layer whose output is, found by re-running the failed pass with a
finiteness probe after every layer. It runs only on that error path, so the decode loop pays nothing."""
from __future__ import annotations

import torch


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def context_origin(cfg, cache, rows) -> str | None:
    """'the context tower, layer i (kind)' for the first layer whose cached state for `rows` (cache Rows) is
    not finite (None when every layer's is)."""
    st = cache.den
    for i, kind in enumerate(cfg.layer_kinds):
        if kind == "attention":
            held = [t[b, :cache.lens_host[b]] for t in (st.k[i], st.v[i]) for b in rows.host]
        elif kind == "mamba":
            held = [rows.take(st.conv[i]), rows.take(st.ssm[i])]
        else:
            continue   # MoE / MLP layers keep no state: a layer after them that does shows it
        if not all(_finite(t) for t in held):
            return (f"the context tower: layer {i} ({kind}) is the first whose cached state is non-finite "
                    f"(a NaN/inf came from that layer or an MoE/MLP layer just before it)")
    return None


def denoiser_origin(model, x: torch.Tensor, cache, rows, t) -> str | None:
    """Re-run the denoiser pass over x [n, S] of `rows` with time t, checking every layer's output; 'the
    denoiser tower, layer i (kind)' for the first non-finite one, or its final norm / lm_head (None: all
    finite)."""
    first = []

    def probe(i, kind, h):
        if not first and not _finite(h):
            first.append((i, kind))

    logits = model.denoise(x, cache, t, rows, probe=probe)
    if first:
        i, kind = first[0]
        return f"the denoiser tower: layer {i} ({kind}) is the first whose output is non-finite"
    if not _finite(logits):
        return "the denoiser tower: its final norm / lm_head (every layer's output is finite)"
    return None


def nonfinite_origin(model, x: torch.Tensor, cache, rows, t) -> str:
    """The sentence naming the tower and layer that first produced a non-finite value."""
    found = context_origin(model.config, cache, rows) or denoiser_origin(model, x, cache, rows, t)
    return found or "re-running the pass found every layer finite (a non-deterministic overflow?)"
