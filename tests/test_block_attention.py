"""block_attention against the fp64 oracle (tests/oracle.py), FA3 style: the kernel's error must be within 2x of
PyTorch's own same-dtype error (SDPA over the concatenated [context | block] K/V, one call per row; both errors
measured against the oracle, never against reference.py) plus a small floor. reference.py is held to the same
bound. Ragged batches, ctx_len 0, GQA, non-contiguous cache slices, scores in the thousands, every dtype, bad
input, opcheck, CUDA graphs."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import twotower_ext as tt
from twotower_ext import reference
from twotower_ext.threads import using_threads

import oracle
from conftest import devices, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(gen, B, S, Hq, Hkv, D, lens, dtype, device="cpu", extra_cap=3):
    """Random inputs; the context is a [B, Lcap, Hkv, D] cache sliced to Lmax = max(lens) + extra_cap, so its
    strides are not those of a dense [B, Lmax, Hkv, D] tensor."""
    Lmax = max(lens) + extra_cap
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(dtype).to(device)  # noqa: E731
    q, k_blk, v_blk = rnd(B, S, Hq, D), rnd(B, S, Hkv, D), rnd(B, S, Hkv, D)
    cache = rnd(2, B, Lmax + 5, Hkv, D)
    k_ctx, v_ctx = cache[0, :, :Lmax], cache[1, :, :Lmax]
    ctx_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens


def torch_same_dtype(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale=None):
    """The straightforward PyTorch version in the inputs' dtype: SDPA over [context | block] per row."""
    outs = []
    for b in range(q.shape[0]):
        n = int(ctx_lens[b])
        k = torch.cat([k_ctx[b, :n], k_blk[b]]).transpose(0, 1)[None]
        v = torch.cat([v_ctx[b, :n], v_blk[b]]).transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k, v, scale=scale,
                                                   enable_gqa=True).transpose(1, 2))
    return torch.cat(outs)


def check_against_oracle(args, out, lse, scale=None):
    """|kernel - fp64 oracle| <= 2 |torch same dtype - fp64 oracle| + floor; lse to fp32 accuracy."""
    cpu = [a.cpu() for a in args]
    want_o, want_lse = oracle.block_attention(*cpu, scale=scale)
    dtype = args[0].dtype
    assert out.dtype == dtype and out.shape == args[0].shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (args[0].shape[0], args[0].shape[2], args[0].shape[1])
    err = (out.cpu().double() - want_o).abs().max().item()
    torch_err = (torch_same_dtype(*cpu, scale=scale).double() - want_o).abs().max().item()
    # The floor: the kernel accumulates in fp32 whatever the input dtype, and a D-term fp32 dot product carries
    # ~eps32 * sqrt(D) relative error into every score, so ~10 ulp output errors are expected at D = 128 even
    # when SDPA happens to land closer on a draw (fp32, 300 seeds: kernel error up to 2 x SDPA's + 7.6e-7).
    # Scores of size |s| (the lse bounds the largest) carry |s| * eps32 absolute error into the exponent, so the
    # floor grows with them once they pass sqrt(D) (q, k x 30: |s| ~ 1000).
    score = max(math.sqrt(args[0].shape[-1]), want_lse.abs().max().item() if want_lse.numel() else 0.0)
    floor = max(tolerance(dtype) / 4, 2 * torch.finfo(torch.float32).eps * score)
    assert err <= 2 * torch_err + floor, f"kernel error {err:.3g} vs torch's own {torch_err:.3g} (+ {floor:.1g})"
    lse_scale = max(1.0, want_lse.abs().max().item())   # fp32 scores of size |s| carry |s| * eps32 error
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=2e-5 * lse_scale, rtol=2e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 128), (8, 2, 64), (32, 2, 128)])
@pytest.mark.parametrize("S", [1, 16])
@pytest.mark.parametrize("ctx", [0, 1, 15, 16, 17, 799])
def test_matches_fp64_oracle(device, dtype, Hq, Hkv, D, S, ctx, gen):
    # Three rows of different lengths, one of them empty (B = 1 runs in test_long_context).
    B, lens = 3, [ctx, 0, (ctx * 3) // 4 + 1]
    args = make_inputs(gen, B, S, Hq, Hkv, D, lens, dtype, device)
    out, lse = tt.block_attention(*args)
    check_against_oracle(args, out, lse)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ctx,S,Hq,Hkv,D,B,dtype", [
    *[(4096, 16, 32, 2, 128, 1, dt) for dt in DTYPES],          # the model's shapes
    *[(20000, 3, 4, 4, 64, 2, dt) for dt in DTYPES],
    (4096, 1, 8, 2, 64, 3, torch.float16),
    (20000, 16, 8, 2, 128, 1, torch.bfloat16),
])
def test_long_context(device, ctx, S, Hq, Hkv, D, B, dtype, gen):
    lens = [ctx, ctx // 3 + 7][:B] + [ctx - 1] * (B - 2)
    args = make_inputs(gen, B, S, Hq, Hkv, D, lens, dtype, device)
    out, lse = tt.block_attention(*args)
    check_against_oracle(args, out, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_is_batch_invariant_past_the_split(dtype, gen):
    """Rows long enough to be split into key chunks (over 1,024 keys; up to 32 parts at 40,000) get the same bits
    alone as in batches of other totals, at 1 and 2 threads: the chunks follow the row's own length only."""
    lens = [3000, 40000, 1100, 700]
    args = make_inputs(gen, 4, 16, 8, 2, 64, lens, dtype)
    with using_threads(2):
        out, lse = tt.block_attention(*args)
    with using_threads(1):
        for rows in ([0], [1], [2, 3], [0, 2]):
            got = tt.block_attention(*(a[rows] for a in args))
            assert torch.equal(got[0], out[rows]) and torch.equal(got[1], lse[rows]), rows
    check_against_oracle([a[[0, 2]] for a in args], out[[0, 2]], lse[[0, 2]])


@pytest.mark.parametrize("device", devices())
def test_strided_layouts(device, gen):
    """Head-major cache seen through a transpose, q sliced out of a fused qkv projection, custom scale."""
    B, S, Hq, Hkv, D, L = 2, 16, 8, 2, 64, 300
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, generator=gen).to(device)
    q, k_blk, v_blk = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    cache = torch.randn(2, B, Hkv, L + 10, D, generator=gen).to(device)   # [B, Hkv, Lcap, D]
    k_ctx, v_ctx = cache[0].transpose(1, 2)[:, :L], cache[1].transpose(1, 2)[:, :L]
    assert not q.is_contiguous() and not k_ctx.is_contiguous() and k_ctx.stride(1) == D
    ctx_lens = torch.tensor([L, 123], dtype=torch.int32, device=device)
    args = (q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens)
    for scale in (None, 0.3, -0.2):
        out, lse = tt.block_attention(*args, scale=scale)
        check_against_oracle(args, out, lse, scale=scale)


@pytest.mark.parametrize("device", devices())
def test_only_first_ctx_len_positions_are_read(device, gen):
    """Positions past ctx_lens[b] (and all of an empty row's cache) must not influence the result."""
    args = list(make_inputs(gen, 2, 4, 4, 2, 64, [10, 0], torch.float32, device, extra_cap=20))
    out, lse = tt.block_attention(*args)
    args[3][0, 10:] = float("nan")
    args[4][0, 10:] = float("nan")
    args[3][1] = float("nan")
    args[4][1] = float("nan")
    out2, lse2 = tt.block_attention(*args)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_in_the_thousands(device, dtype, gen):
    """q and k x 30: |q.k| * scale reaches the thousands, far past exp's fp32 range; only a max-subtracted
    softmax (in the kernel and in the reference) gets it right."""
    args = list(make_inputs(gen, 3, 16, 8, 2, 64, [300, 0, 17], dtype, device))
    for i in (0, 1, 3):
        args[i] = args[i] * 30
    s = oracle.block_attention(*[a.cpu() for a in args])[1]
    assert s.abs().max() > 500
    out, lse = tt.block_attention(*args)
    check_against_oracle(args, out, lse)
    check_against_oracle(args, *reference.block_attention(*args))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_oracle(dtype, causal, gen):
    """reference.py is tested too: in fp64 it equals the oracle to rounding; in the storage dtypes it meets the
    kernel's bound (V taken from the right tensor, the right keys, GQA head mapping, causal block mask)."""
    args = make_inputs(gen, 3, 5, 8, 2, 32, [40, 0, 9], dtype)
    o64, l64 = reference.block_attention(*[a.double() if a.is_floating_point() else a for a in args], causal=causal)
    want_o, want_lse = oracle.block_attention(*args, causal=causal)
    torch.testing.assert_close(o64, want_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(l64.double(), want_lse, atol=1e-12, rtol=1e-12)
    if not causal:
        check_against_oracle(args, *reference.block_attention(*args))


def test_empty_batch():
    args = make_inputs(torch.Generator(), 1, 4, 4, 2, 64, [5], torch.float32)
    args = [a[:0] for a in args]
    out, lse = tt.block_attention(*args)
    assert out.shape == (0, 4, 4, 64) and lse.shape == (0, 4, 4)


def _bad(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(zip(["q", "k_blk", "v_blk", "k_ctx", "v_ctx", "ctx_lens"],
                    make_inputs(g, 2, 4, 8, 2, 64, [5, 7], torch.float32)))
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,words",
    [
        (dict(q=torch.randn(2, 4, 8, 64, dtype=torch.float64)), TypeError, "q must be float32"),
        (dict(k_blk=torch.randn(2, 4, 2, 64).bfloat16()), TypeError, "k_blk must be Float"),
        (dict(v_ctx=torch.randn(2, 10, 2, 64).half()), TypeError, "v_ctx must be Float"),
        (dict(ctx_lens=torch.tensor([5, 7])), TypeError, "ctx_lens must be Int"),
        (dict(q=torch.randn(2, 4, 8)), RuntimeError, "q must be \\[batch, block_len, q_heads, head_dim\\]"),
        (dict(q=torch.randn(2, 4, 7, 64)), RuntimeError, "q_heads \\(7\\) must be a multiple of kv_heads \\(2"),
        (dict(v_blk=torch.randn(2, 5, 2, 64)), RuntimeError, "v_blk must be \\[batch, block_len, kv_heads"),
        (dict(k_ctx=torch.randn(2, 10, 2, 32)), RuntimeError, "k_ctx must be \\[batch, ctx_capacity"),
        (dict(v_ctx=torch.randn(3, 10, 2, 64)), RuntimeError, "v_ctx must be \\[batch, ctx_capacity"),
        (dict(ctx_lens=torch.tensor([5, 7, 1], dtype=torch.int32)), RuntimeError, "ctx_lens must be \\[batch\\]"),
        (dict(ctx_lens=torch.tensor([5, 11], dtype=torch.int32)), ValueError, "ctx_lens must be in \\[0, 10\\]"),
        (dict(ctx_lens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "ctx_lens must be in \\[0, 10\\]"),
        (dict(k_ctx=torch.randn(2, 10, 64, 2).transpose(2, 3)), RuntimeError, "k_ctx must have a contiguous last"),
        (dict(q=torch.randn(2, 0, 8, 64), k_blk=torch.randn(2, 0, 2, 64), v_blk=torch.randn(2, 0, 2, 64)),
         RuntimeError, "block_len, q_heads and head_dim >= 1"),
    ],
)
def test_bad_input_names_the_argument(over, exc, words):
    with pytest.raises(exc, match=words):
        torch.ops.twotower.block_attention(**_bad(**over))


def test_bad_scale():
    with pytest.raises(ValueError, match="scale must be finite"):
        torch.ops.twotower.block_attention(**_bad(), scale=math.inf)


@pytest.mark.cuda
def test_cuda_device_mix_and_head_dim_are_refused():
    args = {k: v.cuda() for k, v in _bad().items()}
    with pytest.raises(RuntimeError, match="must be on the same device"):
        torch.ops.twotower.block_attention(**{**args, "k_ctx": args["k_ctx"].cpu()})
    g = torch.Generator().manual_seed(0)
    odd = make_inputs(g, 1, 2, 4, 2, 264, [3], torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="no CUDA kernel for these inputs: simt takes head_dim 1..256"):
        torch.ops.twotower.block_attention(*odd)


# CUDA kernel paths, forced through TWOTOWER_ATTN_PATH: the SIMT baseline, the sm_80+ tensor-core kernel
# (mma.sync; bf16/fp16, the default) and the sm_90a TMA + wgmma kernel (bf16/fp16, head_dim 128, Hopper only).
CUDA_PATHS = ["simt", "mma", "wgmma"]
LOWP = [torch.bfloat16, torch.float16]


def force_path(monkeypatch, path, D):
    """TWOTOWER_ATTN_PATH=path for the test; the wgmma path is skipped where it cannot run (head_dim != 128 or
    not an sm_90 device: forcing it there is the refusal test_cuda_path_choice_and_refusals checks)."""
    if path == "wgmma" and (D != 128 or torch.cuda.get_device_capability() != (9, 0)):
        pytest.skip("the wgmma path runs head_dim 128 on sm_90 devices only")
    monkeypatch.setenv("TWOTOWER_ATTN_PATH", path)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (32, 2)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S", [1, 16])
def test_cuda_path_matches_fp64_oracle(path, dtype, Hq, Hkv, D, S, gen, monkeypatch):
    """Every path on a ragged batch: ctx_len 0, 1, 17 (a partial first tile), 799 and odd tails; packed rows
    M = S * Hq / Hkv from 1 to 256 (one or several row blocks, idle warps in the tensor-core kernel)."""
    force_path(monkeypatch, path, D)
    args = make_inputs(gen, 6, S, Hq, Hkv, D, [0, 1, 17, 799, 63, 130], dtype, "cuda")
    out, lse = tt.block_attention(*args)
    check_against_oracle(args, out, lse)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("S,Hq,Hkv,D,lens", [
    (16, 32, 2, 128, [20000, 4096, 0]),    # the model's shapes, splits past the short rows' ends
    (1, 4, 4, 64, [19999, 20000]),
    (16, 8, 2, 64, [20000, 4097]),
    (40, 4, 2, 128, [2001, 15]),           # S > 16: block keys straddle tiles, M = 80 (partial second row block)
])
def test_cuda_path_long_context(path, dtype, S, Hq, Hkv, D, lens, gen, monkeypatch):
    force_path(monkeypatch, path, D)
    args = make_inputs(gen, len(lens), S, Hq, Hkv, D, lens, dtype, "cuda")
    out, lse = tt.block_attention(*args)
    check_against_oracle(args, out, lse)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_cuda_path_ignores_nan_past_ctx_len(path, gen, monkeypatch):
    """Keys past a row's ctx_len come from the block tensor (or are zero-filled past the split's end), so cache
    rows there (NaN here) never reach the result."""
    force_path(monkeypatch, path, 128)
    args = list(make_inputs(gen, 3, 16, 8, 2, 128, [70, 0, 129], torch.bfloat16, "cuda", extra_cap=100))
    out, lse = tt.block_attention(*args)
    for b, n in enumerate([70, 0, 129]):
        args[3][b, n:] = float("nan")
        args[4][b, n:] = float("nan")
    out2, lse2 = tt.block_attention(*args)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    check_against_oracle(args, out2, lse2)  # the oracle reads only the first ctx_lens[b] positions


@pytest.mark.cuda
def test_cuda_path_choice_and_refusals(gen, monkeypatch):
    """Misaligned K/V (a 2-byte offset) still run, on the SIMT path; forcing mma on inputs it cannot take, or
    an unknown path name, is a clear error."""
    B, S, Hq, Hkv, D, L = 2, 16, 8, 2, 64, 300
    q, k_blk, v_blk, _, _, ctx_lens = make_inputs(gen, B, S, Hq, Hkv, D, [L, 57], torch.bfloat16, "cuda", extra_cap=0)
    wide = torch.randn(2, B, L, Hkv, D + 1, generator=gen).to(torch.bfloat16).cuda()
    k_ctx, v_ctx = wide[0, ..., 1:], wide[1, ..., 1:]  # last dim contiguous, rows 2 bytes off 16-byte alignment
    args = (q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens)
    out, lse = tt.block_attention(*args)
    check_against_oracle(args, out, lse)
    monkeypatch.setenv("TWOTOWER_ATTN_PATH", "mma")
    with pytest.raises(RuntimeError, match="TWOTOWER_ATTN_PATH=mma cannot run these inputs: mma needs"):
        tt.block_attention(*args)
    fp32 = make_inputs(gen, 1, 4, 4, 2, 64, [9], torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="TWOTOWER_ATTN_PATH=mma cannot run these inputs"):
        tt.block_attention(*fp32)
    monkeypatch.setenv("TWOTOWER_ATTN_PATH", "wgmma")  # head_dim 64: never the wgmma path, on any device
    d64 = make_inputs(gen, 1, 4, 4, 2, 64, [9], torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="TWOTOWER_ATTN_PATH=wgmma cannot run these inputs: wgmma needs"):
        tt.block_attention(*d64)
    monkeypatch.setenv("TWOTOWER_ATTN_PATH", "tensorcore")
    with pytest.raises(ValueError, match="TWOTOWER_ATTN_PATH must be simt, mma or wgmma"):
        tt.block_attention(*fp32)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
def test_cuda_graph_replay_with_new_ctx_lens(path, gen, monkeypatch):
    """Captured once, replayed with different ctx_lens on the device: the split plan does not depend on them."""
    force_path(monkeypatch, path, 128)
    args = make_inputs(gen, 3, 16, 32, 2, 128, [3000, 20, 0], torch.bfloat16, "cuda", extra_cap=1000)
    ctx_lens = args[5]
    tt.block_attention(*args)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = tt.block_attention(*args)
    for lens in ([3000, 20, 0], [0, 3999, 1], [4000, 4000, 4000], [17, 799, 2001]):
        ctx_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check_against_oracle(args, out, lse)


@pytest.mark.cuda
def test_cuda_out_of_range_ctx_lens_are_clamped(gen):
    args = list(make_inputs(gen, 2, 4, 8, 2, 64, [10, 0], torch.float16, "cuda", extra_cap=0))
    args[5] = torch.tensor([99, -5], dtype=torch.int32, device="cuda")
    out, lse = tt.block_attention(*args)
    args[5] = torch.tensor([10, 0], dtype=torch.int32, device="cuda")
    want_o, want_lse = tt.block_attention(*args)
    torch.testing.assert_close(out, want_o)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device, gen):
    for dtype in (torch.float32, torch.bfloat16):
        args = make_inputs(gen, 2, 4, 8, 2, 64, [9, 0], dtype, device)
        torch.library.opcheck(torch.ops.twotower.block_attention.default, args)
        torch.library.opcheck(torch.ops.twotower.block_attention.default, args, {"scale": 0.5})


def test_compiles_under_torch_compile(gen):
    args = make_inputs(gen, 2, 4, 8, 2, 64, [9, 3], torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def f(*a):
        out, lse = torch.ops.twotower.block_attention(*a)
        return out * 2, lse

    out, lse = f(*args)
    check_against_oracle(args, out / 2, lse)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_argument(device, dtype, gen):
    """out=: written in place (any strides, last dim contiguous), returned as the first result, the same values
    as without it; out=q works (every input is read before out is written)."""
    args = make_inputs(gen, 3, 16, 8, 2, 64, [40, 0, 300], dtype, device)
    want, want_lse = tt.block_attention(*args)
    buf = torch.full((3, 16, 8, 72), 7.0, dtype=dtype, device=device)
    out = buf[..., :64]  # strided: rows 72 wide
    got, lse = tt.block_attention(*args, out=out)
    assert got is out
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
    assert torch.all(buf[..., 64:] == 7.0)  # nothing written past the view
    q = args[0].clone()
    got, _ = tt.block_attention(q, *args[1:], out=q)
    torch.testing.assert_close(q, want, atol=0, rtol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("over,exc,words", [
    (dict(dtype=torch.float16), TypeError, "out must be Float"),
    (dict(shape=(2, 4, 8, 32)), RuntimeError, "out must be [batch, block_len, q_heads, head_dim]"),
    (dict(strided=True), RuntimeError, "out must have a contiguous last dimension"),
])
def test_bad_out_names_it(device, over, exc, words, gen):
    args = make_inputs(gen, 2, 4, 8, 2, 64, [9, 0], torch.float32, device)
    out = torch.empty(over.get("shape", (2, 4, 8, 64)), dtype=over.get("dtype", torch.float32), device=device)
    if over.get("strided"):
        out = torch.empty(2, 4, 8, 128, device=device)[..., ::2]
    with pytest.raises(exc, match=re.escape(words)):
        torch.ops.twotower.block_attention_out(*args, None, out)


@pytest.mark.parametrize("device", devices())
def test_opcheck_out(device, gen):
    args = make_inputs(gen, 2, 4, 8, 2, 64, [9, 0], torch.bfloat16, device)
    torch.library.opcheck(torch.ops.twotower.block_attention_out.default,
                          (*args, 0.5, torch.empty_like(args[0])))
