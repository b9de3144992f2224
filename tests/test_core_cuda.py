"""The decode core on a GPU (tools/gpu_check.sh runs these: marker core_cuda): the serving path's CUDA graphs
per padded batch bucket, in bf16 and fp32, give the eager tokens; mixed per-row parameters keep every row equal
to that row alone (fp32, TF32 off); new parameters replay the captured graphs."""
import os
import random
import warnings

import pytest
import torch

import twotower_ext as tt
from twotower_ext.runtime import DecodeCore, DecodeParams, Request

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
pytestmark = [pytest.mark.core_cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def mixed(n: int, seed: int):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        mode = ["diffusion", "diffusion", "diffusion", "ar", "mock_ar"][i % 5]
        p = dict(mode=mode, max_new_tokens=rng.randint(5, 40), threshold=[0.5, 0.7, 0.8, 0.95][i % 4],
                 temperature=rng.choice([0.0, 0.0, 0.8]), seed=rng.randrange(2**40),
                 eos_token_id=rng.choice([None, 2, rng.randint(4, 511)]))
        if mode == "diffusion":
            p.update(block_size=rng.choice([8, 16]), steps_per_block=rng.choice([5, 16]))
        out.append(([1] + [rng.randint(4, 511) for _ in range(rng.randint(1, 30))], DecodeParams(**p)))
    return out


def serve(model, reqs, graphs: bool, rows: int = 8, stagger: int = 3, core=None):
    core = core or DecodeCore(model, max_rows=rows, max_len=128, max_queue=len(reqs), cuda_graphs=graphs)
    hs = [Request(p, q) for p, q in reqs]
    todo = list(hs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a failed capture (a host sync inside a pass) must not happen
        while todo or core.has_work():
            if todo:
                core.submit(todo[:stagger])
                todo = todo[stagger:]
            core.step()
    return [(h.tokens, h.nfe, h.finish_reason) for h in hs], core


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bucketed_graphs_match_eager(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = tt.load(os.path.join(DATA, "checkpoint"), device="cuda", dtype=dtype)
    reqs = mixed(24, seed=11)
    eager, _ = serve(lm.model, reqs, graphs=False)
    graph, core = serve(lm.model, reqs, graphs=True)
    assert graph == eager
    g = core.runner.graphs
    assert not g.failed and any(k[-1] > 1 for k in g.graphs), g.graphs.keys()
    first = dict(g.graphs)
    # other seeds, temperatures and thresholds on the same core: the graphs captured above replay them
    again = [(p, DecodeParams(**{**vars(q), "seed": q.seed + 7, "temperature": 0.9,
                                 "threshold": 0.6 if q.mode == "diffusion" else q.threshold})) for p, q in reqs]
    graph2, _ = serve(lm.model, again, graphs=True, core=core)
    eager2, _ = serve(lm.model, again, graphs=False)
    assert graph2 == eager2
    assert all(g.graphs[k] is v for k, v in first.items())   # none recaptured


def test_mixed_parameters_equal_each_row_alone_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = tt.load(os.path.join(DATA, "checkpoint"), device="cuda", dtype=torch.float32)
    reqs = mixed(32, seed=12)
    got, _ = serve(lm.model, reqs, graphs=True, rows=12)
    for (prompt, p), (tokens, nfe, _) in zip(reqs, got):
        alone = lm.generate([prompt], **vars(p))
        assert tokens == alone.new_tokens[0] and nfe == alone.stats["nfe"], p
