"""block_attention's ways of multiplying 16-bit tiles on the CPU, each forced with TWOTOWER_ATTN_CPU_ISA (the
ones this CPU does not run skip, saying so): widened to fp32 for sgemm (avx2 / avx512), vdpbf16ps microkernels
(avx512_bf16) and AMX tiles (amx). Against the fp64 oracle with the same error budget as the other attention tests,
at sizes that reach every padding branch (head dim 33, 12 query rows, key tiles of 1 .. 256 keys and a long
context), causal and not; NaN propagation; inputs past ctx_len never read; a bad value refused."""
import pytest
import torch

import twotower_ext as tt

from test_block_attention import check_against_oracle, make_inputs
from test_causal_attention import check_causal

PATHS = ["avx2", "avx512", "avx512_bf16", "amx"]


def cpu_path(isa):
    return pytest.param(isa, marks=pytest.mark.skipif(isa not in tt.ops.cpu_isas(),
                                                      reason=f"this CPU does not run {isa}"))


# (S, Hq, Hkv, D, ctx_lens): the width-1/8 model's heads with a ragged batch; an odd head dim, 6 block tokens x 2
# query heads = 12 rows (padded to 16), key tiles of 259 = 256 + 3 keys and an empty row; the real model's heads
# (256 rows) over a context of 1300 (5 tiles of 256 + 20 keys) and 1 key.
SHAPES = [(16, 4, 2, 128, [300, 17]), (6, 4, 2, 33, [259, 0]), (16, 32, 2, 128, [1300, 1])]


@pytest.mark.parametrize("path", [cpu_path(i) for i in PATHS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S,Hq,Hkv,D,lens", SHAPES)
def test_each_path_matches_fp64_oracle(path, dtype, causal, S, Hq, Hkv, D, lens, monkeypatch, gen):
    monkeypatch.setenv("TWOTOWER_ATTN_CPU_ISA", path)
    args = make_inputs(gen, len(lens), S, Hq, Hkv, D, lens, dtype)
    out, lse = tt.block_attention(*args, causal=causal)
    if causal:
        check_causal(args, out, lse)
    else:
        check_against_oracle(args, out, lse)


@pytest.mark.parametrize("path", [cpu_path(i) for i in PATHS])
def test_each_path_propagates_nan_and_ignores_past_ctx_len(path, monkeypatch, gen):
    """bf16: a NaN query gives that query's output NaN only; a NaN context key makes its KV head's outputs of that
    row NaN; NaN in the cache past ctx_lens (and in an empty row's) changes nothing, bit for bit."""
    monkeypatch.setenv("TWOTOWER_ATTN_CPU_ISA", path)
    B, S, Hq, Hkv, D = 3, 16, 4, 2, 128
    q, kb, vb, kc, vc, lens = make_inputs(gen, B, S, Hq, Hkv, D, [40, 300, 0], torch.bfloat16, extra_cap=40)
    clean, clean_lse = tt.block_attention(q, kb, vb, kc, vc, lens)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[0, 40:], vc2[0, 40:], kc2[2], vc2[2] = float("nan"), float("nan"), float("nan"), float("nan")
    out, lse = tt.block_attention(q, kb, vb, kc2, vc2, lens)
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
    q2, kc3 = q.clone(), kc.clone()
    q2[0, 5, 3, 7] = float("nan")
    kc3[1, 200, 0, 11] = float("nan")
    out, lse = tt.block_attention(q2, kb, vb, kc3, vc, lens)
    nan = torch.zeros(B, S, Hq, dtype=torch.bool)
    nan[0, 5, 3] = True
    nan[1, :, :Hq // Hkv] = True
    assert torch.equal(out.isnan().any(-1), nan) and torch.equal(out.isnan().all(-1), nan)
    assert torch.equal(out[~nan], clean[~nan])


def test_default_bf16_path_is_the_best_this_cpu_runs(monkeypatch, gen):
    args = make_inputs(gen, 2, 16, 8, 2, 64, [500, 3], torch.bfloat16)
    out, lse = tt.block_attention(*args)
    best = "amx" if "amx" in tt.ops.cpu_isas() else "avx512_bf16" if "avx512_bf16" in tt.ops.cpu_isas() else "avx2"
    monkeypatch.setenv("TWOTOWER_ATTN_CPU_ISA", best)
    forced, forced_lse = tt.block_attention(*args)
    assert torch.equal(out, forced) and torch.equal(lse, forced_lse)


def test_bad_path_is_refused(monkeypatch, gen):
    monkeypatch.setenv("TWOTOWER_ATTN_CPU_ISA", "sse4")
    with pytest.raises(ValueError, match="TWOTOWER_ATTN_CPU_ISA must be scalar, avx2, avx512, avx512_bf16 or amx"):
        tt.block_attention(*make_inputs(gen, 1, 2, 2, 2, 8, [3], torch.bfloat16))
