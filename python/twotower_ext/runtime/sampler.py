"""Sampling the next token of AR / mock-AR rows: the commit op on a one-position block, so greedy and
sampling rows share one call with their own temperature and seed, keyed by (seed, token index) — the same
Gumbel-max and Philox stream as a diffusion block (docs/semantics.md), never the row's slot in the batch."""
from __future__ import annotations

import torch

from .. import ops


def sample_tokens(logits: torch.Tensor, temperature, seed, index, exclude: int = -1, logprob=None) -> torch.Tensor:
    """Next tokens [n, 1] int64 from logits [n, V]: argmax where temperature is 0, else a Gumbel-max sample
    of logits / temperature keyed by (seed, index). temperature, seed, index: a number or [n] / [1] device
    tensors. exclude: a vocabulary id never drawn (mock-AR's mask id), -1 for none. logprob: an fp32 [n, 1]
    tensor that receives each token's log-probability (temperature 1)."""
    x = torch.full((logits.shape[0], 1), exclude, dtype=torch.long, device=logits.device)
    ops.threshold_unmask(logits[:, None], x, exclude, 0.0, 0, 1, temperature, seed, index, 1, out_logprob=logprob)
    return x


def top_logprobs(logits: torch.Tensor, k: int, exclude: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The k likeliest ids of logits [..., V] and their log-probabilities (temperature 1, the excluded id's
    probability 0: the distribution the commit op samples from). A pass over the logits: paid only by the
    passes of groups where some request asks for alternatives."""
    lp = logits.float()
    if exclude >= 0:
        lp = lp.clone()
        lp[..., exclude] = -torch.inf
    values, ids = torch.log_softmax(lp, -1).topk(k, -1)
    return values, ids
