"""moe_experts with the layer's shared expert fused (csrc/moe/moe_shared_cpu.cpp): bit for bit the composition it
replaces (ops.moe_experts + ops.relu2_mlp, added in x's dtype) at odd sizes, fp32 / bf16, every linear instruction
set this CPU runs, 1 and 2 threads, row counts that send the linears to the matrix library (then composed in the
op), out aliasing x; against the fp64 oracle; NaN; bad input; opcheck."""
import pytest
import torch

import twotower_ext as tt
from twotower_ext import ops, packed, reference

import oracle
from conftest import tolerance
from test_linear import FORCED

SIZES = [(320, 224, 464, 16, 6), (40, 24, 50, 8, 2), (33, 7, 19, 4, 1)]   # (H, I, I_s, E, k)


def make(T, H, I, Is, E, k, dtype, gen):
    x = torch.randn(T, H, generator=gen).to(dtype)
    up = (torch.randn(E, I, H, generator=gen) / H ** 0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    su = packed.pack((torch.randn(Is, H, generator=gen) / H ** 0.5).to(dtype))
    sd = packed.pack((torch.randn(H, Is, generator=gen) / Is ** 0.5).to(dtype))
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    w = torch.rand(T, k, generator=gen, dtype=torch.float64)
    return x, ids, w, up, down, su, sd


def composed(x, ids, w, up, down, su, sd):
    """What the layer ran before the fusion: the routed op, then the shared MLP beside it, added in x's dtype."""
    return ops.moe_experts(x, ids, w, up, down) + ops.relu2_mlp(x, su, sd)


@pytest.mark.parametrize("isa", FORCED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 16, 37])
@pytest.mark.parametrize("size", SIZES)
def test_fused_equals_composition(size, T, dtype, isa, monkeypatch, gen):
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", isa)
    args = make(T, *size, dtype, gen)
    want = composed(*args)
    for threads in (1, 2):
        with tt.threads.using_threads(threads):
            got = ops.moe_experts(*args[:5], shared_up=args[5], shared_down=args[6])
        assert torch.equal(got, want), (threads, (got.double() - want.double()).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_library_rows_compose_in_the_op(dtype, monkeypatch, gen):
    """Rows that send a shared linear to the matrix library (forced here; prefill-sized calls get it from the plan):
    the op composes the linear op itself, so the result is still the composition's."""
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_GEMM", "library")
    args = make(23, 40, 24, 50, 8, 2, dtype, gen)
    assert torch.equal(ops.moe_experts(*args[:5], shared_up=args[5], shared_down=args[6]), composed(*args))
    monkeypatch.delenv("TWOTOWER_LINEAR_CPU_GEMM")
    args = make(600, 40, 24, 50, 8, 2, dtype, gen)   # > 512 rows: bf16 on the library by the plan
    assert torch.equal(ops.moe_experts(*args[:5], shared_up=args[5], shared_down=args[6]), composed(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_may_be_x(dtype, gen):
    x, ids, w, up, down, su, sd = make(9, 40, 24, 50, 8, 2, dtype, gen)
    want = composed(x, ids, w, up, down, su, sd)
    out = x.clone()
    assert ops.moe_experts(out, ids, w, up, down, out=out, shared_up=su, shared_down=sd) is out
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_oracle(dtype, gen):
    x, ids, w, up, down, su, sd = make(7, 33, 7, 19, 4, 2, dtype, gen)
    got = ops.moe_experts(x, ids, w, up, down, shared_up=su, shared_down=sd)
    x64 = x.double()
    want = reference.moe_experts(x64, ids, w, up, down) + oracle.relu2_mlp(x64, packed.unpack(su), packed.unpack(sd))
    scale = want.abs().max().item()
    tol = tolerance(dtype) * (8 if dtype == torch.float32 else 2)
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


def test_nan_stays_in_its_row(gen):
    x, ids, w, up, down, su, sd = make(6, 40, 24, 50, 8, 2, torch.bfloat16, gen)
    x[3, 5] = float("nan")
    y = ops.moe_experts(x, ids, w, up, down, shared_up=su, shared_down=sd)
    assert y[3].isnan().all()
    assert not y[torch.arange(6) != 3].isnan().any()


def test_empty(gen):
    x, ids, w, up, down, su, sd = make(0, 40, 24, 50, 8, 2, torch.float32, gen)
    assert ops.moe_experts(x, ids, w, up, down, shared_up=su, shared_down=sd).shape == (0, 40)


def test_bad_input(gen):
    x, ids, w, up, down, su, sd = make(4, 40, 24, 50, 8, 2, torch.float32, gen)
    op = torch.ops.twotower.moe_experts
    with pytest.raises(ValueError, match="shared_up and shared_down .* must be given together"):
        ops.moe_experts(x, ids, w, up, down, shared_up=su)
    with pytest.raises(ValueError, match="shared_up and shared_down .* must be given together, got only shared_down"):
        op(x, ids, w, up, down, None, None, 0, None, sd.data, 50)
    with pytest.raises(ValueError, match="shared_inter must be 0 without a shared expert, got 50"):
        op(x, ids, w, up, down, None, None, 0, None, None, 50)
    with pytest.raises(ValueError, match="shared_inter .* must be >= 1"):
        op(x, ids, w, up, down, None, None, 0, su.data, sd.data, 0)
    with pytest.raises(RuntimeError, match="shared_up must be the shared expert's up weight packed .* n = 70"):
        op(x, ids, w, up, down, None, None, 0, su.data, sd.data, 70)
    with pytest.raises(RuntimeError, match="shared_down must be the shared expert's down weight packed"):
        op(x, ids, w, up, down, None, None, 0, su.data, su.data, 50)
    with pytest.raises(TypeError, match="shared_up must be"):
        op(x, ids, w, up, down, None, None, 0, su.data.bfloat16(), sd.data, 50)
    h = x.half()
    with pytest.raises(TypeError, match="x must be float32 or bfloat16 with a shared expert"):
        op(h, ids, w, up.half(), down.half(), None, None, 0, su.data, sd.data, 50)


def test_opcheck(gen):
    x, ids, w, up, down, su, sd = make(5, 40, 24, 50, 8, 2, torch.float32, gen)
    kw = (None, None, 0, su.data, sd.data, 50)
    torch.library.opcheck(torch.ops.twotower.moe_experts.default, (x, ids, w, up, down, *kw))
    torch.library.opcheck(torch.ops.twotower.moe_experts_out.default, (x, ids, w, up, down, torch.empty_like(x), *kw))
