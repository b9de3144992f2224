"""CUDA-graph capture of the denoise step (denoiser pass + threshold-unmask commit).

One graph per live-row count n (a batch-size bucket): the engine keeps live rows as the contiguous prefix
[0, n) of a preallocated cache, so every tensor the pass touches has a fixed address and the per-row
context lengths are read on the device. Replay inputs are copied into static buffers: the block x, the
step index and the block index (the RNG offset), so one graph serves every step and block.

`device_loop=True` captures all steps_per_block steps of a block unrolled into one graph: no host read
inside a block. Steps after a row's block is complete commit nothing (the unmask op leaves finished rows
untouched), but the denoiser still runs them: this trades wasted passes for zero host round trips, and
`stats["executed_passes"]` reports the passes that ran.

A failed capture falls back to eager execution with a warning, never to a wrong result.
"""
from __future__ import annotations

import warnings

import torch


class _Captured:
    def __init__(self, n: int, S: int, steps: int, dev: torch.device, mask_id: int):
        self.graph = torch.cuda.CUDAGraph()
        self.x = torch.full((n, S), mask_id, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.int64, device=dev)
        self.offset = torch.zeros(1, dtype=torch.int64, device=dev)
        self.counts = torch.zeros(steps, n, dtype=torch.int32, device=dev)
        self.done = torch.zeros(n, dtype=torch.bool, device=dev)


class GraphStepper:
    """Callable like the eager step: (x, cache, n, blk, step) -> (counts [n], done [n])."""

    def __init__(self, eager, args, dev: torch.device):
        self.eager, self.args, self.dev = eager, args, dev
        self.graphs: dict[tuple, _Captured] = {}
        self.failed = False

    def _capture(self, cache, n: int, unrolled: bool) -> _Captured | None:
        a = self.args
        steps = a.steps_per_block if unrolled else 1
        c = _Captured(n, a.block_size, steps, self.dev, a.mask_token_id)

        def body():
            for s in range(steps):
                step = c.step + s if unrolled else c.step
                counts, done = self.eager(c.x, cache, n, c.offset, step)
                c.counts[s].copy_(counts)
                c.done.copy_(done)

        try:
            keep_x = c.x.clone()
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):   # warm-up outside capture (allocator pools, lazy init)
                body()
            torch.cuda.current_stream(self.dev).wait_stream(side)
            c.x.copy_(keep_x)
            with torch.cuda.graph(c.graph):
                body()
            return c
        except Exception as e:  # noqa: BLE001  (any capture failure -> eager, loudly)
            warnings.warn(f"twotower: CUDA graph capture failed for {n} rows ({type(e).__name__}: {e}); "
                          f"running the denoise step eagerly", RuntimeWarning, stacklevel=3)
            self.failed = True
            return None

    def _get(self, cache, n: int, unrolled: bool) -> _Captured | None:
        # One stepper serves one cache: the engine makes a new stepper whenever it allocates a new cache.
        key = (n, unrolled)
        if key not in self.graphs and not self.failed:
            captured = self._capture(cache, n, unrolled)
            if captured is None:
                return None
            self.graphs[key] = captured
        return self.graphs.get(key)

    def __call__(self, x, cache, n: int, blk: int, step: int):
        c = self._get(cache, n, unrolled=False)
        if c is None:
            return self.eager(x, cache, n, blk, step)
        c.x.copy_(x)
        c.step.fill_(step)
        c.offset.fill_(blk)
        c.graph.replay()
        x.copy_(c.x)
        return c.counts[0], c.done

    def run_block(self, x, cache, n: int, blk: int):
        """All steps of one block without host reads; returns per-step counts [steps, n] and done [n]."""
        c = self._get(cache, n, unrolled=True)
        if c is None:
            return None
        c.x.copy_(x)
        c.step.zero_()
        c.offset.fill_(blk)
        c.graph.replay()
        x.copy_(c.x)
        return c.counts, c.done
