"""How many CPU threads a decode runs on: the one rule shared by the API (`load(threads=None)`) and the
CLI (`--threads 0`).

Per call the work of a small model is a few hundred microsecond-sized ops; below SMALL_MODEL_HIDDEN the hand-
off to a second OpenMP thread costs about what it saves on a quiet machine and, on a busy one, a waiting
or descheduled worker stalls every parallel op by up to a scheduler tick (measured in the issue-20 note: up
to 50x slower generation with 2 threads on a loaded 2-core machine). Larger models run matmuls big enough to
split, so they keep torch's own thread count.
"""
from __future__ import annotations

import contextlib

import torch

SMALL_MODEL_HIDDEN = 1024


def recommended_threads(config, device) -> int | None:
    """Threads for decoding `config` on `device`: 1 for a small model on the CPU, None (leave torch's
    setting) otherwise."""
    if torch.device(device).type == "cpu" and config.hidden_size < SMALL_MODEL_HIDDEN:
        return 1
    return None


@contextlib.contextmanager
def using_threads(n: int | None):
    """torch's intra-op thread count set to n for the block (None: unchanged), restored afterwards."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)
