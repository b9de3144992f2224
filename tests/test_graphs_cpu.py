"""The CUDA-graph bookkeeping of graphs.py, on CPU: torch.cuda.CUDAGraph, graph_pool_handle and the capture
are replaced by fakes whose replay re-runs the captured step, so the protocol (eager warm-up, capture on the
second call, static inputs/outputs, one memory pool per cache) and the engine's use of it (AR, mock-AR, block
extension, denoise step and unrolled block) are checked here; tests/test_engine.py checks real graphs on CUDA."""
import os

import pytest
import torch

import twotower_ext as tt
from twotower_ext import graphs
from twotower_ext.engine import Engine

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")


class FakeGraph:
    def __init__(self):
        self.body, self.pool, self.replays = None, None, 0

    def replay(self):
        self.replays += 1
        self.body()


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """Graphs on CPU: capture records the body (executing nothing, like a real capture), replay runs it."""
    pools = []

    def fake_capture(graph, pool, body):
        graph.pool, graph.body = pool, body

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: pools.append(object()) or pools[-1])
    monkeypatch.setattr(graphs, "capture", fake_capture)
    monkeypatch.setattr(Engine, "_use_graphs", staticmethod(lambda args, dev: args.cuda_graphs))
    return pools


@pytest.fixture(scope="module")
def lm():
    return tt.load(os.path.join(DATA, "checkpoint"), dtype=torch.float32)


def test_protocol_eager_then_capture_then_replay(fake_cuda_graphs):
    g = graphs.StepGraphs(torch.device("cpu"))
    calls = []

    def step(x, k):
        calls.append(1)
        x.add_(k)              # an in-place input
        return x * 2, k + 1    # outputs

    x = torch.zeros(3)
    a = g.run(("add", 3), step, (x, torch.tensor([1.0])), inplace=(0,))       # eager warm-up
    assert len(calls) == 1 and not g.graphs and torch.equal(x, torch.ones(3)) and torch.equal(a[0], 2 * x)
    b = g.run(("add", 3), step, (x, torch.tensor([2.0])), inplace=(0,))       # capture (runs nothing) + replay
    assert len(calls) == 2 and torch.equal(x, torch.full((3,), 3.0)) and torch.equal(b[0], 2 * x)
    c = g.run(("add", 3), step, (x, torch.tensor([3.0])), inplace=(0,))       # replay
    assert len(calls) == 3 and torch.equal(x, torch.full((3,), 6.0)) and torch.equal(c[1], torch.tensor([4.0]))
    assert c[0] is b[0] and c[0] is not a[0]        # the graph's static outputs, allocated before capture
    graph = g.graphs[("add", 3)]
    assert graph.graph.replays == 2 and graph.inputs[0] is not x      # static inputs: copies, not the caller's
    assert g.run(("mul", 2), lambda t: t * 3, (torch.ones(2),)).shape == (2,)      # a single tensor output
    g.run(("mul", 2), lambda t: t * 3, (torch.ones(2),))
    assert torch.equal(g.run(("mul", 2), lambda t: t * 3, (torch.ones(2),)), torch.full((2,), 3.0))
    assert len(fake_cuda_graphs) == 1                                        # one pool, made once
    assert all(v.graph.pool is fake_cuda_graphs[0] for v in g.graphs.values())
    g.forget("add")
    assert list(g.graphs) == [("mul", 2)]


def test_failed_capture_runs_eagerly_with_a_warning(fake_cuda_graphs, monkeypatch):
    def broken(graph, pool, body):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "capture", broken)
    g = graphs.StepGraphs(torch.device("cpu"))
    g.run(("k",), lambda t: t + 1, (torch.zeros(1),))
    with pytest.warns(RuntimeWarning, match="capture of .* failed"):
        out = g.run(("k",), lambda t: t + 1, (torch.zeros(1),))
    assert torch.equal(out, torch.ones(1)) and g.failed and not g.graphs
    assert torch.equal(g.run(("k",), lambda t: t + 2, (torch.zeros(1),)), torch.full((1,), 2.0))


@pytest.mark.parametrize("mode", ["ar", "mock_ar", "diffusion", "device_loop", "device_while"])
def test_engine_graphs_match_eager(lm, fake_cuda_graphs, mode, monkeypatch):
    """Graph replays (rows leaving the batch at EOS: several live-row counts) give the eager tokens; every graph
    of the cache shares the one pool; the host lengths, counted on the host, match the device lengths. The
    device loop of a block: unrolled (every step runs) or a WHILE node (device_while; its capture branch needs
    a GPU, its loop logic runs here), which runs exactly the passes the per-step loop runs."""
    device = mode == "device_while"
    monkeypatch.setattr(graphs, "while_supported", lambda: device)
    mode = "device_loop" if device else mode
    prompts = [[1, 501, 95, 276, 159], [1, 97, 303, 453, 268, 317, 91, 58], [1, 42, 17]]
    kw = dict(mode="diffusion" if mode == "device_loop" else mode, max_new_tokens=40 if mode in ("diffusion",
              "device_loop") else 12, device_loop=mode == "device_loop")
    engine = Engine(lm.model)   # its own cache and graphs
    base = engine.generate(prompts, cuda_graphs=False, eos_token_id=None, **kw)
    eos = base.new_tokens[0][5 if mode in ("ar", "mock_ar") else 20]
    eager = engine.generate(prompts, cuda_graphs=False, eos_token_id=eos, **kw)
    graph = engine.generate(prompts, cuda_graphs=True, eos_token_id=eos, **kw)
    assert graph.sequences == eager.sequences
    assert graph.nfe_per_block == eager.nfe_per_block and graph.commits_per_step == eager.commits_per_step
    again = engine.generate(prompts, cuda_graphs=True, eos_token_id=eos, **kw)   # replays the first run's graphs
    assert again.sequences == eager.sequences
    g = engine._graphs
    kinds = {k[0] for k in g.graphs}
    want = {"ar": {"extend"}, "mock_ar": {"extend", "mock_ar"}, "diffusion": {"denoise", "extend"},
            "device_loop": {"denoise-while" if device else "denoise-block", "extend"}}[mode]
    assert want <= kinds, kinds
    assert len({k[1] for k in g.graphs}) >= 2 or mode in ("diffusion", "device_loop")   # several row counts
    assert len(fake_cuda_graphs) == 1 and all(v.graph.pool is fake_cuda_graphs[0] for v in g.graphs.values())
    assert sum(v.graph.replays for v in g.graphs.values()) > 0
    if mode == "device_loop":
        blocks = sum(len(v) for v in eager.nfe_per_block)
        ran = graph.stats["executed_passes"]
        # unrolled: every step of each full block; the partial last block (40 = 2.5 blocks) runs step by step,
        # as many passes as the eager loop (the most any of its rows needs)
        last = max(len(v) for v in eager.nfe_per_block)
        unrolled = 16 * (last - 1) + max(v[-1] for v in eager.nfe_per_block if len(v) == last)
        assert ran == (eager.stats["executed_passes"] if device else unrolled)
        assert ran < 16 * blocks
    cache = engine._pool
    assert cache.lens_host == cache.lens.tolist()
