"""The CUDA-graph path of the decode core, on CPU: torch.cuda.CUDAGraph, graph_pool_handle and the capture are
replaced by fakes whose replay re-runs the captured pass, so the protocol (eager warm-up, capture on the second
call, replay), the padded batch buckets (rows of a bucket that are not the group's stay inert), parameters as
graph inputs (new seeds and thresholds replay the same graphs) and one memory pool per cache are checked here;
tests/test_engine.py and tests/test_core_cuda.py check real graphs on a GPU."""
import os
import random

import pytest
import torch

import twotower_ext as tt
from twotower_ext.runtime import DecodeCore, DecodeParams, Generator, Request
from twotower_ext.runtime import graphs as graph_mod
from twotower_ext.runtime import runner as runner_mod

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
pytestmark = pytest.mark.usefixtures("one_thread")


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
    monkeypatch.setattr(graph_mod, "capture", fake_capture)
    monkeypatch.setattr(runner_mod, "use_graphs", lambda cuda_graphs, model: cuda_graphs)
    return pools


@pytest.fixture(scope="module")
def lm():
    return tt.load(os.path.join(DATA, "checkpoint"), dtype=torch.float32)


def test_protocol_eager_then_capture_then_replay(fake_cuda_graphs):
    g = graph_mod.StepGraphs(torch.device("cpu"))
    x = torch.zeros(3)
    calls = []

    def step():
        calls.append(1)
        x.add_(1)

    g.run(("add", 3), step)                    # eager warm-up: a real pass
    assert len(calls) == 1 and not g.graphs and torch.equal(x, torch.ones(3))
    g.run(("add", 3), step)                    # capture (runs nothing) + replay
    assert len(calls) == 2 and torch.equal(x, torch.full((3,), 2.0))
    g.run(("add", 3), step)                    # replay
    assert torch.equal(x, torch.full((3,), 3.0)) and g.graphs[("add", 3)].replays == 2
    g.run(("mul", 2), lambda: x.mul_(2))
    g.run(("mul", 2), lambda: x.mul_(2))
    assert torch.equal(x, torch.full((3,), 12.0))
    assert len(fake_cuda_graphs) == 1 and all(v.pool is fake_cuda_graphs[0] for v in g.graphs.values())


def test_failed_capture_runs_eagerly_with_a_warning(fake_cuda_graphs, monkeypatch):
    def broken(graph, pool, body):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graph_mod, "capture", broken)
    g = graph_mod.StepGraphs(torch.device("cpu"))
    x = torch.zeros(1)
    g.run(("k",), lambda: x.add_(1))
    with pytest.warns(RuntimeWarning, match="capture of .* failed"):
        g.run(("k",), lambda: x.add_(1))
    assert torch.equal(x, torch.full((1,), 2.0)) and g.failed and not g.graphs
    g.run(("k",), lambda: x.add_(1))
    assert torch.equal(x, torch.full((1,), 3.0))


@pytest.mark.parametrize("mode", ["ar", "mock_ar", "diffusion", "device_loop", "device_while", "compat"])
def test_generate_graphs_match_eager(lm, fake_cuda_graphs, mode, monkeypatch):
    """Graph replays give the eager tokens, NFE and commits while rows leave the batch at EOS (several bucket
    sizes, padded ones among them); every graph of the cache shares the one pool; the host lengths, counted on
    the host, match the device lengths. The device loop of a block: unrolled, or a WHILE node (its capture
    branch needs a GPU; its loop logic runs here)."""
    monkeypatch.setattr(graph_mod, "while_supported", lambda: mode == "device_while")
    prompts = [[1, 501, 95, 276, 159], [1, 97, 303, 453, 268, 317, 91, 58], [1, 42, 17], [1, 7, 7, 9, 11],
               [1, 300, 301]]
    diffusion = mode not in ("ar", "mock_ar")
    kw = dict(mode="diffusion" if diffusion else mode, max_new_tokens=48 if diffusion else 12,
              device_loop=mode.startswith("device"), reference_compat=mode == "compat")
    if mode == "compat":
        prompts = [p[:3] for p in prompts]
    gen = Generator(lm.model)   # its own core, cache and graphs
    base = gen.generate(prompts, cuda_graphs=False, eos_token_id=None, **kw)
    eos = base.new_tokens[0][5 if not diffusion else 20]
    eager = gen.generate(prompts, cuda_graphs=False, eos_token_id=eos, **kw)
    if mode == "device_loop":   # said once: the WHILE node is missing, so the block's steps run unrolled
        with pytest.warns(RuntimeWarning, match="no conditional WHILE nodes"):
            graph = gen.generate(prompts, cuda_graphs=True, eos_token_id=eos, **kw)
    else:
        graph = gen.generate(prompts, cuda_graphs=True, eos_token_id=eos, **kw)
    assert graph.sequences == eager.sequences
    assert graph.nfe_per_block == eager.nfe_per_block and graph.commits_per_step == eager.commits_per_step
    again = gen.generate(prompts, cuda_graphs=True, eos_token_id=eos, **kw)   # replays the first run's graphs
    assert again.sequences == eager.sequences
    g = gen.core.runner.graphs
    assert sum(v.replays for v in g.graphs.values()) > 0
    assert len(fake_cuda_graphs) == 1 and all(v.pool is fake_cuda_graphs[0] for v in g.graphs.values())
    sizes = {k[-1] for k in g.graphs}
    if mode != "compat":   # rows left at EOS: several buckets, one of them padded (3 or 4 rows -> 4 of 5)
        assert len(sizes) >= 2, g.graphs.keys()
    cache = gen.core.runner.cache
    assert cache.lens_host == cache.lens.tolist()
    if mode == "device_loop":
        assert graph.stats["device_loop"] == "unrolled" and graph.stats["executed_passes"] >= eager.stats["executed_passes"]
    if mode == "device_while":
        assert graph.stats["device_loop"] == "while" and graph.stats["executed_passes"] == eager.stats["executed_passes"]


def _mixed(n: int, seed: int):
    """Requests mixing modes, block sizes, thresholds, steps, temperatures, seeds, lengths and EOS ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mode = rng.choice(["diffusion", "diffusion", "ar", "mock_ar"])
        p = dict(mode=mode, max_new_tokens=rng.randint(1, 36), seed=rng.randint(0, 2**40),
                 temperature=rng.choice([0.0, 0.0, 0.9]), eos_token_id=rng.choice([None, 2, rng.randint(4, 511)]),
                 logprobs=rng.choice([None, None, 0, 4]))
        if mode == "diffusion":
            p.update(block_size=rng.choice([8, 16]), steps_per_block=rng.choice([4, 16]),
                     threshold=rng.choice([0.5, 0.8, 0.95]))
        out.append(([1] + [rng.randint(4, 511) for _ in range(rng.randint(1, 20))], DecodeParams(**p)))
    return out


def same_results(got, want) -> None:
    """Tokens, NFE and finish reasons exactly; log-probabilities up to fp32 rounding (a padded bucket is a
    bigger matmul than the exact rows: its logits may differ in the last bits), alternatives' ids exactly
    where their log-probabilities are not tied."""
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g[3], dtype=torch.float64), torch.tensor(w[3], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
        for gt, wt in zip(g[4], w[4]):
            vals = [v for _, v in wt]
            torch.testing.assert_close(torch.tensor([v for _, v in gt]), torch.tensor(vals), rtol=1e-4, atol=1e-5)
            for j, ((gi, _), (wi, _)) in enumerate(zip(gt, wt)):
                tied = any(abs(vals[j] - vals[i]) < 1e-4 for i in (j - 1, j + 1) if 0 <= i < len(vals))
                assert gi == wi or tied


def _run_core(model, reqs, graphs: bool, stagger: int):
    """Submit reqs to one core, `stagger` more every iteration; returns (tokens, nfe) per request and the core."""
    core = DecodeCore(model, max_rows=8, max_len=96, max_queue=len(reqs), cuda_graphs=graphs)
    handles = [Request(p, params) for p, params in reqs]
    todo = list(handles)
    while todo or core.has_work():
        if todo:
            core.submit(todo[:stagger])
            todo = todo[stagger:]
        core.step()
    return [(h.tokens, h.nfe, h.finish_reason, h.logprobs, h.top_logprobs) for h in handles], core


def test_serving_core_graphs_match_eager_with_mixed_groups_and_new_parameters(lm, fake_cuda_graphs):
    """A serving core (8 rows) with staggered arrivals of mixed modes and block sizes: groups sit side by side,
    padded buckets cover other groups' rows and free rows; graph replays give the eager results, and a second
    wave with other seeds / thresholds / temperatures replays the same graphs (parameters are graph inputs)."""
    reqs = _mixed(20, seed=5)
    eager, _ = _run_core(lm.model, reqs, graphs=False, stagger=3)
    graph, core = _run_core(lm.model, reqs, graphs=True, stagger=3)
    same_results(graph, eager)
    g = core.runner.graphs
    padded = [k for k in g.graphs if k[-1] > 1]
    assert padded and any(k[0] == "denoise" for k in g.graphs) and any(k[0] == "ar" for k in g.graphs)
    keys = set(g.graphs)
    replays = sum(g.graphs[k].replays for k in keys)
    again = [(p, DecodeParams(**{**vars(q), "seed": q.seed + 1, "threshold": 0.7 if q.mode == "diffusion" else 0.8,
                                 "temperature": 0.5})) for p, q in reqs]
    handles = [Request(p, q) for p, q in again]
    for h in handles:
        core.submit([h])
    while core.has_work():
        core.step()
    assert all(h.finish_reason in ("stop", "length") for h in handles)
    assert sum(g.graphs[k].replays for k in keys) > replays   # the first wave's graphs serve the new parameters
    want, _ = _run_core(lm.model, again, graphs=False, stagger=len(again))
    same_results([(h.tokens, h.nfe, h.finish_reason, h.logprobs, h.top_logprobs) for h in handles], want)


def test_a_padded_bucket_over_another_groups_live_rows(lm, fake_cuda_graphs):
    """3 diffusion rows of block 8 (bucket 4) placed ahead of 5 rows of block 16 in an 8-row cache: every pass of
    the block-8 group replays a bucket that holds a live, mid-block row of the other group, which must come out
    untouched (its step, counts, tokens and done flag are its own group's). Graph replays equal eager, and each
    row equals that row alone."""
    rng = random.Random(11)
    reqs = [([1] + [rng.randint(4, 511) for _ in range(rng.randint(3, 20))],
             DecodeParams(block_size=8 if i < 3 else 16, steps_per_block=8 if i < 3 else 16, max_new_tokens=32,
                          threshold=[0.5, 0.8, 0.95][i % 3], temperature=0.9 if i % 2 else 0.0, seed=i,
                          eos_token_id=None))
            for i in range(8)]
    eager, _ = _run_core(lm.model, reqs, graphs=False, stagger=8)
    graph, core = _run_core(lm.model, reqs, graphs=True, stagger=8)
    same_results(graph, eager)
    # the block-8 group's graph: rows [0, 4) of which row 3 is the block-16 group's (key: kind, mode, block
    # size, ..., start, size)
    assert any(k[0] == "denoise" and k[2] == 8 and k[-2:] == (0, 4) for k in core.runner.graphs.graphs)
    for (prompt, params), got in zip(reqs, graph):
        alone, _ = _run_core(lm.model, [(prompt, params)], graphs=False, stagger=1)
        same_results([got], alone)


def test_inert_rows_of_an_extension_keep_their_state(lm):
    """TwoTowerModel.extend_step(active=...): inactive rows keep K/V, Mamba states, snapshot and length bit for
    bit; active rows get exactly the unmasked extension."""
    model = lm.model
    prompts = [[1, 5, 9, 11], [1, 7], [1, 2, 3, 4, 5, 6, 7]]
    block = torch.tensor([[4, 5, 6, 3], [3, 3, 9, 3], [7, 3, 3, 3]])
    a = model.new_cache(3, 32, snapshot=True)
    b = model.new_cache(3, 32, snapshot=True)
    for c in (a, b):
        model.prefill(prompts, c, snapshot=True)
    model.extend_step(block, a, a.rows(None), snapshot=True, active=torch.tensor([True, False, True]))
    model.extend_step(block[[0, 2]], b, b.rows([0, 2]), snapshot=True)
    fresh = model.new_cache(3, 32, snapshot=True)
    model.prefill(prompts, fresh, snapshot=True)
    for store_a, store_b, store_0 in ((a.ctx, b.ctx, fresh.ctx),):
        for t_a, t_b, t_0 in zip(store_a.k + store_a.v + store_a.conv + store_a.ssm + store_a.prev_conv + store_a.prev_ssm,
                                 store_b.k + store_b.v + store_b.conv + store_b.ssm + store_b.prev_conv + store_b.prev_ssm,
                                 store_0.k + store_0.v + store_0.conv + store_0.ssm + store_0.prev_conv + store_0.prev_ssm):
            if t_a is None:
                continue
            assert torch.equal(t_a[[0, 2]], t_b[[0, 2]])   # active rows: the plain extension
            assert torch.equal(t_a[1], t_0[1])             # inert row: untouched
    assert a.lens.tolist() == b.lens.tolist() == [8, 2, 11]
