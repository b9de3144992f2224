"""block_attention(causal=True), the context tower's extension / AR step: block query j sees the row's context
and block keys 0..j. Against the fp64 oracle (reference.block_attention in fp64) with the same error budget as
the non-causal tests (2x PyTorch's own same-dtype error + a floor); NaN inputs give NaN outputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import twotower_ext as tt
from twotower_ext import reference

from conftest import devices, tolerance
from test_block_attention import make_inputs


def torch_causal_same_dtype(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens):
    """SDPA in the inputs' dtype over [context | block] per row, with the causal boolean mask the context
    tower used before the kernel had a causal mode."""
    outs = []
    S = q.shape[1]
    for b in range(q.shape[0]):
        n = int(ctx_lens[b])
        k = torch.cat([k_ctx[b, :n], k_blk[b]]).transpose(0, 1)[None]
        v = torch.cat([v_ctx[b, :n], v_blk[b]]).transpose(0, 1)[None]
        mask = torch.arange(n + S)[None, :] <= n + torch.arange(S)[:, None]
        outs.append(F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k, v, attn_mask=mask,
                                                   enable_gqa=True).transpose(1, 2))
    return torch.cat(outs)


def check_causal(args, out, lse):
    cpu = [a.cpu() for a in args]
    want_o, want_lse = reference.block_attention(*[a.double() if a.is_floating_point() else a for a in cpu],
                                                 causal=True)
    dtype = args[0].dtype
    assert out.dtype == dtype and out.shape == args[0].shape
    err = (out.cpu().double() - want_o).abs().max().item()
    torch_err = (torch_causal_same_dtype(*cpu).double() - want_o).abs().max().item()
    floor = max(tolerance(dtype) / 4, 2 * torch.finfo(torch.float32).eps * math.sqrt(args[0].shape[-1]))
    assert err <= 2 * torch_err + floor, f"kernel error {err:.3g} vs torch's own {torch_err:.3g} (+ {floor:.1g})"
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 64), (8, 2, 16), (32, 2, 128)])
@pytest.mark.parametrize("S", [1, 16])
@pytest.mark.parametrize("ctx", [0, 1, 17, 799])
def test_causal_matches_fp64_oracle(device, dtype, Hq, Hkv, D, S, ctx, gen):
    lens = [ctx, 0, (ctx * 3) // 4 + 1]   # ragged, one row empty
    args = make_inputs(gen, 3, S, Hq, Hkv, D, lens, dtype, device)
    out, lse = tt.block_attention(*args, causal=True)
    check_causal(args, out, lse)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 16])
def test_causal_long_context(device, dtype, S, gen):
    # 4096 context keys at the model's head dim and GQA group 4 (several tasks per row, merged) + a short row.
    args = make_inputs(gen, 2, S, 8, 2, 128, [4096, 300], dtype, device)
    out, lse = tt.block_attention(*args, causal=True)
    check_causal(args, out, lse)


@pytest.mark.parametrize("device", devices())
def test_causal_query_j_is_noncausal_attention_over_ctx_plus_j(device, gen):
    # Query j of a causal block = the non-causal op over the context extended by block keys 0..j-1 and a
    # one-key block (key j): an identity between the two modes of the same kernel.
    S, ctx = 5, 37
    q, kb, vb, kc, vc, lens = make_inputs(gen, 1, S, 8, 2, 32, [ctx], torch.float32, device, extra_cap=S)
    out, lse = tt.block_attention(q, kb, vb, kc, vc, lens, causal=True)
    for j in range(S):
        kc2, vc2 = kc.clone(), vc.clone()
        kc2[:, ctx:ctx + j], vc2[:, ctx:ctx + j] = kb[:, :j], vb[:, :j]
        o_j, lse_j = tt.block_attention(q[:, j:j + 1], kb[:, j:j + 1], vb[:, j:j + 1], kc2, vc2, lens + j)
        torch.testing.assert_close(out[:, j:j + 1], o_j, atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse[:, :, j:j + 1], lse_j, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("device", devices())
def test_causal_single_query_equals_noncausal(device, gen):
    args = make_inputs(gen, 3, 1, 8, 2, 64, [0, 5, 300], torch.float32, device)
    a, la = tt.block_attention(*args, causal=True)
    b, lb = tt.block_attention(*args)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(la, lb, atol=0, rtol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ctx", [3, 2000])
def test_nan_inputs_give_nan_outputs(device, causal, ctx, gen):
    """A NaN in q, a NaN/inf key in the context, an all -inf context row: the affected outputs are NaN (as in
    the reference and SDPA), never a plausible 0 with lse = -inf; untouched rows stay exact."""
    B, S, Hq, Hkv, D = 3, 4, 4, 2, 16
    q, kb, vb, kc, vc, lens = make_inputs(gen, B, S, Hq, Hkv, D, [ctx] * B, torch.float32, device)
    clean, _ = tt.block_attention(q, kb, vb, kc, vc, lens, causal=causal)
    q, kc = q.clone(), kc.clone()
    q[0, 1, 2, 5] = float("nan")                  # one query of row 0
    kc[1, ctx // 2, 0] = float("inf")              # one context key of row 1 (KV head 0): inf - inf = NaN
    kc[2, :ctx] = float("-inf")                    # row 2: every context key -inf
    out, lse = tt.block_attention(q, kb, vb, kc, vc, lens, causal=causal)
    assert out[0, 1, 2].isnan().all() and lse[0, 2, 1].isnan()
    others = torch.ones(S, Hq, dtype=torch.bool)
    others[1, 2] = False
    torch.testing.assert_close(out[0][others], clean[0][others], atol=0, rtol=0)
    assert out[1, :, :Hq // Hkv].isnan().all()                   # the query heads of KV head 0
    torch.testing.assert_close(out[1, :, Hq // Hkv:], clean[1, :, Hq // Hkv:], atol=0, rtol=0)
    assert out[2].isnan().all() and lse[2].isnan().all()
    want, _ = reference.block_attention(q.cpu(), kb.cpu(), vb.cpu(), kc.cpu(), vc.cpu(), lens.cpu(), causal=causal)
    assert torch.equal(out.cpu().isnan(), want.isnan())


@pytest.mark.parametrize("device", devices())
def test_causal_nan_in_a_block_key_reaches_only_later_queries(device, gen):
    q, kb, vb, kc, vc, lens = make_inputs(gen, 1, 6, 4, 2, 16, [9], torch.float32, device)
    kb = kb.clone()
    kb[0, 3] = float("nan")
    out, _ = tt.block_attention(q, kb, vb, kc, vc, lens, causal=True)
    assert not out[0, :3].isnan().any() and out[0, 3:].isnan().all()
