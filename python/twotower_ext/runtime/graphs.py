"""CUDA graphs of the decode core's passes; all graphs of one cache share one memory pool.

The model runner (runner.py) keeps every group of rows a contiguous slice of a preallocated cache and every
per-row value in persistent device tensors, so every tensor a pass touches has a fixed address, and every
pass reads the rows' lengths on the device (no host read, no shape sized from the data:
tests/test_no_host_read.py). Which passes are captured, and at which padded batch sizes: runner.py.

Capture protocol (`StepGraphs.run`): the first call of a key runs eagerly. It is the warm-up (lazy
initialisation, library workspaces) and a real pass at once. The second call captures the pass (nothing
executes during capture) and replays it; every later call replays. Passes do device work only and keep
everything they read or write in persistent tensors allocated outside the graphs (the cache, the runner's
per-row batch), so the pool only ever holds their temporaries: one pool for every graph of a cache
(`torch.cuda.graph_pool_handle()`) is safe because replays run one at a time on one stream and nothing a
caller reads lives in the pool. The host's bookkeeping (the cache's host lengths) is the caller's, done
alike for eager calls and replays. A failed capture falls back to eager execution with a warning, never to
a wrong result.
"""
from __future__ import annotations

import time
import warnings

import torch


def capture(graph, pool, body) -> None:
    """Record body() into `graph` (nothing executes), its temporaries allocated from `pool`."""
    with torch.cuda.graph(graph, pool=pool):
        body()


def while_supported() -> bool:
    """Conditional WHILE nodes: CUDA >= 12.4 and torch's capture API for them."""
    cuda = torch.version.cuda
    return (cuda is not None and tuple(int(v) for v in cuda.split(".")[:2]) >= (12, 4)
            and hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph")
            and hasattr(torch._C._CUDAGraph, "begin_capture_to_while_node"))


def device_while(pred, body) -> None:
    """While pred() (a bool scalar device tensor) holds, run body(). Under capture: one conditional WHILE node
    (torch's CUDAGraph.begin_capture_to_while_node: the node's handle is set from pred on the device before
    the node and again at the end of each iteration, by a one-thread kernel calling cudaGraphSetConditional),
    so the loop runs exactly the iterations it needs with no host read. Eagerly (a step's warm-up call): a
    host loop."""
    if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
        while bool(pred()):
            body()
        return
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_while_node(pred())
    try:
        body()
        graph.set_conditional_handle_for_current_node(pred())
    finally:
        graph.end_capture_to_conditional_node()


class StepGraphs:
    """The captured passes of one cache, keyed by the runner's (pass kind, static arguments, rows), sharing
    one memory pool. A pass is a function of no arguments that reads and writes persistent tensors only, so
    a replay needs no input copies and returns nothing."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.pool = None
        self.graphs: dict = {}
        self.warm: set = set()   # keys whose eager first call ran
        self.failed = False
        self.capture_s = 0.0     # wall time spent capturing (reported in the stats)

    def run(self, key: tuple, fn) -> None:
        """fn() eagerly on the first call of `key` (the warm-up, a real pass), captured on the second, replayed
        from then on (the second call replays right after capturing: a capture executes nothing)."""
        if self.failed:
            fn()
        elif key in self.graphs:
            self.graphs[key].replay()
        elif key not in self.warm:
            self.warm.add(key)
            fn()
        elif self._capture(key, fn):
            self.graphs[key].replay()
        else:
            fn()

    def _capture(self, key, fn) -> bool:
        t0 = time.perf_counter()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            capture(graph, self.pool, fn)
        except Exception as e:  # noqa: BLE001  (any capture failure -> eager, loudly)
            warnings.warn(f"twotower: CUDA graph capture of {key} failed ({type(e).__name__}: {e}); running "
                          f"the passes eagerly", RuntimeWarning, stacklevel=4)
            self.failed = True
            return False
        self.capture_s += time.perf_counter() - t0
        self.graphs[key] = graph
        return True
