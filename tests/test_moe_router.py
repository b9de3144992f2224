"""moe_route (csrc/moe_router/): the fused router against the fp64 oracle (tests/oracle.py route) and the reference;
torch.topk's tie order on heavily tied inputs (integer-valued, so every summation order gives the same logits, and
duplicated router rows); NaN; bad input; threads; the fake (meta) registration; the wrapper's fallbacks."""
import math

import pytest
import torch

from twotower_ext import ops, reference
from twotower_ext.threads import using_threads

import oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (n_group, topk_group) configurations; those that do not fit E (E % n_group, < 2 experts per group) are skipped
GROUPS = [(1, 1), (2, 1), (4, 2), (8, 3), (8, 8), (3, 2)]


ISAS = [i for i in ("scalar", "avx2", "avx512") if i in ops.cpu_isas()]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Each path of the dot products in turn (TWOTOWER_ROUTE_CPU_ISA)."""
    monkeypatch.setenv("TWOTOWER_ROUTE_CPU_ISA", request.param)
    return request.param


def groups_for(E):
    return [(g, tg) for g, tg in GROUPS if E % g == 0 and (g == 1 or E // g >= 2)]


def make(gen, T, H, E, dtype=torch.float32):
    x = torch.randn(T, H, generator=gen).to(dtype)
    router = torch.randn(E, H, generator=gen, dtype=torch.float64) / math.sqrt(H)
    bias = torch.randn(E, generator=gen, dtype=torch.float64) * 0.1
    return x, router, bias


def sigmoid_each(logits):
    """1 / (1 + exp(-l)) one element at a time (the C library's exp, as the kernel): equal logits, equal scores.
    torch's vectorised sigmoid rounds a tensor's last few elements through another exp than the rest, which can
    split an exact tie (seen: E = 130, T = 33), so the tie tests do not use it."""
    u, inv = torch.unique(logits, return_inverse=True)
    return torch.tensor([1.0 / (1.0 + math.exp(-v)) for v in u.tolist()], dtype=torch.float64)[inv]


def route(x, router, bias, k, n_group=1, topk_group=1, norm=True, scaling=2.5):
    return torch.ops.twotower.moe_route(x, router, bias, k, n_group, topk_group, norm, scaling)


# ----------------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,k", [(8, 3), (16, 4), (128, 6)])
@pytest.mark.parametrize("H", [17, 336])
@pytest.mark.parametrize("T", [0, 1, 7, 33])
def test_matches_oracle_and_reference(gen, T, H, E, k, dtype):
    x, router, bias = make(gen, T, H, E, dtype)
    for n_group, topk_group in [(1, 1), (4, 2)]:
        for norm in (True, False):
            ids, w = route(x, router, bias, k, n_group, topk_group, norm, 2.5)
            assert ids.shape == (T, k) and ids.dtype == torch.int64 and w.shape == (T, k) and w.dtype == torch.float64
            want_ids, want_w = oracle.route(x, router, bias, k, n_group, topk_group, norm, 2.5)
            order = ids.argsort(-1)
            assert torch.equal(ids.gather(1, order), want_ids), (n_group, norm)
            torch.testing.assert_close(w.gather(1, order), want_w, rtol=1e-12, atol=1e-12)
            # the reference: the same ids in the same order (torch.topk's), weights to fp64 rounding
            ref_ids, ref_w = reference.moe_route(x, router, bias, k, n_group, topk_group, norm, 2.5)
            assert torch.equal(ids, ref_ids), (n_group, norm)
            torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H", [5, 17, 336])
def test_every_isa_matches_the_oracle(gen, isa, H):
    x, router, bias = make(gen, 33, H, 130, torch.bfloat16)
    ids, w = route(x, router, bias, 7, 2, 1)
    want_ids, want_w = oracle.route(x, router, bias, 7, 2, 1, True, 2.5)
    order = ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), want_ids)
    torch.testing.assert_close(w.gather(1, order), want_w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H", [5, 17, 320])
def test_fp32_router_gives_the_fp64_bits(gen, isa, H):
    """The CPU loader keeps the router weight in fp32 (the checkpoint's values); the kernel widens it exactly, so
    the ids and weights equal those from the same values held in fp64, on every path (tails of 1..7 included)."""
    x, router, bias = make(gen, 9, H, 24, torch.bfloat16)
    r32 = router.float()
    ids, w = route(x, r32, bias, 4, 4, 2)
    ids64, w64 = route(x, r32.double(), bias, 4, 4, 2)
    assert torch.equal(ids, ids64) and torch.equal(w, w64)


def test_isa_variable_is_checked(monkeypatch):
    monkeypatch.setenv("TWOTOWER_ROUTE_CPU_ISA", "sse")
    x, router, bias = make(torch.Generator(), 2, 8, 8)
    with pytest.raises(ValueError, match="TWOTOWER_ROUTE_CPU_ISA must be scalar, avx2 or avx512"):
        route(x, router, bias, 2)


def test_strided_rows(gen):
    """x, router and bias views with row (element) strides: read in place, same result as the contiguous copies."""
    xb = torch.randn(20, 50, generator=gen)
    rb = torch.randn(32, 60, generator=gen, dtype=torch.float64)
    bb = torch.randn(32, generator=gen, dtype=torch.float64) * 0.1
    x, router, bias = xb[::2, 3:40], rb[::2, 5:42], bb[::2]
    got = route(x, router, bias, 5, 4, 2)
    want = route(x.contiguous(), router.contiguous(), bias.contiguous(), 5, 4, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------------
# ties: torch.topk(sorted=False)'s selection and output order


def tied_inputs(gen, T, H, E, dtype, kind):
    if kind == "integer":
        # small integers (router halves, bias eighths): exact logits in any summation order, few distinct values,
        # so exact ties everywhere, within and across groups and between group scores
        x = torch.randint(-1, 2, (T, H), generator=gen).to(dtype)
        router = torch.randint(-1, 2, (E, H), generator=gen).double() * 0.5
        bias = torch.randint(-2, 3, (E,), generator=gen).double() * 0.125
    else:
        # duplicated router rows and biases (shuffled): every expert has an exactly tied twin
        x, router, bias = make(gen, T, H, E, dtype)
        perm = torch.randperm(E, generator=gen)
        router, bias = torch.cat([router[:E // 2]] * 2)[perm], torch.cat([bias[:E // 2]] * 2)[perm]
    return x, router, bias


def expected_tied(x, router, bias, k, n_group, topk_group, norm, scaling):
    scores = sigmoid_each(x.double() @ router.T)
    return reference.moe_route_select(scores, bias, k, n_group, topk_group, norm, scaling)


@pytest.mark.parametrize("kind", ["integer", "duplicated"])
@pytest.mark.parametrize("E", [8, 16, 128, 129, 130])
def test_ties_follow_torch_topk(gen, E, kind, isa):
    """k from 1 to E (both of ATen's paths: partial_sort when k * 64 <= E, nth_element otherwise), grouped and not:
    the ids equal torch.topk's on the same choice values, element for element (its selection among tied experts AND
    its output order)."""
    if kind == "duplicated" and E % 2:
        pytest.skip("duplicated rows need an even E")
    ks = range(1, E + 1) if E <= 16 else [1, 2, 3, 6, 31, 63, 64, 65, E - 1, E]
    x, router, bias = tied_inputs(gen, 33, 6 if kind == "integer" else 17, E, torch.float32, kind)
    checked = 0
    for n_group, topk_group in groups_for(E):
        for k in ks:
            ids, w = route(x, router, bias, k, n_group, topk_group)
            want_ids, want_w = expected_tied(x, router, bias, k, n_group, topk_group, True, 2.5)
            assert torch.equal(ids, want_ids), f"E {E} k {k} groups ({n_group}, {topk_group}): ids differ"
            torch.testing.assert_close(w, want_w, rtol=1e-12, atol=1e-12)
            checked += 1
    assert checked >= len(ks)
    if kind == "integer":
        # the draw is tied: many tokens have equal choices straddling the k-th place for some k
        choice = sigmoid_each(x.double() @ router.T) + bias
        tied = (choice.sort(-1).values.diff(dim=-1) == 0).any(-1)
        assert tied.any() and (E < 16 or tied.float().mean() > 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_with_every_x_dtype_and_no_norm(gen, dtype):
    x, router, bias = tied_inputs(gen, 7, 336, 16, dtype, "integer")
    for n_group, topk_group in [(1, 1), (4, 2)]:
        ids, w = route(x, router, bias, 5, n_group, topk_group, False, 1.0)
        want_ids, want_w = expected_tied(x, router, bias, 5, n_group, topk_group, False, 1.0)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w, rtol=1e-12, atol=1e-12)


def test_masked_groups_take_zero_not_minus_inf():
    """A masked group's choices become 0.0 (the reference's masked_fill value), so they beat a kept group's
    negative choices."""
    x = torch.ones(1, 4)
    router = torch.zeros(8, 4, dtype=torch.float64)       # every score 0.5
    bias = torch.tensor([-0.6, -0.7, -0.8, -0.9, -2.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    # group 0 (choices -0.1 ... -0.4) is kept, group 1 (-1.5 each) masked to 0.0: its experts win
    ids, _ = route(x, router, bias, 2, n_group=2, topk_group=1)
    assert set(ids[0].tolist()) <= {4, 5, 6, 7}, ids
    assert torch.equal(ids, reference.moe_route(x, router, bias, 2, 2, 1)[0])


# ----------------------------------------------------------------------------------------------------
# NaN, threads, shapes


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_nan_in_x_gives_nan_weights_for_that_token_only(gen, n_group, topk_group):
    x, router, bias = make(gen, 9, 40, 16)
    clean = route(x, router, bias, 4, n_group, topk_group)
    x[3, 7] = float("nan")
    ids, w = route(x, router, bias, 4, n_group, topk_group)
    assert w[3].isnan().all(), "a NaN token must not get a plausible routing"
    keep = torch.arange(9) != 3
    assert torch.equal(ids[keep], clean[0][keep]) and torch.equal(w[keep], clean[1][keep])
    # the ids among the all-NaN choices are torch.topk's (NaN ranks above every number, all NaNs tie)
    assert torch.equal(ids, reference.moe_route(x, router, bias, 4, n_group, topk_group, True, 2.5)[0])
    for norm in (True, False):
        assert route(x, router, bias, 4, n_group, topk_group, norm)[1][3].isnan().all()


def test_threads_give_the_single_thread_bits(gen):
    x, router, bias = make(gen, 2051, 336, 128, torch.bfloat16)
    with using_threads(1):
        one = route(x, router, bias, 6, 8, 4)
    with using_threads(2):
        two = route(x, router, bias, 6, 8, 4)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    # and a token's result does not depend on its neighbours (tiles of 4 tokens)
    part = route(x[5:12], router, bias, 6, 8, 4)
    assert torch.equal(part[0], one[0][5:12]) and torch.equal(part[1], one[1][5:12])


@pytest.mark.parametrize("H", [336, 37])
def test_a_lone_token_gets_its_tiles_bits(gen, isa, H):
    """A call of one token (an AR step's) computes a one-row tile: the same logits bit for bit as inside a tile of 4,
    on every instruction set (router in fp32 and fp64)."""
    x, router, bias = make(gen, 9, H, 64, torch.bfloat16)
    for r in (router, router.float()):
        many = route(x, r, bias, 6, 8, 4)
        for t in range(9):
            one = route(x[t:t + 1], r, bias, 6, 8, 4)
            assert torch.equal(one[0], many[0][t:t + 1]) and torch.equal(one[1], many[1][t:t + 1]), t


def test_fake_shapes_and_opcheck(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, router, bias = make(gen, 5, 24, 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.twotower.moe_route.default, (x, router, bias, 3, 4, 2, True, 2.5))
    torch.library.opcheck(torch.ops.twotower.moe_route.default, (x[:0], router, bias, 16, 1, 1, False, 1.0))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        ids, w = torch.ops.twotower.moe_route(fx, mode.from_tensor(router), mode.from_tensor(bias), 3)
        assert ids.shape == (5, 3) and ids.dtype == torch.int64 and w.shape == (5, 3) and w.dtype == torch.float64


def _bad_cases():
    x, router, bias = torch.randn(4, 12), torch.randn(16, 12, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    ok = dict(x=x, router=router, bias=bias, k=3, n_group=4, topk_group=2)
    return [
        (dict(ok, x=x.int()), TypeError, "x must be float32, bfloat16 or float16"),
        (dict(ok, x=x.double()), TypeError, "x must be float32, bfloat16 or float16"),
        (dict(ok, router=router.half()), TypeError, "router must be float64 or float32"),
        (dict(ok, bias=bias.float()), TypeError, "bias must be Double"),
        (dict(ok, x=x.view(2, 2, 12)), RuntimeError, r"x must be \[tokens, hidden\]"),
        (dict(ok, router=router[:, :11]), RuntimeError, r"router must be \[experts, hidden = 12\]"),
        (dict(ok, router=router[0]), RuntimeError, r"router must be \[experts, hidden = 12\]"),
        (dict(ok, bias=bias[:15]), RuntimeError, r"bias must be \[experts = 16\]"),
        (dict(ok, k=17), RuntimeError, r"k must be in \[1, experts = 16\], got 17"),
        (dict(ok, k=0), RuntimeError, r"k must be in \[1, experts = 16\], got 0"),
        (dict(ok, n_group=3), RuntimeError, "n_group must be >= 1 and divide experts = 16, got 3"),
        (dict(ok, n_group=0), RuntimeError, "n_group must be >= 1"),
        (dict(ok, n_group=16, topk_group=2), RuntimeError, "n_group = 16 leaves fewer than 2 experts per group"),
        (dict(ok, topk_group=5), RuntimeError, r"topk_group must be in \[1, n_group = 4\], got 5"),
        (dict(ok, topk_group=0), RuntimeError, r"topk_group must be in \[1, n_group = 4\], got 0"),
        (dict(ok, x=torch.randn(12, 4).t()), RuntimeError, "x must have a contiguous last dimension"),
        (dict(ok, router=torch.randn(12, 16, dtype=torch.float64).t()), RuntimeError,
         "router must have a contiguous last dimension"),
    ]


@pytest.mark.parametrize("args,exc,words", _bad_cases())
def test_bad_input_names_the_argument(args, exc, words):
    with pytest.raises(exc, match=words) as info:
        torch.ops.twotower.moe_route(*args.values())
    assert len(str(info.value).strip().splitlines()) == 1, str(info.value)


# ----------------------------------------------------------------------------------------------------
# the wrapper


def test_wrapper_converts_router_and_falls_back(gen):
    x, router, bias = make(gen, 6, 20, 16)
    got = ops.moe_route(x, router.float(), bias.float(), 3, 4, 2, True, 2.5)
    want = route(x, router.float().double(), bias.float().double(), 3, 4, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # fp64 x: the reference (the kernel takes fp32/bf16/fp16)
    ids, w = ops.moe_route(x.double(), router, bias, 3, 4, 2, True, 2.5)
    assert torch.equal(ids, route(x, router, bias, 3, 4, 2)[0])
    # autograd: the reference, differentiable through the router weight (training)
    r = router.float().requires_grad_()
    ids, w = ops.moe_route(x, r, bias.float(), 3, 4, 2, True, 2.5)
    assert w.requires_grad
    # Not w.sum(): renormalised weights sum to the scaling factor, so its gradient is zero up to rounding (and
    # exactly zero on some draws); weighting the k choices unequally gives a gradient that is not.
    (w * torch.arange(1.0, 4.0, dtype=w.dtype)).sum().backward()
    assert r.grad is not None and r.grad.abs().sum() > 0
    with torch.no_grad():
        ids2, w2 = ops.moe_route(x, r, bias.float(), 3, 4, 2, True, 2.5)   # no grad needed: the kernel
    assert not w2.requires_grad and torch.equal(ids2, ids)
    old = ops.use_reference(True)
    try:
        ref = ops.moe_route(x, router, bias, 3, 4, 2, True, 2.5)
    finally:
        ops.use_reference(old)
    kernel = route(x, router, bias, 3, 4, 2)
    assert torch.equal(ref[0], kernel[0])
    torch.testing.assert_close(ref[1], kernel[1], rtol=1e-12, atol=1e-12)
