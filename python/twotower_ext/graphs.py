"""CUDA graphs of the decode engine's steps; all graphs of one cache share one memory pool.

The engine keeps the live rows as the contiguous prefix [0, n) of a preallocated cache, so every tensor a
step touches has a fixed address, and every step reads the rows' lengths on the device (no host read, no
shape sized from the data: tests/test_no_host_read.py). One graph per (step, live-row count n):
- the denoise step (denoiser pass + threshold-unmask commit); with `device_loop=True` a whole block in one
  graph, no host read inside it: a conditional WHILE node (CUDA >= 12.4) that runs steps until every row's
  block is complete, or where those are missing all steps_per_block steps unrolled (the steps after the
  block is complete still run the denoiser and commit nothing); `stats["executed_passes"]` counts the
  passes that ran;
- the AR step (the context tower's extension by one token per row + context_lm_head), replayed token by
  token; mock-AR replays the extension by the sampled token (with the Mamba snapshot) and the mock-AR
  denoiser pass, one graph each;
- the block extension (the context tower over the committed block).

Capture protocol (`StepGraphs.run`): the first call of a key runs eagerly. It is the warm-up (lazy
initialisation, library workspaces) and a real step at once, and its outputs size the graph's static
outputs. The second call captures the step (nothing executes during capture) and every call from then on
copies its inputs into the graph's static inputs, replays, and returns the static outputs (valid until the
next replay of that key). Steps do device work only: the host's bookkeeping (the cache's host lengths) is
the caller's, done alike for eager calls and replays. Static inputs and outputs are allocated outside the
graphs, so the pool only ever holds the steps' temporaries: one pool for every graph of a cache
(`torch.cuda.graph_pool_handle()`) is safe because replays run one at a time on one stream and nothing a
caller reads lives in the pool. A failed capture falls back to eager execution with a warning, never to a
wrong result.
"""
from __future__ import annotations

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


def _tensors(out) -> tuple:
    return () if out is None else out if isinstance(out, tuple) else (out,)


class _Graph:
    def __init__(self, graph, inputs: list, outputs: tuple, single: bool):
        self.graph, self.inputs, self.outputs, self.single = graph, inputs, outputs, single


class StepGraphs:
    """The captured steps of one cache, keyed by (step kind, ..., live rows), sharing one memory pool."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.pool = None
        self.graphs: dict = {}
        self.warm: dict = {}     # key -> (output buffers, single) from the eager first call
        self.failed = False

    def forget(self, *kinds: str) -> None:
        """Drop the graphs of these step kinds (the first element of their keys): their step changed."""
        for key in [k for k in {**self.graphs, **self.warm} if k[0] in kinds]:
            self.graphs.pop(key, None)
            self.warm.pop(key, None)

    def run(self, key: tuple, fn, inputs: tuple, inplace: tuple = ()):
        """fn(*inputs) -> None, a tensor or a tuple of tensors: eagerly on the first call of `key`, then
        from its graph. inputs: tensors (copied into the graph's static inputs); `inplace` lists the inputs
        fn updates in place (copied back after a replay)."""
        if self.failed:
            return fn(*inputs)
        if key not in self.graphs:
            if key not in self.warm:
                out = fn(*inputs)
                self.warm[key] = (tuple(torch.empty_like(o) for o in _tensors(out)), isinstance(out, torch.Tensor))
                return out
            if not self._capture(key, fn, inputs):
                return fn(*inputs)
        g = self.graphs[key]
        for static, t in zip(g.inputs, inputs):
            static.copy_(t)
        g.graph.replay()
        for i in inplace:
            inputs[i].copy_(g.inputs[i])
        return None if not g.outputs else g.outputs[0] if g.single else g.outputs

    def _capture(self, key, fn, inputs) -> bool:
        # Static inputs and outputs come from the ordinary allocator, outside the pool (see the module doc).
        static_in = [t.clone() for t in inputs]
        static_out, single = self.warm[key]

        def body():
            for s, o in zip(static_out, _tensors(fn(*static_in))):
                s.copy_(o)

        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            capture(graph, self.pool, body)
        except Exception as e:  # noqa: BLE001  (any capture failure -> eager, loudly)
            warnings.warn(f"twotower: CUDA graph capture of {key} failed ({type(e).__name__}: {e}); running "
                          f"the steps eagerly", RuntimeWarning, stacklevel=4)
            self.failed = True
            return False
        self.graphs[key] = _Graph(graph, static_in, static_out, single)
        return True


class GraphStepper:
    """The denoise step from graphs: callable like the eager step, (x, cache, n, blk, step) -> (counts [n],
    done [n]) with x updated in place; `run_block` runs a whole block's steps from one unrolled graph."""

    def __init__(self, eager, args, dev: torch.device, graphs: StepGraphs):
        self.eager, self.args, self.dev, self.graphs = eager, args, dev, graphs

    def _index(self, v: int) -> torch.Tensor:
        return torch.full((1,), int(v), dtype=torch.int64, device=self.dev)   # a device fill, no copy

    def __call__(self, x, cache, n: int, blk: int, step: int):
        return self.graphs.run(("denoise", n), lambda x, o, s: self.eager(x, cache, n, o, s),
                               (x, self._index(blk), self._index(step)), inplace=(0,))

    def run_block(self, x, cache, n: int, blk: int):
        """All steps of one block without host reads; returns per-step counts [steps, n] (0 for steps not
        run), done [n] and the passes run ([1] int64). With conditional nodes the block is one WHILE node
        that stops once every row's block is complete; else steps_per_block steps unrolled."""
        steps = self.args.steps_per_block

        def until_done(x, offset):
            counts = torch.zeros(steps, n, dtype=torch.int32, device=self.dev)
            done = torch.zeros(n, dtype=torch.bool, device=self.dev)
            step = torch.zeros(1, dtype=torch.int64, device=self.dev)

            def body():
                c, d = self.eager(x, cache, n, offset, step)
                counts.index_copy_(0, step, c[None])
                done.copy_(d)
                step.add_(1)

            device_while(lambda: (step[0] < steps) & ~done.all(), body)
            return counts, done, step

        def unrolled(x, offset):
            outs = [self.eager(x, cache, n, offset, s) for s in range(steps)]
            return torch.stack([c for c, _ in outs]), outs[-1][1], self._index(steps)

        loop, kind = (until_done, "denoise-while") if while_supported() else (unrolled, "denoise-block")
        return self.graphs.run((kind, n), loop, (x, self._index(blk)), inplace=(0,))


class ContextSteps:
    """The engine's context-tower steps and mock-AR pass on the live prefix [0, n) of a cache, from graphs
    when `graphs` is given, else eager. The host lengths are counted here, after the device work."""

    def __init__(self, model, graphs: StepGraphs | None, dense_moe: bool):
        self.model, self.graphs, self.dense_moe = model, graphs, dense_moe

    def _run(self, key, fn, inputs):
        return fn(*inputs) if self.graphs is None else self.graphs.run(key, fn, inputs)

    def extend(self, x, cache, n: int, snapshot: bool = False, logits: bool = False):
        """model.extend of the block x [n, S] (logits [n, V] of its last token with logits=True)."""
        m = self.model
        x, r = m.check_extend(x, cache, slice(0, n))
        out = self._run(("extend", n, x.shape[1], snapshot, logits),
                        lambda t: m.extend_step(t, cache, r, logits, snapshot, self.dense_moe), (x,))
        cache.count_appended(r, x.shape[1])
        return out

    def decode(self, tokens, cache, n: int):
        """The AR step: model.decode of tokens [n] -> logits [n, V]."""
        return self.extend(tokens.reshape(-1, 1), cache, n, logits=True)

    def mock_ar(self, tokens, cache, n: int):
        """model.mock_ar of tokens [n] -> logits [n, V] (reads the cache only)."""
        m = self.model
        tokens = torch.as_tensor(tokens).to(device=m.den_device, dtype=torch.long).reshape(-1)
        return self._run(("mock_ar", n), lambda t: m.mock_ar(t, cache, slice(0, n), dense_moe=self.dense_moe),
                         (tokens,))
