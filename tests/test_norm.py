"""The layer norms (ops.rms_norm, ops.add_rms_norm, ops.gated_rms_norm; csrc/norm/norm.h) against their plain
PyTorch references and the fp64 oracle: bitwise equal to the reference where the sum of squares is exact in any
order (the only place the kernel's order may differ), within dtype-scaled bounds of the oracle otherwise; odd sizes,
strided operands, every dtype, NaN, threads, bad input, fake tensors, autograd (the reference)."""
import pytest
import torch

from twotower_ext import ops, reference
from twotower_ext.threads import using_threads

import oracle
from conftest import tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def ints(gen, *shape, lo=-8, hi=9):
    """Integers as floats: their squares and every partial sum of them are exact in fp32 (|sum| < 2^24)."""
    return torch.randint(lo, hi, shape, generator=gen).float()


def pow2(gen, *shape):
    """Random +-{0.5, 1, 2}: products with them are exact."""
    mag = 2.0 ** torch.randint(-1, 2, shape, generator=gen).float()
    return torch.where(torch.rand(shape, generator=gen) < 0.5, -mag, mag)


def assert_bitwise(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} elements differ"


def mods(gen, groups, H, dtype):
    m = (torch.randn(groups, 3, H, generator=gen) * 0.5).to(dtype)
    return m.unbind(1)   # strided rows, as the denoiser passes them


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16, 336), (3, 5, 1001), (2, 1, 37), (4, 8), (7, 1)])
def test_rms_norm_bitwise_when_sums_are_exact(dtype, shape, gen):
    H = shape[-1]
    x = ints(gen, *shape).to(dtype)
    w = torch.randn(H, generator=gen).to(dtype)
    got = ops.rms_norm(x, w, EPS)
    assert_bitwise(got, reference.rms_norm(x, w, EPS))
    # Modulation after the norm: random shift / scale (the sum of squares stays exact).
    shift, scale, _ = mods(gen, shape[0], H, dtype)
    assert_bitwise(ops.rms_norm(x, w, EPS, shift, scale), reference.rms_norm(x, w, EPS, shift, scale))
    # Before the norm: 1 + scale a power of two, shift integers, so the modulated rows' squares stay exact.
    scale = (pow2(gen, shape[0], H).abs() - 1).to(dtype)
    shift = ints(gen, shape[0], H, lo=-2, hi=3).to(dtype)
    assert_bitwise(ops.rms_norm(x, w, EPS, shift, scale, True), reference.rms_norm(x, w, EPS, shift, scale, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
def test_add_rms_norm_bitwise_when_sums_are_exact(dtype, gated, gen):
    B, S, H = 3, 7, 45
    x, add = ints(gen, B, S, H).to(dtype), ints(gen, B, S, H).to(dtype)
    gate = pow2(gen, B, H).to(dtype) if gated else None
    w = torch.randn(H, generator=gen).to(dtype)
    shift, scale, _ = mods(gen, B, H, dtype)
    for kw in ({}, {"shift": shift, "scale": scale}):
        got_h, got_s = ops.add_rms_norm(x, add, gate, w, EPS, **kw)
        want_h, want_s = reference.add_rms_norm(x, add, gate, w, EPS, **kw)
        assert_bitwise(got_s, want_s)
        assert_bitwise(got_h, want_h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("modulate_first", [False, True])
def test_add_rms_norm_matches_fp64_oracle(dtype, modulate_first, gen):
    B, S, H = 2, 9, 333
    x = (torch.randn(B, S, H, generator=gen) * 2 + 0.3).to(dtype)
    add = torch.randn(B, S, H, generator=gen).to(dtype)
    w = torch.randn(H, generator=gen).to(dtype)
    shift, scale, gate = mods(gen, B, H, dtype)
    got_h, got_s = ops.add_rms_norm(x, add, gate, w, EPS, shift, scale, modulate_first)
    ref_h, ref_s = reference.add_rms_norm(x, add, gate, w, EPS, shift, scale, modulate_first)
    want_h, want_s = oracle.add_rms_norm(x, add, gate, w, EPS, shift, scale, modulate_first)
    # Each of the ~8 elementwise steps rounds to the dtype once; the terms are O(|x| |w| (1 + |scale|) + |shift|).
    mag = want_h.abs().amax(-1, keepdim=True) + 1
    tol = 8 * tolerance(dtype)
    for got in (got_h, ref_h):
        assert got.dtype == dtype
        assert ((got.double() - want_h).abs() <= tol * mag).all()
    for got in (got_s, ref_s):
        torch.testing.assert_close(got.double(), want_s, atol=2 * tolerance(dtype) * (want_s.abs().max() + 1),
                                   rtol=0)
    # The kernel and the reference differ at most by the rounding of one differently ordered fp32 sum.
    assert ((got_h.double() - ref_h.double()).abs() <= tol * mag).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,group", [(672, 84), (36, 12), (45, 5), (8, 8), (7, 1)])
def test_gated_rms_norm_matches_oracle_and_reference(dtype, width, group, gen):
    # z as a split view of a wider row (the in-projection's output), y contiguous.
    zx = (torch.randn(2, 5, width + 3, generator=gen) * 3).to(dtype)
    z = zx[..., :width]
    y = torch.randn(2, 5, width, generator=gen).to(dtype)
    w = torch.randn(width, generator=gen).to(dtype)
    got = ops.gated_rms_norm(y, z, w, group, EPS)
    ref = reference.gated_rms_norm(y, z, w, group, EPS)
    want = oracle.gated_rms_norm(y, z, w, group, EPS)
    assert got.dtype == dtype and got.shape == y.shape and got.is_contiguous()
    # fp32 steps then one rounding; the SiLU's exp differs from torch's in the last bits (a few fp32 ulps).
    scale = want.abs().amax(-1, keepdim=True) + tolerance(dtype)
    tol = 2 * tolerance(dtype) + 4e-6
    for out in (got, ref):
        assert ((out.double() - want).abs() <= tol * scale).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_to_its_row(dtype, gen):
    x = torch.randn(3, 4, 40, generator=gen).to(dtype)
    x[1, 2, 17] = float("nan")
    w = torch.randn(40, generator=gen).to(dtype)
    h, s = ops.add_rms_norm(x, torch.zeros_like(x), None, w, EPS)
    assert h[1, 2].isnan().all() and not h[0].isnan().any() and not h[1, 3].isnan().any()
    assert s[1, 2, 17].isnan() and s.isnan().sum() == 1
    g = ops.gated_rms_norm(x, x, w, 8, EPS)
    assert g[1, 2, 16:24].isnan().all() and g.isnan().sum() == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_give_the_single_thread_bits(dtype, gen):
    rows, H = 3000, 336   # enough work to split
    x = torch.randn(1, rows, H, generator=gen).to(dtype)
    add = torch.randn(1, rows, H, generator=gen).to(dtype)
    w = torch.randn(H, generator=gen).to(dtype)
    shift, scale, gate = mods(gen, 1, H, dtype)
    outs = []
    for t in (1, 2):
        with using_threads(t):
            outs.append((*ops.add_rms_norm(x, add, gate, w, EPS, shift, scale, True),
                         ops.gated_rms_norm(x, add, w, 48, EPS)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_bad_input_names_the_argument(gen):
    x = torch.randn(2, 3, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    m = torch.randn(2, 8, generator=gen)
    norm, add_norm, gated = (torch.ops.twotower.rms_norm.default, torch.ops.twotower.add_rms_norm.default,
                             torch.ops.twotower.gated_rms_norm.default)
    cases = [
        (lambda: norm(x.double(), w.double(), EPS), "x must be float32, bfloat16 or float16"),
        (lambda: norm(x, w.bfloat16(), EPS), "w must have x's dtype"),
        (lambda: norm(x, w[:5], EPS), "w must be [8]"),
        (lambda: norm(x, w, -1.0), "eps must be >= 0"),
        (lambda: norm(x, w, EPS, m, None), "shift and scale must be given together"),
        (lambda: norm(x, w, EPS, torch.randn(4, 8), torch.randn(4, 8)), "shift must be [groups, 8]"),
        (lambda: norm(x, w, EPS, m, torch.randn(2, 7)), "scale must be [groups, 8]"),
        (lambda: norm(x, w, EPS, m, torch.randn(3, 8)), "scale must have as many rows as the other"),
        (lambda: norm(x, w, EPS, torch.randn(5, 8), torch.randn(5, 8)), "shift must be [groups, 8] with groups dividing"),
        (lambda: add_norm(x, x[:1], None, w, EPS), "add must have x's shape"),
        (lambda: add_norm(x, x.bfloat16(), None, w, EPS), "add must have x's dtype"),
        (lambda: add_norm(x, x, torch.randn(2, 8).bfloat16(), w, EPS), "gate must have x's dtype"),
        (lambda: add_norm(x, x, torch.randn(2, 16)[:, ::2], w, EPS), "gate must have a contiguous last dimension"),
        (lambda: gated(x, x[..., :4], w, 4, EPS), "z must have y's shape"),
        (lambda: gated(x, x, w, 3, EPS), "group must divide y's last dim 8"),
        (lambda: gated(x, x.bfloat16(), w, 4, EPS), "z and w must have y's dtype"),
        (lambda: gated(x, x, w[:4], 4, EPS), "w must be a contiguous [8]"),
    ]
    for call, message in cases:
        with pytest.raises((RuntimeError, TypeError, ValueError)) as e:
            call()
        assert message in str(e.value), str(e.value)
        assert "\n" not in str(e.value).split("Exception raised from")[0].strip()


def test_mixed_dtypes_and_autograd_take_the_reference(gen):
    """An fp32 residual stream (residual_in_fp32) with bf16 weights follows the reference's promotion; training's
    autograd gets gradients through the reference (the kernels have no backward)."""
    x = torch.randn(2, 3, 16, generator=gen)
    add = torch.randn(2, 3, 16, generator=gen).bfloat16()
    w = torch.randn(16, generator=gen).bfloat16()
    h, s = ops.add_rms_norm(x, add, None, w, EPS)
    want_h, want_s = reference.add_rms_norm(x, add, None, w, EPS)
    assert s.dtype == torch.float32 and h.dtype == torch.bfloat16
    assert_bitwise(s, want_s)
    assert_bitwise(h, want_h)
    xg = torch.randn(2, 3, 16, generator=gen, requires_grad=True)
    wg = torch.randn(16, generator=gen, requires_grad=True)
    ops.rms_norm(xg, wg, EPS).square().sum().backward()
    assert xg.grad is not None and wg.grad is not None and xg.grad.abs().sum() > 0


def test_opcheck(gen):
    x = torch.randn(2, 3, 24, generator=gen)
    w = torch.randn(24, generator=gen)
    shift, scale, gate = torch.randn(2, 3, 24, generator=gen).unbind(1)
    torch.library.opcheck(torch.ops.twotower.rms_norm.default, (x, w, EPS, shift, scale, True))
    torch.library.opcheck(torch.ops.twotower.add_rms_norm.default, (x, x.flip(0), gate, w, EPS, shift, scale))
    torch.library.opcheck(torch.ops.twotower.gated_rms_norm.default, (x, x.flip(1), w, 6, EPS))
