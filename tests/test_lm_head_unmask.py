"""lm_head_unmask (csrc/lm_head_unmask/lm_head_unmask.h): the denoiser's LM head fused with the commit step. Its
commit (tokens, counts, done, logprob) is bit for bit ops.linear then ops.threshold_unmask's, fp32 and bf16, greedy
and sampling, on every instruction set this CPU runs, at odd sizes; its logits_out is ops.linear's output bit for
bit and within the fp64 oracle's bound; bad input names the argument; NaN hidden raises; the engine's tokens do not
depend on whether the logits are asked for."""
import os

import pytest
import torch

from twotower_ext import ops, packed
from twotower_ext.threads import using_threads

import oracle
from test_linear import FORCED   # lm_head_unmask runs the linear's kernels: its forced instruction sets, skip reasons

MASK = 5


def make(B, S, K, V, dtype, gen, committed=0.3):
    """hidden [B, S, K], the plain and packed head, and a block x with about `committed` of it already committed
    (row 0 fully masked, so every size has a masked row)."""
    hidden = torch.randn(B, S, K, generator=gen).to(dtype)
    w = (torch.randn(V, K, generator=gen) * 3 / K ** 0.5).to(dtype)   # logits of a few units: confidences spread
    x = torch.full((B, S), MASK, dtype=torch.long)
    done = torch.rand(B, S, generator=gen) < committed
    done[0] = False
    x[done] = torch.randint(0, V, (int(done.sum()),), generator=gen)
    return hidden, w, packed.pack(w), x


def row_params(B, S, gen, sample):
    """Per-row commit parameters (tensors, as the runner passes them); kept < S on some rows."""
    steps = torch.randint(1, 6, (B,), generator=gen, dtype=torch.int32)
    return dict(gamma=torch.rand(B, generator=gen), step=(torch.rand(B, generator=gen) * steps).to(torch.int32),
                steps_per_block=steps,
                temperature=(torch.rand(B, generator=gen) + 0.3) * sample if sample else torch.zeros(B),
                seed=torch.randint(-2**40, 2**40, (B,), generator=gen),
                block=torch.randint(0, 1000, (B,), generator=gen),
                kept=torch.randint(S // 2, S + 1, (B,), generator=gen, dtype=torch.int32))


def unfused(hidden, pw, x, params, logprob):
    logits = ops.linear(hidden, pw)
    counts, done = ops.threshold_unmask(logits.float(), x, MASK, out_logprob=logprob, **params)
    return counts, done, logits


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
    assert same.all(), f"{what}: {int((~same).sum())} of {same.numel()} differ"


@pytest.mark.parametrize("isa", FORCED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,K,V", [(3, 16, 37, 8192 * 2 + 37), (1, 5, 64, 100), (2, 7, 336, 8192), (5, 3, 16, 40)])
def test_commit_is_the_unfused_commit_bit_for_bit(B, S, K, V, dtype, isa, monkeypatch, gen):
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", isa)
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_GEMM", "micro")   # the fused op's kernel on both sides
    hidden, _, pw, x = make(B, S, K, V, dtype, gen)
    for sample in (0, 1):
        params = row_params(B, S, gen, sample)
        want_x, want_lp = x.clone(), torch.full((B, S), 7.0)
        want_counts, want_done, want_logits = unfused(hidden, pw, want_x, params, want_lp)
        assert not torch.equal(want_x, x), "nothing committed: the test proves nothing"
        for with_lp in (False, True):
            for with_logits in (False, True):
                got_x, got_lp = x.clone(), torch.full((B, S), 7.0)
                counts, done, logits = ops.lm_head_unmask(hidden, pw, got_x, MASK, logits=with_logits,
                                                          out_logprob=got_lp if with_lp else None, **params)
                what = f"sample={sample} logprob={with_lp} logits={with_logits}"
                assert_bitwise(got_x, want_x, "x " + what)
                assert_bitwise(counts, want_counts, "counts " + what)
                assert_bitwise(done, want_done, "done " + what)
                if with_lp:
                    assert_bitwise(got_lp, want_lp, "logprob " + what)
                if with_logits:
                    assert_bitwise(logits, want_logits, "logits " + what)
                else:
                    assert logits is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_plan_and_threads_change_nothing(dtype, gen):
    """This CPU's best instruction set, the linear's own plan (micro at these sizes), 1 and 2 threads."""
    hidden, _, pw, x = make(4, 16, 96, 8192 * 3 + 5, dtype, gen)
    params = row_params(4, 16, gen, 1)
    want_x = x.clone()
    unfused(hidden, pw, want_x, params, None)
    for n in (1, 2):
        with using_threads(n):
            got = x.clone()
            ops.lm_head_unmask(hidden, pw, got, MASK, **params)
        assert torch.equal(got, want_x), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_within_the_fp64_oracle_bound(dtype, gen):
    hidden, w, pw, x = make(2, 9, 37, 8192 + 37, dtype, gen)
    _, _, logits = ops.lm_head_unmask(hidden, pw, x, MASK, 0.5, 0, 4, logits=True)
    want, bound = oracle.linear(hidden, w)
    err = (logits.double() - want).abs()
    assert logits.dtype == dtype and (err <= bound).all(), f"max error / bound {(err / bound).max().item():.3g}"


def test_nothing_masked_leaves_the_block_and_still_gives_logits(gen):
    hidden, _, pw, _ = make(2, 4, 8, 50, torch.float32, gen)
    x = torch.arange(10, 18).view(2, 4)
    counts, done, logits = ops.lm_head_unmask(hidden, pw, x, MASK, 0.5, 0, 4, logits=True)
    assert torch.equal(x, torch.arange(10, 18).view(2, 4)) and counts.tolist() == [0, 0]
    assert done.tolist() == [True, True]
    assert torch.equal(logits, ops.linear(hidden, pw))


def test_nan_hidden_raises_only_at_masked_positions(gen):
    hidden, _, pw, x = make(2, 4, 8, 50, torch.float32, gen, committed=0)
    x[1, 2] = 3   # committed: its hidden row is never read
    hidden[1, 2, 5] = float("nan")
    ops.lm_head_unmask(hidden, pw, x.clone(), MASK, 0.5, 0, 4)
    hidden[0, 1, 0] = float("nan")
    before = x.clone()
    with pytest.raises(ValueError, match=r"must not contain NaN \(found at masked position batch 0, seq 1\)"):
        ops.lm_head_unmask(hidden, pw, x, MASK, 0.5, 0, 4)
    assert torch.equal(x, before), "nothing is committed when the step fails"


def op_call(**kw):
    """The raw op with valid arguments, `kw` replacing some."""
    B, S, K, V = 2, 4, 8, 50
    a = dict(hidden=torch.randn(B, S, K), w=packed.pack(torch.randn(V, K)).data, n=V,
             x=torch.full((B, S), MASK), mask_id=MASK, gamma=torch.tensor([0.5]),
             step=torch.tensor([0], dtype=torch.int32),
             steps_per_block=torch.tensor([4], dtype=torch.int32), temperature=torch.tensor([0.0]),
             seed=torch.tensor([1]), block=torch.tensor([0]), kept=None, counts=torch.empty(B, dtype=torch.int32),
             done=torch.empty(B, dtype=torch.bool), logprob=None, logits_out=None)
    a.update(kw)
    return a


@pytest.mark.parametrize("kw,exc,words", [
    (dict(hidden=torch.randn(2, 4, 8, dtype=torch.float64)), TypeError, "hidden must be float32 or bfloat16"),
    (dict(hidden=torch.randn(8, 8)), RuntimeError, "hidden must be [batch, seq, hidden_size]"),
    (dict(w=torch.randn(50, 8)), RuntimeError, "w must be the LM head packed by twotower_ext.packed.pack"),
    (dict(w=packed.pack(torch.randn(50, 8)).data.bfloat16()), TypeError, "w must be"),
    (dict(n=30), RuntimeError, "w must be the LM head packed"),
    (dict(n=1), ValueError, "n (the vocabulary size) must be in [2, 2^31)"),
    (dict(x=torch.full((2, 5), MASK)), RuntimeError, "x must be [batch, seq] = [2, 4] like hidden"),
    (dict(x=torch.full((2, 4), MASK, dtype=torch.int32)), TypeError, "x must be"),
    (dict(mask_id=50), ValueError, "mask_id must be in [-1, vocab = 50)"),
    (dict(gamma=torch.tensor([1.5])), ValueError, "gamma must be in [0, 1]"),
    (dict(step=torch.tensor([0, 0, 0], dtype=torch.int32)), RuntimeError, "step must be a [batch] = [2] or a [1]"),
    (dict(logprob=torch.zeros(2, 3)), RuntimeError, "logprob must be [batch, seq] = [2, 4] like hidden"),
    (dict(logits_out=torch.zeros(2, 4, 49)), RuntimeError, "logits_out must be a contiguous [batch, seq, n]"),
    (dict(logits_out=torch.zeros(2, 4, 50, dtype=torch.bfloat16)), TypeError, "logits_out must be"),
])
def test_bad_input_names_the_argument(kw, exc, words):
    with pytest.raises(exc) as e:
        torch.ops.twotower.lm_head_unmask(**op_call(**kw))
    msg = str(e.value).splitlines()[0]
    assert words in msg and len(str(e.value).strip().splitlines()) == 1, str(e.value)


def test_opcheck(gen):
    for dtype in (torch.float32, torch.bfloat16):
        a = op_call(hidden=torch.randn(2, 4, 8, generator=gen).to(dtype),
                    w=packed.pack(torch.randn(50, 8, generator=gen).to(dtype)).data,
                    logprob=torch.zeros(2, 4), logits_out=torch.empty(2, 4, 50, dtype=dtype))
        torch.library.opcheck(torch.ops.twotower.lm_head_unmask.default, tuple(a.values()))


def test_plain_weights_compose_linear_and_threshold_unmask(gen):
    """A plain weight (CUDA's, training's) takes the composed path: F.linear, then threshold_unmask."""
    hidden, w, _, x = make(2, 6, 20, 300, torch.float32, gen)
    params = row_params(2, 6, gen, 1)
    a, b = x.clone(), x.clone()
    ca, da, la = ops.lm_head_unmask(hidden, w, a, MASK, logits=True, **params)
    want_logits = torch.nn.functional.linear(hidden, w)
    cb, db = ops.threshold_unmask(want_logits, b, MASK, **params)
    assert torch.equal(a, b) and torch.equal(ca, cb) and torch.equal(da, db) and torch.equal(la, want_logits)


def test_engine_tokens_do_not_depend_on_asking_for_top_logprobs():
    """The runner asks lm_head_unmask for the logits only for groups returning alternatives (every position
    computed then, not only the masked ones): the tokens are the same either way."""
    import twotower_ext as tt
    lm = tt.load(os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint"), dtype=torch.float32)
    prompts = [[1, 5, 9, 11], [1, 300, 301, 7, 8]]
    kw = dict(mode="diffusion", max_new_tokens=32, temperature=[0.0, 0.8], seed=5, eos_token_id=None, threshold=0.7)
    plain = lm.generate(prompts, **kw)
    top = lm.generate(prompts, logprobs=3, **kw)
    assert plain.new_tokens == top.new_tokens and len(top.top_logprobs[0]) == 32
