"""The denoiser's time conditioning rows of a pass, tables + time_modulation(t) [B, layers, 3, H], remembered per t
value on the CPU.

Why: a row's rows depend only on its t and the time weights, and a decode's t is the fraction of the block still
masked (k / block_size), so its passes see a handful of values. Computed per pass they cost ~1 ms of a ~31 ms bf16
denoiser pass of the width-1/8 model at 2 threads (three M = 1 oneDNN linears and the add over 52 layers, their
code and weights gone cold while the pass streamed its experts), for 0.3 ms of work when hot.

On the CPU each row is computed alone (t of one element) and remembered by its value, so a row's values depend
neither on the batch it is in nor on what was remembered before: the library's linears round an M = 1 call and an
M = B call differently (fp32), and differently at 1 and 2 threads, which computing the batch would carry into every
row (docs/semantics.md: batch invariance). The memory is bounded (BUDGET_BYTES, oldest first out) and dropped when a
time weight changes in place or is replaced (tensor identities and versions). A NaN t is computed each call, never
remembered. Off the CPU (no host reads there: CUDA graphs) and under autograd the rows are computed for the whole
batch each call.
"""
from __future__ import annotations

import math
import threading

import torch

from .layers import time_modulation
from .weights import TimeWeights

BUDGET_BYTES = 32 << 20   # the width-1/8 model: ~100 KB a value (bf16); the real one ~840 KB


class TimeRows:
    """rows(t [B] fp32) -> [B, layers, 3, H] in the model dtype: (shift, scale, gate) of each layer for each row.
    What it returns may be shared with later calls: read it, never write it."""

    def __init__(self, weights: TimeWeights, dtype: torch.dtype):
        self.weights, self.dtype = weights, dtype
        # False: compute every call, as off the CPU (tests/test_no_host_read.py checks the CUDA path's calls on CPU)
        self.remember = True
        self._lock = threading.Lock()
        self._rows: dict[float, torch.Tensor] = {}   # insertion order = age
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
        rows = []
        for v in t.tolist():
            with self._lock:
                if versions != self._versions:
                    self._rows.clear()
                    self._versions = versions
                row = self._rows.get(v)
            if row is None:
                row = self._compute(torch.tensor([v], dtype=torch.float32))[0]
                if not math.isnan(v):
                    self._remember(v, row, versions)
            rows.append(row)
        return rows[0][None] if len(rows) == 1 else torch.stack(rows)

    def _remember(self, v: float, row: torch.Tensor, versions: tuple) -> None:
        keep = max(1, BUDGET_BYTES // max(1, row.nbytes))
        with self._lock:
            if versions != self._versions:   # the weights changed while this row was computed
                return
            self._rows[v] = row
            while len(self._rows) > keep:
                del self._rows[next(iter(self._rows))]
