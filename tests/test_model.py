"""The two-tower model on the parity checkpoint against NVIDIA's reference outputs (golden.json), in fp32 on
CPU with TF32 off: context / mock-AR / denoiser logits to 1e-4 relative, greedy AR and mock-AR token
streams, and the engine-facing contract (ragged batches, row independence, cache rows, mirrors)."""
import json
import os

import types

import pytest
import torch

from twotower_ext.models import TwoTowerModel
from twotower_ext import ops
from twotower_ext.models import layers
from twotower_ext.models.weights import T_FREQ_DIM, MLPWeights, MoEWeights, TimeWeights
from twotower_ext.threads import using_threads

import oracle

HERE = os.path.dirname(__file__)
CKPT = os.path.join(HERE, "data", "parity", "checkpoint")
MASK = 3
pytestmark = pytest.mark.usefixtures("one_thread")   # a tiny model: a second thread only waits on the first


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(HERE, "data", "parity", "golden.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return TwoTowerModel.from_pretrained(CKPT, dtype=torch.float32)


def assert_logits(got, want, rel=1e-4):
    """Within `rel` of the reference, relative to the logits' scale."""
    want = torch.as_tensor(want, dtype=torch.float32)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=rel, atol=rel * want.abs().max().item())


def assert_same(got, want, rel=1e-5):
    """The same computation batched differently: equal up to matmul blocking (relative to the scale)."""
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * want.abs().max().item())


def prompts(golden):
    return {p["id"]: p["ids"] for p in golden["prompts"]}


# ----------------------------------------------------------------------------------------------------
# layers against the fp64 oracle (tests/oracle.py), on fresh random inputs: the golden logits below run in fp32,
# where a missing fp32 cast is invisible, and the training code imports these same functions


def test_rms_norm_fp32_and_bf16_bitwise(gen):
    x = torch.randn(37, 1001, generator=gen) * 3 + 0.5
    w = torch.randn(1001, generator=gen)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5).double(), oracle.rms_norm(x, w, 1e-5), rtol=4e-6, atol=4e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    got = ops.rms_norm(xb, wb, 1e-5)
    want, ambiguous = oracle.rms_norm_bf16(xb, wb, 1e-5)
    assert got.dtype == torch.bfloat16
    # The draw must be able to tell the reference's two roundings from one rounding of the product (what
    # multiplying by w in fp32 before the cast gives) on positions that are not ambiguous. A bound on the
    # ambiguous fraction does not say that, and fails on some draws: x is on the bf16 lattice, so a row
    # whose 1/rms lies near a dyadic rational with a small numerator (e.g. 21/32) puts a large share of that
    # row near bf16 midpoints at once (ambiguity comes in whole-row clusters, not as independent positions).
    one_rounding = (oracle.rms_norm(xb, wb, 1e-5)).to(torch.bfloat16)
    assert ((one_rounding != want) & ~ambiguous).any(), "this draw cannot tell the rounding orders apart"
    differ = (got.view(torch.int16) != want.view(torch.int16)) & ~ambiguous
    assert not differ.any(), f"{int(differ.sum())} bf16 outputs differ from normalise-in-fp32-then-cast"


def _router_case(gen, E=16, hidden=24, T=96):
    """Experts 8..15 duplicate experts 0..7 (router rows and correction bias): every choice value is tied."""
    router = torch.randn(E, hidden, generator=gen)
    router[E // 2:] = router[:E // 2]
    bias = torch.randn(E, generator=gen) * 0.1
    bias[E // 2:] = bias[:E // 2]
    return torch.randn(T, hidden, generator=gen), router, bias


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_route_matches_oracle_with_exact_ties(gen, n_group, topk_group):
    """NVIDIA's router breaks exact ties as torch.topk does (not lowest index first). k = 3 of duplicated pairs:
    the third pick always splits a tied pair."""
    x, router, bias = _router_case(gen)
    cfg = types.SimpleNamespace(n_group=n_group, topk_group=topk_group, n_routed_experts=16, num_experts_per_tok=3,
                                norm_topk_prob=True, routed_scaling_factor=2.5)
    w = MoEWeights(router, bias, None, None, None)
    idx, weights = layers.route(x, w, cfg)
    want_idx, want_w = oracle.route(x, router, bias, 3, n_group, topk_group, True, 2.5)
    order = idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), want_idx), "chosen experts differ (tie order)"
    torch.testing.assert_close(weights.gather(1, order), want_w, rtol=1e-12, atol=1e-12)


def test_moe_matches_oracle(gen):
    E, hidden, inter, T = 6, 20, 12, 9
    x = torch.randn(T, hidden, generator=gen)
    rnd = lambda *s: torch.randn(*s, generator=gen) * 0.3  # noqa: E731
    w = MoEWeights(rnd(E, hidden), rnd(E) * 0.1, rnd(E, inter, hidden), rnd(E, hidden, inter),
                   MLPWeights(rnd(inter, hidden), rnd(hidden, inter)))
    cfg = types.SimpleNamespace(n_group=1, topk_group=1, n_routed_experts=E, num_experts_per_tok=2,
                                norm_topk_prob=True, routed_scaling_factor=1.7)
    got = layers.moe(x.view(3, 3, hidden), w, cfg)
    want = oracle.moe(x.view(3, 3, hidden), w.router, w.bias, w.up, w.down, w.shared.up, w.shared.down, 2,
                      scaling=1.7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_time_modulation_matches_oracle(gen, dtype, rel):
    H = 24
    rnd = lambda *s: (torch.randn(*s, generator=gen) * 0.2).to(dtype)  # noqa: E731
    w = TimeWeights(rnd(H, T_FREQ_DIM), rnd(H), rnd(H, H), rnd(H), rnd(3 * H, H), rnd(3 * H), None)
    t = torch.cat([torch.rand(5, generator=gen), torch.tensor([0.0, 1.0, 1 / 16])])
    got = layers.time_modulation(t, w, dtype)
    want = oracle.time_modulation(t, w.emb0_w, w.emb0_b, w.emb2_w, w.emb2_b, w.block_w, w.block_b, dtype, T_FREQ_DIM)
    assert got.shape == (8, 3, H) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * want.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# golden logits


def test_context_last_logits(model, golden):
    num = golden["numeric"]
    cache = model.new_cache(1, 64)
    assert_logits(model.prefill([num["prompt_ids"]], cache)[0], num["context_last_logits"])
    assert cache.lens_host == [len(num["prompt_ids"])] and cache.lens.tolist() == cache.lens_host


def test_mock_ar_first_logits(model, golden):
    num = golden["numeric"]
    ids = num["prompt_ids"]
    cache = model.new_cache(1, 64, snapshot=True)
    ctx_logits = model.prefill([ids], cache, snapshot=True)  # prompt[:-1], snapshot, then the last token
    assert_logits(ctx_logits[0], num["context_last_logits"])
    assert_logits(model.mock_ar(torch.tensor([ids[-1]]), cache)[0], num["mock_ar_first_logits"])


@pytest.mark.parametrize("step", range(3))
def test_denoiser_steps(model, golden, step):
    num = golden["numeric"]
    s = num["denoiser_steps"][step]
    cache = model.new_cache(1, 128)
    model.prefill([num["prompt_ids"]], cache, logits=False)
    new = num["denoiser_run_new_ids"]
    for b in range(s["block"]):  # committed blocks before this one
        model.extend(torch.tensor([new[16 * b:16 * b + 16]]), cache)
    x = torch.tensor([s["xt_in"]])
    assert_logits(model.denoise(x, cache, s["t"])[0], s["logits"])
    assert_logits(model.denoise(x, cache, torch.tensor([s["t"]]), )[0], s["logits"])


# ----------------------------------------------------------------------------------------------------
# greedy AR and mock-AR token streams, all prompts batched (ragged) in one cache


def _runs(golden, mode):
    runs = [r for r in golden["runs"] if r["mode"] == mode]
    assert runs
    return runs


def test_greedy_ar_runs_batched(model, golden):
    runs, ps = _runs(golden, "ar"), prompts(golden)
    cache = model.new_cache(len(runs) + 1, 128)
    rows = list(range(1, len(runs) + 1))  # leave row 0 alone: rows address the cache
    logits = model.prefill([ps[r["prompt"]] for r in runs], cache, rows=rows)
    out = []
    for _ in range(max(len(r["new_ids"]) for r in runs)):
        tok = logits.argmax(-1)
        out.append(tok)
        logits = model.decode(tok, cache, rows=rows)
    got = torch.stack(out, 1)
    for i, r in enumerate(runs):
        assert got[i, :len(r["new_ids"])].tolist() == r["new_ids"], f"AR run on {r['prompt']}"
    assert cache.lens_host[0] == 0


def test_greedy_mock_ar_runs_batched(model, golden):
    runs, ps = _runs(golden, "mock_ar"), prompts(golden)
    cache = model.new_cache(len(runs), 128, snapshot=True)
    model.prefill([ps[r["prompt"]] for r in runs], cache, logits=False, snapshot=True)
    last = torch.tensor([ps[r["prompt"]][-1] for r in runs])
    out = []
    for _ in range(max(len(r["new_ids"]) for r in runs)):
        tok = model.mock_ar(last, cache).argmax(-1)
        out.append(tok)
        model.extend(tok[:, None], cache, snapshot=True)
        last = tok
    got = torch.stack(out, 1)
    for i, r in enumerate(runs):
        assert got[i, :len(r["new_ids"])].tolist() == r["new_ids"], f"mock-AR run on {r['prompt']}"


# ----------------------------------------------------------------------------------------------------
# engine contract


def test_rows_are_independent(model, golden, gen):
    """A ragged batch gives each row what it gets alone, bit for bit (fp32 on the CPU), for prefill, extension
    and the denoiser, and calls on some rows leave the others untouched."""
    ps = list(prompts(golden).values())
    order = [2, 0, 1]
    cache = model.new_cache(4, 96)
    rows = [3, 0, 2]
    batch_logits = model.prefill([ps[i] for i in order], cache, rows=rows)
    blocks = torch.randint(4, 512, (3, 16), generator=gen)
    model.extend(blocks, cache, rows=rows)
    x = blocks.clone()
    x[:, ::3] = MASK
    t = torch.tensor([0.25, 0.5, 1.0])
    batch_den = model.denoise(x, cache, t, rows=rows)
    for j, i in enumerate(order):
        single = model.new_cache(1, 96)
        assert torch.equal(model.prefill([ps[i]], single)[0], batch_logits[j])
        model.extend(blocks[j:j + 1], single)
        assert torch.equal(model.denoise(x[j:j + 1], single, t[j:j + 1])[0], batch_den[j])
    assert cache.lens_host == [len(ps[0]) + 16, 0, len(ps[1]) + 16, len(ps[2]) + 16]
    # contiguous rows (views) and index rows agree
    sel = [2, 0]  # cache rows 2, 3
    assert torch.equal(model.denoise(x[sel], cache, t[sel], rows=slice(2, 4)), batch_den[sel])


@pytest.mark.parametrize("nthreads", [1, 2])
def test_rows_are_bit_for_bit_independent_at_prefill_sizes(model, gen, nthreads):
    """fp32 on the CPU at prefill sizes: a ragged batch of long prompts (256-token segments of 5 rows: 1,280-row
    linears, hundreds of rows per expert; contexts past the attention's 1,024-key split) leaves in each row's cache
    exactly the bits that row's prefill alone leaves, and the denoiser and an extension give it the same logits, the
    batch at 1 or 2 threads, each row alone at 1 (docs/semantics.md: batch invariance)."""
    lens = [1300, 1100, 257, 900, 1250]
    ps = [[1] + torch.randint(4, 512, (n - 1,), generator=gen).tolist() for n in lens]
    blocks = torch.randint(4, 512, (5, 16), generator=gen)
    x = blocks.clone()
    x[:, 1::2] = MASK
    t = torch.tensor([1.0, 0.5, 0.25, 0.5, 1.0])

    def run(prompts, blk, xs, ts):
        cache = model.new_cache(len(prompts), 1400)
        logits = model.prefill(prompts, cache)
        den = model.denoise(xs, cache, ts)
        ext = model.extend(blk, cache, logits=True)
        return cache, logits, den, ext

    with using_threads(nthreads):
        batch = run(ps, blocks, x, t)
    for j in range(5):
        alone = run([ps[j]], blocks[j:j + 1], x[j:j + 1], t[j:j + 1])
        for got, want in zip(alone[1:], batch[1:]):
            assert torch.equal(got[0], want[j]), j
        c, b, n = alone[0].ctx, batch[0].ctx, lens[j] + 16
        assert alone[0].lens_host[0] == batch[0].lens_host[j] == n
        for i in c.attention_layers():
            assert torch.equal(c.k[i][0, :n], b.k[i][j, :n]) and torch.equal(c.v[i][0, :n], b.v[i][j, :n]), (j, i)
        for i in c.mamba_layers():
            assert torch.equal(c.conv[i][0], b.conv[i][j]) and torch.equal(c.ssm[i][0], b.ssm[i][j]), (j, i)


def test_extension_equals_longer_prefill_and_decode_equals_extend(model, golden):
    ids = prompts(golden)["p2"]
    a = model.new_cache(1, 64)
    want = model.prefill([ids], a)
    b = model.new_cache(1, 64)
    model.prefill([ids[:11]], b, logits=False)
    model.extend(torch.tensor([ids[11:27]]), b)
    got = model.extend(torch.tensor([ids[27:-1]]), b, logits=True)
    got = model.decode(torch.tensor(ids[-1:]), b)
    assert_same(got, want)
    x = torch.full((1, 16), MASK)
    assert_same(model.denoise(x, b, 1.0), model.denoise(x, a, 1.0))


def test_denoiser_reads_but_never_writes_the_cache(model, golden):
    cache = model.new_cache(2, 64, snapshot=True)
    model.prefill([prompts(golden)["p0"], prompts(golden)["p1"]], cache, snapshot=True, logits=False)
    before = [t.clone() for t in cache.ctx.conv + cache.ctx.ssm + cache.ctx.k + cache.ctx.prev_ssm if t is not None]
    model.denoise(torch.full((2, 16), MASK), cache, torch.tensor([1.0, 0.5]))
    model.mock_ar(torch.tensor([5, 6]), cache)
    after = [t for t in cache.ctx.conv + cache.ctx.ssm + cache.ctx.k + cache.ctx.prev_ssm if t is not None]
    assert all(torch.equal(u, v) for u, v in zip(before, after))


def test_mirrored_denoiser_store_matches(model, golden, gen):
    """A separate denoiser-side copy of the cache (what a second device gets) stays in step."""
    ps = prompts(golden)
    plain, mirrored = model.new_cache(3, 96, snapshot=True), model.new_cache(3, 96, snapshot=True, mirror=True)
    assert mirrored.den is not mirrored.ctx
    blk = torch.randint(4, 512, (2, 16), generator=gen)
    for c in (plain, mirrored):
        model.prefill([ps["p1"], ps["p0"]], c, rows=[2, 0], logits=False, snapshot=True)
        model.extend(blk, c, rows=[0, 2], snapshot=True)
    x = torch.full((2, 16), MASK)
    assert torch.equal(model.denoise(x, mirrored, 0.5, rows=[2, 0]), model.denoise(x, plain, 0.5, rows=[2, 0]))
    assert torch.equal(model.mock_ar(blk[:, -1], mirrored, rows=[0, 2]), model.mock_ar(blk[:, -1], plain, rows=[0, 2]))


def test_bfloat16_model_tracks_fp32(model, golden):
    num = golden["numeric"]
    m16 = TwoTowerModel.from_pretrained(CKPT, dtype=torch.bfloat16)
    cache = m16.new_cache(1, 64)
    logits = m16.prefill([num["prompt_ids"]], cache)
    assert logits.dtype == torch.float32
    assert_logits(logits[0], num["context_last_logits"], rel=5e-2)
    s = num["denoiser_steps"][0]
    assert_logits(m16.denoise(torch.tensor([s["xt_in"]]), cache, s["t"])[0], s["logits"], rel=5e-2)
    assert cache.ctx.ssm[0].dtype == torch.float32 and cache.ctx.conv[0].dtype == torch.bfloat16


@pytest.mark.parametrize("call,words", [
    (lambda m, c: m.extend(torch.ones(1, 60, dtype=torch.long), c), "capacity"),
    (lambda m, c: m.prefill([list(range(5, 70))], c), "capacity"),
    (lambda m, c: m.prefill([[5, 6], [7]], c, rows=[0]), "2 prompts for 1 cache rows"),
    (lambda m, c: m.prefill([[]], c), "at least one token"),
    (lambda m, c: m.mock_ar(torch.tensor([5]), c), "snapshot=True"),
    (lambda m, c: m.denoise(torch.full((2, 16), MASK), c, 1.0), r"\[1, S\]"),
    (lambda m, c: m.denoise(torch.full((1, 16), MASK), c, torch.ones(3)), "t must be"),
    (lambda m, c: m.extend(torch.ones(1, 2, dtype=torch.long), c, rows=[4]), "outside the cache"),
])
def test_bad_calls_are_refused(model, call, words):
    cache = model.new_cache(1, 64)
    model.prefill([[5, 6, 7, 8, 9, 10]], cache, logits=False)
    with pytest.raises(ValueError, match=words):
        call(model, cache)
