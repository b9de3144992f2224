"""The denoiser's time conditioning rows of a pass, tables + time_modulation(t) [B, layers, 3, H], remembered per t
vector on the CPU.

Why: the rows depend only on t and the time weights, and a decode's t is the fraction of the block still masked
(k / block_size) of each row, so its passes see a handful of t vectors (at batch 1, ~16). Computed per pass they cost
~1 ms of a ~31 ms bf16 denoiser pass of the width-1/8 model at 2 threads (three M = 1 oneDNN linears and the add over
52 layers, their code and weights gone cold while the pass streamed its experts), for 0.3 ms of work when hot.

A t vector is remembered with the rows computed for it as a whole, exactly what the pass computed before (a row's
values may depend on its batch: a library linear may round an M = 1 call and an M = B call differently; computing
each row alone changed which tokens a batch of the prefix-cache tests committed). The memory is bounded
(BUDGET_BYTES, oldest first out) and dropped when a time weight changes in place or is replaced (tensor identities and
versions). Off the CPU (no host reads there: CUDA graphs), under autograd, and for a t with a NaN the rows are computed
each call.
"""
from __future__ import annotations

import math
import threading

import torch

from .layers import time_modulation
from .weights import TimeWeights

BUDGET_BYTES = 32 << 20   # the width-1/8 model: ~100 KB a row (bf16); the real one ~840 KB


class TimeRows:
    """rows(t [B] fp32) -> [B, layers, 3, H] in the model dtype: (shift, scale, gate) of each layer for each row.
    What it returns is shared with later calls: read it, never write it."""

    def __init__(self, weights: TimeWeights, dtype: torch.dtype):
        self.weights, self.dtype = weights, dtype
        # False: compute every call, as off the CPU (tests/test_no_host_read.py checks the CUDA path's calls on CPU)
        self.remember = True
        self._lock = threading.Lock()
        self._rows: dict[tuple, torch.Tensor] = {}   # insertion order = age
        self._versions: tuple = ()

    def _compute(self, t: torch.Tensor) -> torch.Tensor:
        return self.weights.tables[None] + time_modulation(t, self.weights, self.dtype)[:, None]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not self.remember or t.device.type != "cpu" or torch.is_grad_enabled():
            return self._compute(t)
        w = self.weights
        # which tensors (a field may be given a new one) and torch's count of their in-place changes (_version)
        versions = tuple((id(x), x.data_ptr(), x._version)
                         for x in (w.emb0_w, w.emb0_b, w.emb2_w, w.emb2_b, w.block_w, w.block_b, w.tables))
        key = tuple(t.tolist())
        with self._lock:
            if versions != self._versions:
                self._rows.clear()
                self._versions = versions
            rows = self._rows.get(key)
        if rows is None:
            rows = self._compute(t)
            if not any(math.isnan(v) for v in key):
                self._remember(key, rows, versions)
        return rows

    def _remember(self, key: tuple, rows: torch.Tensor, versions: tuple) -> None:
        with self._lock:
            if versions != self._versions:   # the weights changed while these rows were computed
                return
            self._rows[key] = rows
            total = sum(r.nbytes for r in self._rows.values())
            while total > BUDGET_BYTES and len(self._rows) > 1:
                total -= self._rows.pop(next(iter(self._rows))).nbytes
