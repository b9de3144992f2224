"""The prefix cache (runtime/prefix_cache.py, runtime/prefix_store.py): chained keys, LRU eviction under a
budget (children first, pinned entries never), a zero budget off, entries never shared across models, dtypes
or expert formats; with the cache on every mode gives the tokens it gives with it off, on prompts that cross
several segment boundaries with ragged suffixes, alone, in a batch, through a DecodeCore with staggered
arrivals that share and extend a prefix, under eviction, and on the parity fixture; a restored row's context
state is bit for bit the one a cache-off prefill computes."""
import json
import os
import random

import pytest
import torch

import twotower_ext as tt
from conftest import step_staggered
from twotower_ext.models.cache import cache_row_bytes
from twotower_ext.runtime import DecodeCore, DecodeParams, Generator, Request
from twotower_ext.runtime.prefix_cache import PrefixCache, chunk_keys, plan_waves, root_key
from twotower_ext.runtime.prefix_store import PrefixStore, model_root

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
CKPT = os.path.join(DATA, "checkpoint")
SEGMENT = 16   # small segments: short prompts cross several boundaries
pytestmark = pytest.mark.usefixtures("one_thread")


def small_segments(model, segment: int = SEGMENT):
    """Segments of `segment` tokens; whole segments run the chunked SSD form, shorter ones the op (as on CUDA at
    the defaults, where both are 256), so the equalities below cover the boundary between the two forms."""
    model.prefill_segment = model.prefill_chunked_min_len = segment
    return model


@pytest.fixture(scope="module")
def lm():
    lm = tt.load(CKPT, dtype=torch.float32)
    small_segments(lm.model)
    return lm


@pytest.fixture
def rng():
    """Fresh prompts every run (the seed is printed with a failure's output)."""
    seed = random.randrange(2**31)
    print(f"prompt seed: {seed}")
    return random.Random(seed)


def with_cache(lm, budget: int = 1 << 24) -> Generator:
    return Generator(lm.model, prefix_cache_bytes=budget)


def gen(generator: Generator, prompts, **kw):
    return generator.generate(prompts, max_new_tokens=kw.pop("max_new_tokens", 20), **kw)


def shared_prompts(rng, n: int, shared_len: int = 53, suffix=(0, 40)):
    shared = [1] + [rng.randrange(4, 512) for _ in range(shared_len - 1)]
    return [shared + [rng.randrange(4, 512) for _ in range(rng.randint(*suffix))] for _ in range(n)]


# ------------------------------------------------------------------------------------------------------
# bookkeeping (no torch)

def test_keys_are_chained_and_cover_whole_segments_only():
    root = root_key("m")
    toks = list(range(100))
    keys = chunk_keys(root, toks, 16)
    assert len(keys) == 6 and len(set(keys)) == 6                      # 96 tokens: 6 whole segments
    changed = chunk_keys(root, toks[:40] + [7] + toks[41:], 16)        # a token of segment 2
    assert changed[:2] == keys[:2] and all(a != b for a, b in zip(changed[2:], keys[2:]))
    assert not set(chunk_keys(root_key("other"), toks, 16)) & set(keys)
    assert chunk_keys(root, toks[:15], 16) == []


def put_chain(pc: PrefixCache, root, toks, size=4, nbytes=10, state_at=()):
    keys = chunk_keys(root, toks, size)
    chunks = [toks[j * size:(j + 1) * size] for j in range(len(keys))]
    lease = pc.acquire(root, keys, chunks, len(toks))
    for j in range(lease.found, len(keys)):
        assert pc.insert(lease, j, f"kv{j}", nbytes)
    for j in state_at:
        pc.add_state(keys[j], f"state{j}", nbytes)
    pc.release(lease)
    return keys, chunks


def test_probe_hits_the_deepest_segment_with_a_state_and_verifies_tokens():
    pc, root = PrefixCache(1000), root_key("m")
    keys, chunks = put_chain(pc, root, list(range(16)), state_at=(1,))
    assert pc.probe(root, keys, chunks) == (4, 2)
    lease = pc.acquire(root, keys, chunks, 16)
    assert pc.payloads(lease) == (["kv0", "kv1"], "state1") and (pc.queries, pc.hits) == (32, 8)   # two lookups
    pc.release(lease)
    # a colliding key whose tokens or parent differ is not a hit
    bad = [list(c) for c in chunks]
    bad[1][0] += 1
    assert pc.probe(root, keys, bad) == (1, 0)
    assert pc.probe(root_key("other"), keys, chunks) == (0, 0)


def test_lru_eviction_takes_the_least_recent_chain_deepest_entry_first():
    pc, root = PrefixCache(60), root_key("m")          # room for 6 entries of 10 bytes
    a, _ = put_chain(pc, root, list(range(0, 12)))      # chain a: 3 entries
    b, _ = put_chain(pc, root, list(range(100, 112)))   # chain b: 3 entries, more recent
    c, _ = put_chain(pc, root, list(range(200, 208)))   # 2 more: a's two deepest go
    assert [k in pc.entries for k in a] == [True, False, False]
    assert all(k in pc.entries for k in b + c) and pc.evictions == 2 and pc.used == 60
    put_chain(pc, root, list(range(0, 4)))              # touch a's root: now b is the least recent
    put_chain(pc, root, list(range(300, 304)))
    assert [k in pc.entries for k in b] == [True, True, False] and a[0] in pc.entries


def test_a_pinned_entry_is_not_evicted():
    pc, root = PrefixCache(30), root_key("m")
    toks = list(range(12))
    keys = chunk_keys(root, toks, 4)
    chunks = [toks[j * 4:(j + 1) * 4] for j in range(3)]
    held = pc.acquire(root, keys, chunks, 12)
    for j in range(3):
        assert pc.insert(held, j, j, 10)
    other = list(range(50, 54))
    okeys = chunk_keys(root, other, 4)
    lease = pc.acquire(root, okeys, [other], 4)
    assert not pc.insert(lease, 0, "x", 10)             # full of pinned entries: not cached, nothing evicted
    assert all(k in pc.entries for k in keys) and pc.evictions == 0
    pc.release(lease)
    pc.release(held)
    lease = pc.acquire(root, okeys, [other], 4)
    assert pc.insert(lease, 0, "x", 10) and keys[2] not in pc.entries   # released: the deepest goes
    pc.release(lease)


def test_a_zero_budget_disables_the_cache(lm, rng):
    pc = PrefixCache(0)
    assert not pc.enabled
    keys = chunk_keys(root_key("m"), list(range(8)), 4)
    lease = pc.acquire(root_key("m"), keys, [list(range(4)), list(range(4, 8))], 8)
    assert not pc.insert(lease, 0, "kv", 1)
    g = with_cache(lm, 0)
    prompts = shared_prompts(rng, 2)
    res = gen(g, prompts)
    assert g.core.runner.prefix is None and "prefix_cache_hits" not in res.stats
    assert res.new_tokens == gen(Generator(lm.model), prompts).new_tokens
    with pytest.raises(ValueError, match="prefix_cache_gb must be a number of GiB >= 0"):
        tt.load(CKPT, prefix_cache_gb=-1)


def test_plan_waves_computes_shared_segments_once():
    a, b, c = ["a0", "a1", "a2"], ["a0", "a1", "b2"], ["c0"]
    waves, state = plan_waves([a, b, c, a], [0, 0, 0, 0], [0, 0, 0, 0])
    assert waves == [0, 1, 0, 1]
    assert state == {"a2", "b2", "c0", "a1"}   # last segments, and where b leaves what wave 0 computes
    waves, state = plan_waves([b], [2], [1])   # found 2, usable 1: recompute from 1, keep a state at a1
    assert waves == [0] and state == {"b2", "a1"}


# ------------------------------------------------------------------------------------------------------
# exactness

@pytest.mark.parametrize("mode", ["diffusion", "ar", "mock_ar"])
def test_restored_rows_hold_the_state_a_cache_off_prefill_computes(lm, mode, rng):
    """A prompt prefilled from a cached boundary: every cache tensor of its row (K/V up to its length, Mamba
    states, mock-AR's states before the last token, the length) and AR's logits are bit for bit those of a
    cache-off prefill of the prompt alone."""
    model = lm.model
    store = PrefixStore(model, 1 << 24)
    root = model_root(model)
    first = shared_prompts(rng, 1, shared_len=70, suffix=(0, 0))[0]   # 70 tokens: 4 whole segments (64)
    second = first + [rng.randrange(4, 512) for _ in range(rng.randint(5, 30))]
    snap = mode == "mock_ar"

    def prefill(cache, prompt, via_store):
        out = {}

        def run(rows, prompts, start=None, on_segment=None):
            out["logits"] = model.prefill(prompts, cache, rows, logits=mode == "ar", snapshot=snap, start=start,
                                          on_segment=on_segment)
        if via_store:
            store.prefill(root, cache, [1], [prompt], mode, run)
        else:
            run([1], [prompt])
        return out["logits"]

    warm = model.new_cache(2, 160, snapshot=snap)
    prefill(warm, first, True)
    assert store.stats()["prefix_cache_entries"] == 4
    got, want = model.new_cache(2, 160, snapshot=snap), model.new_cache(2, 160, snapshot=snap)
    lg, lw = prefill(got, second, True), prefill(want, second, False)
    assert store.stats()["prefix_cache_hits"] == 64
    if mode == "ar":
        assert torch.equal(lg, lw)
    n = len(second)
    assert got.lens_host == want.lens_host and torch.equal(got.lens, want.lens)
    for i in want.ctx.attention_layers():
        assert torch.equal(got.ctx.k[i][1, :n], want.ctx.k[i][1, :n]) and torch.equal(got.ctx.v[i][1, :n], want.ctx.v[i][1, :n])
    for i in want.ctx.mamba_layers():
        for name in ("conv", "ssm") + (("prev_conv", "prev_ssm") if snap else ()):
            assert torch.equal(getattr(got.ctx, name)[i][1], getattr(want.ctx, name)[i][1]), (i, name)


@pytest.mark.parametrize("mode", ["diffusion", "ar", "mock_ar"])
def test_cache_on_equals_cache_off_alone_and_in_a_batch(lm, mode, rng):
    prompts = shared_prompts(rng, 6)
    prompts.append(prompts[0][:48])              # a prompt that ends on a boundary
    prompts.append(prompts[1] + [9] * 20)        # one that extends another
    off, on = Generator(lm.model), with_cache(lm)
    kw = dict(mode=mode, temperature=[0.0, 0.9] * 4, seed=list(range(8)), logprobs=2)
    want = gen(off, prompts, **kw)
    for i, p in enumerate(prompts):              # one at a time: later prompts hit the earlier ones' entries
        res = gen(on, [p], mode=mode, temperature=kw["temperature"][i], seed=i, logprobs=2)
        assert res.new_tokens[0] == want.new_tokens[i] and res.nfe_per_block[0] == want.nfe_per_block[i], i
        assert res.logprobs[0] == want.logprobs[i] and res.top_logprobs[0] == want.top_logprobs[i], i   # bit for bit
    assert on.prefix.stats()["prefix_cache_hits"] > 0
    cold = with_cache(lm)                          # all at once on an empty cache: shared segments once
    res = gen(cold, prompts, **kw)
    assert res.new_tokens == want.new_tokens and res.nfe_per_block == want.nfe_per_block
    assert res.logprobs == want.logprobs and res.top_logprobs == want.top_logprobs
    assert res.stats["prefix_cache_hits"] >= 6 * 48 + 32   # 7 rows take the shared 48 (AR: 32 of the 48-token one)
    res = gen(cold, prompts, **kw)                 # again, warm
    assert res.new_tokens == want.new_tokens and res.stats["prefix_cache_hits"] > 0


def test_parity_fixture_gives_the_same_tokens_with_the_cache(lm):
    """Each mode on each prompt of the parity fixture (reference_compat, prompts <= 40 tokens) with 8-token
    segments, so its prompts cross boundaries: the same tokens and passes with the cache on as off."""
    golden = json.load(open(os.path.join(DATA, "golden.json")))
    prompts = {p["id"]: p["ids"] for p in golden["prompts"]}
    small_segments(lm.model, 8)
    try:
        on, off = with_cache(lm), Generator(lm.model)
        runs = {(r["mode"], r["prompt"]): r for r in golden["runs"]}.values()   # each mode on each prompt
        for run in runs:
            p = run["params"]
            kw = dict(mode={"mask_diffusion": "diffusion"}.get(run["mode"], run["mode"]),
                      max_new_tokens=p["max_new_tokens"], temperature=p["temperature"], reference_compat=True)
            if kw["mode"] == "diffusion":
                kw.update(block_size=p["block_size"], steps_per_block=p["steps_per_block"], threshold=p["gamma"])
            want = gen(off, [prompts[run["prompt"]]], **kw)
            res = gen(on, [prompts[run["prompt"]]], **kw)   # the prompt's first run fills the cache, the next hit
            assert (res.sequences, res.nfe_per_block) == (want.sequences, want.nfe_per_block), run["prompt"]
        assert on.prefix.stats()["prefix_cache_hits"] > 0
    finally:
        small_segments(lm.model)


# ------------------------------------------------------------------------------------------------------
# safety

def test_two_models_dtypes_and_expert_formats_never_share_entries(lm, rng):
    """One store shared by the parity model and a copy with perturbed context weights, or with fp8 experts:
    different roots, no hits across; a bf16 model cannot use an fp32 model's store at all."""
    store = PrefixStore(lm.model, 1 << 24)
    prompts = shared_prompts(rng, 3)   # the second saves a state where it leaves the first's chain
    base = DecodeCore(lm.model, 3, 128, prefix_cache=store)
    for p in prompts:
        base.submit([Request(p, DecodeParams(max_new_tokens=8).validate(512))])
        while base.step():
            pass
    assert store.stats()["prefix_cache_hits"] > 0
    other = small_segments(tt.load(CKPT, dtype=torch.float32).model)
    other.weights.context.embeddings.add_(1e-3)
    fp8 = small_segments(tt.load(CKPT, dtype=torch.float32, experts="fp8").model)
    roots = {model_root(m) for m in (lm.model, other, fp8)}
    assert len(roots) == 3
    for model in (other, fp8):
        hits = []
        for s in (store, PrefixStore(model, 1 << 24)):   # the shared store finds what an empty one does
            before = s.stats()["prefix_cache_hits"]
            core = DecodeCore(model, 3, 128, prefix_cache=s)
            reqs = [Request(p, DecodeParams(max_new_tokens=8).validate(512)) for p in prompts]
            core.submit(reqs)
            while core.step():
                pass
            hits.append(s.stats()["prefix_cache_hits"] - before)
            assert [r.tokens for r in reqs] == Generator(model).generate(prompts, max_new_tokens=8).new_tokens
        assert hits[0] == hits[1]
    bf16 = small_segments(tt.load(CKPT, dtype=torch.bfloat16).model)
    assert model_root(bf16) not in roots
    with pytest.raises(ValueError, match="made for another model layout"):
        DecodeCore(bf16, 2, 128, prefix_cache=store)


@pytest.mark.parametrize("budget_entries", [1000, 6])
def test_staggered_requests_that_share_and_extend_a_prefix(lm, budget_entries, rng):
    """A serving core smaller than the load: a conversation that grows turn by turn, requests that share its
    prefix and extend it, and unrelated ones, arriving over time, in every mode; each one's tokens are the
    ones it gets alone with the cache off. With a budget of 6 segments, entries are evicted while other rows'
    prefills read and write theirs (pinned: never theirs)."""
    turn = [1] + [rng.randrange(4, 512) for _ in range(30)]
    prompts = []
    for _ in range(6):
        turn = turn + [rng.randrange(4, 512) for _ in range(rng.randint(5, 25))]
        prompts += [turn, turn + [rng.randrange(4, 512) for _ in range(rng.randint(1, 9))],
                    [1] + [rng.randrange(4, 512) for _ in range(rng.randint(33, 47))]]   # and an unrelated one
    rows = [(p, dict(mode=["diffusion", "ar", "mock_ar"][i % 3], max_new_tokens=rng.randint(4, 12),
                     temperature=rng.choice([0.0, 0.8]), seed=i)) for i, p in enumerate(prompts)]
    kv, state = cache_row_bytes(lm.model.config, 4)
    store = PrefixStore(lm.model, budget_entries * SEGMENT * kv + 2 * state)
    core = DecodeCore(lm.model, max_rows=5, max_len=256, max_queue=64, prefix_cache=store)
    reqs = [Request(p, DecodeParams(**kw).validate(512)) for p, kw in rows]
    step_staggered(core, reqs, seed=rng.randrange(2**31))
    off = Generator(lm.model)
    for r, (p, kw) in zip(reqs, rows):
        res = off.generate([p], **kw)
        assert r.tokens == res.new_tokens[0], kw
    stats = store.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["prefix_cache_bytes"] <= stats["prefix_cache_budget_bytes"]
    assert all(e.pins == 0 for e in store.index.entries.values())
    if budget_entries == 6:
        assert stats["prefix_cache_evictions"] > 0


def test_metrics_report_queries_hits_and_memory(lm, rng):
    pytest.importorskip("prometheus_client", reason="the serve extra (prometheus_client) is not installed")
    from twotower_ext.serve import Scheduler

    sched = Scheduler(lm, max_batch=2, max_len=128, prefix_cache_gb=0.01)
    try:
        prompt = shared_prompts(rng, 1)[0]
        for _ in range(2):
            sched.submit(prompt, max_tokens=4).result(timeout=60)
        m = sched.metrics
        text = m.text()
    finally:
        sched.shutdown()
    assert m.value("prefix_cache_queries_total") == 2 * len(prompt)
    assert m.value("prefix_cache_hits_total") == (len(prompt) // SEGMENT) * SEGMENT
    assert 0 < m.value("prefix_cache_usage_bytes") <= m.value("prefix_cache_budget_bytes") == 0.01 * 2**30 // 1
    assert "# TYPE twotower:prefix_cache_hits_total counter" in text and "twotower:prefix_cache_hits_total{" in text
    off = Scheduler(lm, max_batch=1, max_len=64)
    try:
        assert "prefix_cache" not in off.metrics.text()
    finally:
        off.shutdown()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_on_equals_cache_off_on_cuda(dtype, rng):
    """On a GPU with CUDA graphs, at the default 256-token segments: 600-token prompts that share 520 tokens,
    one at a time in every mode, give the same tokens with the cache on as off (bf16 too: a request alone runs
    the same passes either way); in fp32 (TF32 off) also all at once on an empty cache."""
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = tt.load(CKPT, device="cuda", dtype=dtype)
    prompts = shared_prompts(rng, 4, shared_len=520, suffix=(60, 90))
    off, on = Generator(lm.model), with_cache(lm)
    for mode in ("diffusion", "ar", "mock_ar"):
        want = [gen(off, [p], mode=mode).new_tokens[0] for p in prompts]
        assert [gen(on, [p], mode=mode).new_tokens[0] for p in prompts] == want, mode
        if dtype == torch.float32:
            assert gen(with_cache(lm), prompts, mode=mode).new_tokens == want, mode
    assert on.prefix.stats()["prefix_cache_hits"] >= 3 * 2 * 256
