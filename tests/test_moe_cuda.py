"""The CUDA MoE's plan modes (csrc/moe/moe_cuda_plan.h, tested on the CPU in test_moe_cuda_plan.py) give the same
result: the route fused into the up GEMM (few slots) or in its own launch, 16 or 64 A rows per pass, a prefill cut
into chunks. Each row's output depends only on its own token, so any two plans agree bit for bit; plus the fp64
oracle. All marked `cuda`: they skip without a GPU."""
import pytest
import torch

import twotower_ext as tt
from twotower_ext import quant, reference

from conftest import tolerance

pytestmark = pytest.mark.cuda


def plan(dtype, fmt, H, I, E, k, T, group):
    names = ["path", "chunk_tokens", "chunks", "workspace_bytes", "fused_route", "launches", "bm", "stages"]
    return dict(zip(names, torch.ops.twotower.cuda_moe_plan(dtype, fmt, H, I, E, k, T, group)))


def make(T, E, k, H, I, dtype, fmt, gen):
    x = torch.randn(T, H, generator=gen).to(dtype)
    up, down = torch.randn(E, I, H, generator=gen) / H ** 0.5, torch.randn(E, H, I, generator=gen) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    if fmt == "dense":
        weights, group = (up.to(dtype).cuda(), down.to(dtype).cuda(), None, None, 0), 0
        deq = up.to(dtype), down.to(dtype)
    else:
        qu, qd = quant.quantize(up, fmt), quant.quantize(down, fmt)
        weights, group = (qu.data.cuda(), qd.data.cuda(), qu.scale.cuda(), qd.scale.cuda(), qu.group), qu.group
        deq = quant.dequantize(qu, dtype), quant.dequantize(qd, dtype)
    return x, ids, w, weights, group, deq


def op(x, ids, w, weights):
    up, down, us, ds, group = weights
    return torch.ops.twotower.moe_experts(x.cuda(), ids.cuda(), w.cuda(), up, down, us, ds, group)


def check_oracle(y, x, ids, w, deq):
    want = reference.moe_experts(x.double(), ids, w.double(), deq[0].double(), deq[1].double())
    scale = max(want.abs().max().item(), 1e-30)
    tol = tolerance(x.dtype) * (4 if x.dtype == torch.float32 else 1)
    torch.testing.assert_close(y.cpu().double(), want, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_fused_and_separate_route_agree(fmt, dtype, gen):
    """200 tokens (800 slots: the route in its own launch, 64-row passes) against slices of 16 (fused route, 16-row
    passes) and 84 (fused, 64-row passes): bit-identical rows; K tails in every format (H 1000: 15.6 / 7.8 / 3.9
    k tiles of bf16 / fp8 / int4), a short last int4 group."""
    E, k, H, I = 32, 4, 1000, 520
    x, ids, w, weights, group, deq = make(200, E, k, H, I, dtype, fmt, gen)
    assert not plan(dtype, fmt, H, I, E, k, 200, group)["fused_route"]
    for T, bm in ((16, 16), (84, 64)):
        pl = plan(dtype, fmt, H, I, E, k, T, group)
        assert pl["fused_route"] and (dtype == torch.float32 or pl["bm"] == bm), pl
    y = op(x, ids, w, weights)
    torch.testing.assert_close(op(x[:16], ids[:16], w[:16], weights), y[:16], atol=0, rtol=0)
    torch.testing.assert_close(op(x[16:100], ids[16:100], w[16:100], weights), y[16:100], atol=0, rtol=0)
    check_oracle(y, x, ids, w, deq)


@pytest.mark.parametrize("fmt", ["dense", "int4"])
def test_prefill_chunks_are_invisible(fmt, gen):
    """4100 tokens: two chunks (4096 + 4) through one workspace, equal to two single-chunk calls and the oracle;
    a CUDA graph of the chunked call replays it."""
    E, k, H, I, T = 4, 2, 64, 32, 4100
    x, ids, w, weights, group, deq = make(T, E, k, H, I, torch.bfloat16, fmt, gen)
    assert plan(torch.bfloat16, fmt, H, I, E, k, T, group)["chunks"] == 2
    y = op(x, ids, w, weights)
    halves = torch.cat([op(x[:2050], ids[:2050], w[:2050], weights), op(x[2050:], ids[2050:], w[2050:], weights)])
    torch.testing.assert_close(y, halves, atol=0, rtol=0)
    check_oracle(y, x, ids, w, deq)
    xc, idc, wc = x.cuda(), ids.cuda(), w.cuda()
    out = torch.empty_like(xc)
    up, down, us, ds, g = weights
    torch.ops.twotower.moe_experts_out(xc, idc, wc, up, down, out, us, ds, g)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.twotower.moe_experts_out(xc, idc, wc, up, down, out, us, ds, g)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, y, atol=0, rtol=0)


def test_bad_id_in_a_later_chunk_is_reported(monkeypatch, gen):
    """The error word collects every chunk's out-of-range ids (TWOTOWER_MOE_DEBUG=1 checks it)."""
    E, k, H, I, T = 4, 2, 64, 32, 4100
    x, ids, w, weights, _, _ = make(T, E, k, H, I, torch.bfloat16, "dense", gen)
    ids[T - 1, 1] = E
    monkeypatch.setenv("TWOTOWER_MOE_DEBUG", "1")
    with pytest.raises(ValueError, match="TWOTOWER_MOE_DEBUG"):
        op(x, ids, w, weights)
        torch.cuda.synchronize()


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_real_shapes_decode_and_prefill_sized(fmt, gen):
    """H 2688 / I 1856 (the real model's), 32 experts top-6: a 16-token pass (fused route, 16-row passes, 5 stages)
    and 160 tokens (separate route, 64-row passes) agree on the shared rows and with the oracle."""
    E, k, H, I = 32, 6, 2688, 1856
    x, ids, w, weights, group, deq = make(160, E, k, H, I, torch.bfloat16, fmt, gen)
    small, large = plan(torch.bfloat16, fmt, H, I, E, k, 16, group), plan(torch.bfloat16, fmt, H, I, E, k, 160, group)
    assert small["fused_route"] and small["bm"] == 16 and small["stages"] == 5
    assert not large["fused_route"] and large["bm"] == 64
    y = op(x, ids, w, weights)
    torch.testing.assert_close(op(x[:16], ids[:16], w[:16], weights), y[:16], atol=0, rtol=0)
    check_oracle(y[:16].cpu(), x[:16], ids[:16], w[:16], deq)
