"""Sampling the next token of AR / mock-AR rows: the commit op on a one-position block, so greedy and
sampling rows share one call with their own temperature and seed, keyed by (seed, token index) — the same
Gumbel-max and Philox stream as a diffusion block (docs/semantics.md), never the row's slot in the batch."""
from __future__ import annotations

import torch

from .. import ops


_ONE_STEP: dict = {}   # device -> the commit rule's constants for a one-position, one-step block


def _one_step(device: torch.device) -> tuple:
    """(gamma 0, step 0, steps_per_block 1, kept 1) as [1] tensors on device, made once: a sampling call then
    passes only tensors (no per-call fills; under capture they are the graph's constant inputs)."""
    if device not in _ONE_STEP:
        i32 = dict(dtype=torch.int32, device=device)
        _ONE_STEP[device] = (torch.zeros(1, dtype=torch.float32, device=device), torch.zeros(1, **i32),
                             torch.ones(1, **i32), torch.ones(1, **i32))
    return _ONE_STEP[device]


def sample_tokens(logits: torch.Tensor, temperature, seed, index, exclude: int = -1, logprob=None) -> torch.Tensor:
    """Next tokens [n, 1] int64 from logits [n, V]: argmax where temperature is 0, else a Gumbel-max sample
    of logits / temperature keyed by (seed, index). temperature, seed, index: a number or [n] / [1] device
    tensors. exclude: a vocabulary id never drawn (mock-AR's mask id), -1 for none. logprob: an fp32 [n, 1]
    tensor that receives each token's log-probability (temperature 1)."""
    x = torch.full((logits.shape[0], 1), exclude, dtype=torch.long, device=logits.device)
    gamma, step, steps, kept = _one_step(logits.device)
    ops.threshold_unmask(logits[:, None], x, exclude, gamma, step, steps, temperature, seed, index, kept,
                         out_logprob=logprob)
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
