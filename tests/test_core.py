"""The decode core (runtime/): batch invariance under mixed per-row parameters (each row equals that row alone,
submitted at once or staggered), one commit call per group per pass, per-row parameter lists in `generate`,
and a clean exit of a script that never shut its scheduler down."""
import os
import random
import subprocess
import sys
import threading

import pytest
import torch

import twotower_ext as tt
from conftest import step_staggered
from twotower_ext import ops
from twotower_ext.runtime import DecodeCore, DecodeParams, Request

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    return tt.load(os.path.join(DATA, "checkpoint"), dtype=torch.float32)


def mixed_rows(n: int, seed: int) -> list[tuple[list[int], dict]]:
    """n rows: 4 thresholds, greedy and sampling rows with their own seeds, ragged prompts, mixed modes, block
    sizes and steps, EOS ids that stop some rows early."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        mode = ["diffusion", "diffusion", "diffusion", "ar", "mock_ar"][i % 5]
        p = dict(mode=mode, max_new_tokens=rng.randint(5, 40), threshold=[0.5, 0.7, 0.8, 0.95][i % 4],
                 temperature=rng.choice([0.0, 0.0, 0.6, 1.3]), seed=rng.randint(0, 2**62),
                 eos_token_id=rng.choice([None, 2, rng.randint(4, 511)]))
        if mode == "diffusion":
            p.update(block_size=rng.choice([8, 16]), steps_per_block=rng.choice([5, 16]))
        rows.append(([1] + [rng.randint(4, 511) for _ in range(rng.randint(1, 30))], p))
    return rows


def alone(lm, prompt, p):
    res = lm.generate([prompt], **p)
    return res.new_tokens[0], res.stats["nfe"], res.nfe_per_block[0]


def test_mixed_parameters_at_once_equal_each_row_alone(lm):
    rows = mixed_rows(32, seed=random.randrange(2**31))
    keys = rows[0][1].keys() | {"block_size", "steps_per_block"}
    kw = {k: [p.get(k, getattr(DecodeParams, k)) for _, p in rows] for k in keys}
    batch = lm.generate([prompt for prompt, _ in rows], **kw)
    assert batch.stats["mode"] == "mixed"
    for i, (prompt, p) in enumerate(rows):
        tokens, nfe, blocks = alone(lm, prompt, p)
        assert batch.new_tokens[i] == tokens, (i, p)
        assert batch.nfe_per_block[i] == blocks, (i, p)


def test_mixed_parameters_staggered_equal_each_row_alone(lm):
    """A serving core smaller than the load: rows arrive over time, wait for rows, leave at EOS or their length;
    each one's tokens and NFE are the ones it gets alone."""
    rows = mixed_rows(32, seed=random.randrange(2**31))
    core = DecodeCore(lm.model, max_rows=7, max_len=128, max_queue=32)
    reqs = [Request(prompt, DecodeParams(**p).validate(512)) for prompt, p in rows]
    step_staggered(core, reqs)
    for r, (prompt, p) in zip(reqs, rows):
        tokens, nfe, blocks = alone(lm, prompt, p)
        assert (r.tokens, r.nfe, r.nfe_per_block) == (tokens, nfe, blocks if p["mode"] == "diffusion" else []), p


def test_one_commit_call_per_group_per_pass(lm, monkeypatch):
    """32 diffusion rows with 4 thresholds, greedy and sampling rows, their own seeds and steps: every pass
    commits the whole group in one commit call (counted by the profiler), not one per sampling row."""
    rows = mixed_rows(32, seed=3)
    kw = dict(mode="diffusion", max_new_tokens=32, block_size=16, eos_token_id=None,
              threshold=[p["threshold"] for _, p in rows], temperature=[p["temperature"] for _, p in rows],
              seed=[p["seed"] for _, p in rows], steps_per_block=[[16, 12][i % 2] for i in range(32)])
    assert len(set(kw["temperature"])) > 2
    prompts = [prompt for prompt, _ in rows]
    lm.generate(prompts, **kw)   # warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        res = lm.generate(prompts, **kw)
    events = prof.key_averages()
    # the CPU's commit op is the LM head fused with threshold_unmask; elsewhere threshold_unmask after the head
    unmask = sum(e.count for e in events if e.key in ("twotower::threshold_unmask", "twotower::lm_head_unmask"))
    passes = res.stats["executed_passes"]
    assert unmask == passes, (unmask, passes)


def test_generate_takes_one_value_per_row(lm):
    prompts = [[1, 5, 9], [1, 7, 8, 9], [1, 300]]
    res = lm.generate(prompts, max_new_tokens=[5, 16, 9], threshold=[0.5, 0.9, 0.8], seed=[1, 2, 3],
                      temperature=[0.0, 0.9, 0.0], mode=["diffusion", "diffusion", "ar"], eos_token_id=None)
    assert [len(t) for t in res.new_tokens] == [5, 16, 9]
    with pytest.raises(ValueError, match=r"threshold must be one value or a list of one value per prompt \(3\)"):
        lm.generate(prompts, threshold=[0.5, 0.9])
    with pytest.raises(ValueError, match="threshold must be a float in"):
        lm.generate(prompts, threshold=[0.5, 0.9, 7.0])
    with pytest.raises(ValueError, match="max_new_tokens must be one value for every row with reference_compat"):
        lm.generate([[1, 5], [1, 6]], max_new_tokens=[16, 32], reference_compat=True)


def test_a_core_steps_on_one_thread(lm, monkeypatch):
    """A second thread calling step() while one is inside it is refused, not interleaved; submit works from
    any thread meanwhile."""
    core = DecodeCore(lm.model, max_rows=2, max_len=64, max_queue=2)
    inside, release = threading.Event(), threading.Event()
    real = core.runner.execute

    def slow(groups):
        inside.set()
        release.wait(30)
        return real(groups)

    monkeypatch.setattr(core.runner, "execute", slow)
    core.submit([Request([1, 5], DecodeParams(max_new_tokens=4))])
    t = threading.Thread(target=core.step)
    t.start()
    assert inside.wait(30)
    with pytest.raises(RuntimeError, match="already running on another thread"):
        core.step()
    core.submit([Request([1, 6], DecodeParams(max_new_tokens=4))])
    release.set()
    t.join(30)
    while core.has_work():
        core.step()


SCRIPT = """
import twotower_ext as tt, torch
from twotower_ext.serve import Scheduler
lm = tt.load({path!r}, dtype=torch.float32)
s = Scheduler(lm, max_batch=2, max_queue=4, max_len=256)
h = [s.submit([1, 5, 6], mode=m, max_tokens=100, threshold=1.0, eos_token_id=None) for m in ("diffusion", "ar")]
h[0].result(60)
print("ok", flush=True)
"""


def test_a_script_that_never_shuts_its_scheduler_down_exits_cleanly():
    """The in-process scheduler's thread is stopped at exit (its requests cancelled), not killed inside a
    torch op (which aborted the process: 'terminate called without an active exception', exit 134)."""
    code = SCRIPT.format(path=os.path.join(DATA, "checkpoint"))
    for _ in range(3):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])
        assert "terminate called" not in p.stderr and "Traceback" not in p.stderr


def test_logprobs_are_the_committing_pass_distribution(lm, monkeypatch):
    """Each committed token's logprob is log softmax (mask excluded, temperature 1) of the logits of the pass
    that committed it, its alternatives that distribution's k likeliest; recomputed in fp64 from the logits
    the commit op saw. In every mode; the same rows alone and in a mixed batch agree."""
    seen = []
    real, real_head = ops.threshold_unmask, ops.lm_head_unmask

    def spy(logits, x, mask_id, *a, **kw):
        before = x.clone()
        out = real(logits, x, mask_id, *a, **kw)
        seen.append((logits.double(), before, x.clone(), mask_id))
        return out

    def head_spy(hidden, w, x, mask_id, *a, logits=False, **kw):   # the denoiser's commits: the logits it computed
        before = x.clone()
        counts, done, out = real_head(hidden, w, x, mask_id, *a, logits=True, **kw)
        seen.append((out.double(), before, x.clone(), mask_id))
        return counts, done, out if logits else None

    prompts = [[1, 5, 9, 11], [1, 300, 301, 7, 8]]
    for mode in ("diffusion", "ar", "mock_ar"):
        seen.clear()
        monkeypatch.setattr(ops, "lm_head_unmask", head_spy)
        if mode != "diffusion":   # (lm_head_unmask composes threshold_unmask where it has no kernel)
            monkeypatch.setattr(ops, "threshold_unmask", spy)
        res = lm.generate(prompts, mode=mode, max_new_tokens=20, logprobs=3, temperature=[0.0, 0.8], seed=5,
                          eos_token_id=None)
        monkeypatch.setattr(ops, "threshold_unmask", real)
        monkeypatch.setattr(ops, "lm_head_unmask", real_head)
        want = [[] for _ in prompts]   # per row, in commit order: (position index within the output, lp, top)
        for logits, before, after, mask in seen:
            lp = logits.clone()
            if mask >= 0:
                lp[..., mask] = float("-inf")
            lp = torch.log_softmax(lp, -1)
            for row in range(before.shape[0]):
                for s in range(before.shape[1]):
                    if before[row, s] == mask and after[row, s] != mask:
                        top = lp[row, s].topk(3)
                        want[row].append((s, float(lp[row, s, after[row, s]]), top.indices.tolist(), top.values))
        for row in range(len(prompts)):
            got, top = res.logprobs[row], res.top_logprobs[row]
            assert len(got) == len(top) == len(res.new_tokens[row]) == 20
            if mode == "diffusion":   # commit order within a block -> position order
                blocks = [sorted(want[row][i:i + 16], key=lambda w: w[0]) for i in range(0, len(want[row]), 16)]
                ordered = [w for blk in blocks for w in blk][:20]
            else:
                ordered = want[row]
            for g_lp, g_top, (_, w_lp, w_ids, w_vals) in zip(got, top, ordered):
                assert abs(g_lp - w_lp) <= 1e-5 * max(1.0, abs(w_lp)), (mode, row)
                assert [i for i, _ in g_top] == w_ids
                torch.testing.assert_close(torch.tensor([v for _, v in g_top], dtype=torch.float64), w_vals,
                                           rtol=1e-5, atol=1e-5)
        alone = lm.generate(prompts[1:], mode=mode, max_new_tokens=20, logprobs=3, temperature=0.8, seed=5,
                            eos_token_id=None)
        # fp32 on the CPU: a row's tokens, log-probabilities and top-k are bit for bit the same alone and in a batch
        assert alone.new_tokens[0] == res.new_tokens[1]
        assert alone.logprobs[0] == res.logprobs[1] and alone.top_logprobs[0] == res.top_logprobs[1]


def test_stop_token_ids_end_a_row_like_eos(lm):
    base = lm.generate([[1, 5, 9], [1, 7, 7]], max_new_tokens=40, eos_token_id=None)
    stop = base.new_tokens[0][12]
    res = lm.generate([[1, 5, 9], [1, 7, 7]], max_new_tokens=40, eos_token_id=None, stop_token_ids=[stop, 9999 % 512])
    cut = base.new_tokens[0].index(stop) + 1
    assert res.new_tokens[0] == base.new_tokens[0][:cut] and res.finish_reasons[0] == "stop"
    with pytest.raises(ValueError, match="stop_token_ids must be a tuple of ints"):
        lm.generate([1, 5], stop_token_ids=[600])


def test_n_samples_per_prompt_have_derived_seeds(lm):
    from twotower_ext.runtime.params import derive_seed

    res = lm.generate([[1, 5, 9], [1, 7]], n=3, temperature=1.0, seed=11, max_new_tokens=16, eos_token_id=None)
    assert len(res.sequences) == 6 and res.sequences[0][:3] == [1, 5, 9] and res.sequences[3][:2] == [1, 7]
    assert len({tuple(s) for s in res.sequences[:3]}) == 3          # independent samples of one prompt
    for j in range(3):
        alone = lm.generate([1, 7], temperature=1.0, seed=derive_seed(11, j), max_new_tokens=16, eos_token_id=None)
        assert alone.sequences[0] == res.sequences[3 + j]
    assert derive_seed(11, 0) == 11 and len({derive_seed(11, j) for j in range(100)}) == 100
    assert all(0 <= derive_seed(s, j) < 2**63 for s in (0, 2**63 - 1, -5) for j in range(1, 5))
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        lm.generate([1, 5], n=0)
