"""CUDA block_attention beyond the base suite (tests/test_block_attention.py): every head dim up to 256, causal
masking in every kernel, rows with one split (direct write, no merge) and several, and which kernel really ran
(the op's own report, twotower::cuda_attention_last_launch), checked against the host plan of the same shapes
(twotower::cuda_attention_plan). All marked `cuda`: they skip without a GPU."""
import pytest
import torch

import twotower_ext as tt
from twotower_ext import reference

pytestmark = pytest.mark.cuda

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
PLAN_FIELDS = ["path", "grid_x", "grid_y", "grid_z", "threads", "smem", "tile", "stages", "rows_per_cta",
               "split_unit", "merge", "row_splits", "row_chunk", "split_align"]


def inputs(gen, B, S, Hq, Hkv, D, lens, dtype, extra=7):
    """Random inputs on the GPU; the context is a slice of a longer cache (strides not those of a dense tensor)."""
    L = max(lens) + extra
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(dtype).cuda()  # noqa: E731
    cache = rnd(2, B, L + 3, Hkv, D)
    return (rnd(B, S, Hq, D), rnd(B, S, Hkv, D), rnd(B, S, Hkv, D), cache[0, :, :L], cache[1, :, :L],
            torch.tensor(lens, dtype=torch.int32, device="cuda"))


def check(args, out, lse, causal=False):
    """Against the fp64 reference on the same (rounded) inputs: fp32 accumulation, P rounded to 16 bits on the
    tensor-core paths, the output rounded to the input dtype."""
    cpu = [a.cpu().double() if a.is_floating_point() else a.cpu() for a in args]
    want_o, want_lse = reference.block_attention(*cpu, causal=causal)
    tol = TOL[args[0].dtype]
    assert out.dtype == args[0].dtype and not out.isnan().any()
    torch.testing.assert_close(out.cpu().double(), want_o, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-5)


def last_launch() -> str:
    return torch.ops.twotower.cuda_attention_last_launch()


def device_plan(B, S, Hq, Hkv, D, L, dtype, path="", ctx_len=-1):
    """The host plan for this GPU (its compute capability, SM count and shared-memory limits)."""
    props = torch.cuda.get_device_properties()
    major, minor = torch.cuda.get_device_capability()
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    values = torch.ops.twotower.cuda_attention_plan(B, S, Hq, Hkv, D, L, name, 10 * major + minor,
                                                    props.multi_processor_count, path=path, ctx_len=ctx_len,
                                                    smem_optin=optin, smem_per_sm=per_sm)
    return dict(zip(PLAN_FIELDS, values))


def force(monkeypatch, path, D=128, dtype=torch.bfloat16):
    if path == "wgmma" and (D != 128 or dtype == torch.float32 or torch.cuda.get_device_capability() != (9, 0)):
        pytest.skip("the wgmma path runs bf16/fp16 head_dim 128 on sm_90 devices only")
    if path == "mma" and (D not in (16, 32, 64, 128) or dtype == torch.float32):
        pytest.skip("the mma path runs bf16/fp16 head_dim 16/32/64/128")
    monkeypatch.setenv("TWOTOWER_ATTN_PATH", path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 16, 24, 32, 40, 64, 72, 128, 136, 200, 256])
def test_every_head_dim(D, dtype, gen, monkeypatch):
    """Default path (simt, or mma for 16/32/64/128 in bf16), ragged rows incl. an empty context."""
    monkeypatch.delenv("TWOTOWER_ATTN_PATH", raising=False)
    args = inputs(gen, 4, 16, 4, 2, D, [0, 1, 37, 700], dtype)
    out, lse = tt.block_attention(*args)
    check(args, out, lse)
    want = "mma" if dtype == torch.bfloat16 and D in (16, 32, 64, 128) else "simt"
    assert last_launch().startswith(f"{want}_split_kernel<"), last_launch()


@pytest.mark.parametrize("D", [8, 40, 136, 256])
def test_simt_forced_every_width(D, gen, monkeypatch):
    force(monkeypatch, "simt", D)
    args = inputs(gen, 3, 16, 8, 2, D, [5, 0, 2100], torch.bfloat16)
    out, lse = tt.block_attention(*args)
    check(args, out, lse)
    assert last_launch().startswith("simt_split_kernel<bf16"), last_launch()


@pytest.mark.parametrize("path", ["simt", "mma", "wgmma"])
@pytest.mark.parametrize("S,Hq,Hkv,D,lens", [
    (16, 32, 2, 128, [0, 1, 700, 3000]),   # the model's shapes: M = 256, four 64-row blocks / one consumer
    (1, 4, 4, 128, [0, 9, 300]),           # an AR step: causal = non-causal
    (40, 4, 2, 64, [17, 2001]),            # block keys straddle tiles
    (16, 4, 2, 16, [0, 130]),              # the parity checkpoint's head dim
])
def test_causal(path, S, Hq, Hkv, D, lens, gen, monkeypatch):
    force(monkeypatch, path, D)
    args = inputs(gen, len(lens), S, Hq, Hkv, D, lens, torch.bfloat16)
    out, lse = tt.block_attention(*args, causal=True)
    check(args, out, lse, causal=True)
    assert last_launch().startswith(f"{path}_split_kernel<"), last_launch()
    if S > 1:  # the mask matters: not the unmasked result
        full, _ = tt.block_attention(*args)
        assert not torch.allclose(full, out)


@pytest.mark.parametrize("path", ["simt", "mma", "wgmma"])
def test_causal_split_holding_only_later_block_keys(path, gen, monkeypatch):
    """A row whose last split starts inside the block (chunks rounded up to the tile leave it a few keys): its
    early queries see no key of that split, a partial state with lse = -inf that the merge must weigh 0."""
    force(monkeypatch, path)
    S, Hq, Hkv, D, L = 16, 4, 2, 128, 20000
    for ctx in range(L):  # the host plan says where this GPU's splits of a row of ctx + S keys start
        pl = device_plan(1, S, Hq, Hkv, D, L, torch.bfloat16, path=path, ctx_len=ctx)
        if pl["row_splits"] > 1 and ctx < (pl["row_splits"] - 1) * pl["row_chunk"] < ctx + S - 1:
            break
    else:
        pytest.fail(f"no row length up to {L} puts a split boundary inside the block on this GPU")
    args = inputs(gen, 1, S, Hq, Hkv, D, [ctx], torch.bfloat16, extra=L - ctx)
    out, lse = tt.block_attention(*args, causal=True)
    check(args, out, lse, causal=True)
    assert "merge_kernel" in last_launch(), last_launch()


@pytest.mark.parametrize("path", ["simt", "mma", "wgmma"])
def test_launch_matches_host_plan(path, gen, monkeypatch):
    """The kernel that ran is the one the host plan names for this GPU: path, variant, stages and grid."""
    force(monkeypatch, path)
    B, S, Hq, Hkv, D, lens = 2, 16, 32, 2, 128, [4000, 50]
    args = inputs(gen, B, S, Hq, Hkv, D, lens, torch.bfloat16)
    out, lse = tt.block_attention(*args)
    check(args, out, lse)
    pl = device_plan(B, S, Hq, Hkv, D, args[3].shape[1], torch.bfloat16, path=path)
    ran = last_launch()
    assert ran.startswith(f"{path}_split_kernel<") and f"grid({pl['grid_x']},{pl['grid_y']},{pl['grid_z']})" in ran, \
        (ran, pl)
    if path != "simt":
        assert f"stages={pl['stages']}" in ran, (ran, pl)
    assert ("merge_kernel" in ran) == bool(pl["merge"]), (ran, pl)


@pytest.mark.parametrize("path", ["simt", "mma", "wgmma"])
def test_single_split_writes_out_directly(path, gen, monkeypatch):
    """Enough (row, head, row block) CTAs for two waves: one split, no partials, no merge launch; out=q works."""
    force(monkeypatch, path)
    sms = torch.cuda.get_device_properties().multi_processor_count
    B = 2 * sms  # x Hkv 2 x row blocks >= 1: at least 2 waves without splitting
    args = inputs(gen, B, 16, 8, 2, 128, [int(x) for x in torch.randint(0, 300, (B,), generator=gen)], torch.bfloat16)
    pl = device_plan(B, 16, 8, 2, 128, args[3].shape[1], torch.bfloat16, path=path)
    assert pl["grid_x"] == 1 and not pl["merge"]
    out, lse = tt.block_attention(*args)
    check(args, out, lse)
    assert "merge_kernel" not in last_launch(), last_launch()
    q = args[0].clone()
    tt.block_attention(q, *args[1:], out=q)
    torch.testing.assert_close(q, out, atol=0, rtol=0)


@pytest.mark.parametrize("path", ["mma", "wgmma"])
def test_128_row_ctas_once_the_batch_fills_the_sms(path, gen, monkeypatch):
    """The model's shapes at a batch whose (row, KV head, 128-row block) CTAs alone fill the SMs: the 8-warp mma /
    two-consumer wgmma variant, causal, ragged rows, against the oracle."""
    force(monkeypatch, path)
    sms = torch.cuda.get_device_properties().multi_processor_count
    B = -(-sms // 4)  # x 2 KV heads x 2 row blocks of 128 >= one wave
    lens = [int(x) for x in torch.randint(0, 600, (B,), generator=gen)]
    args = inputs(gen, B, 16, 32, 2, 128, lens, torch.bfloat16)
    out, lse = tt.block_attention(*args, causal=True)
    check(args, out, lse, causal=True)
    pl = device_plan(B, 16, 32, 2, 128, args[3].shape[1], torch.bfloat16, path=path)
    assert pl["rows_per_cta"] == 128
    assert ("warps=8" if path == "mma" else "consumers=2") in last_launch(), last_launch()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S,ctx", [(16, 1024), (16, 4096), (1, 1024)])
def test_batch_1_real_shapes_split_into_a_wave(S, ctx, causal, gen, monkeypatch):
    """B = 1, the model's heads, a row in a longer cache: the default kernel splits the row into at least one CTA
    per SM (the host plan's row_splits x grid_y), and the merged result matches the oracle."""
    monkeypatch.delenv("TWOTOWER_ATTN_PATH", raising=False)
    args = inputs(gen, 1, S, 32, 2, 128, [ctx], torch.bfloat16, extra=3000)
    out, lse = tt.block_attention(*args, causal=causal)
    check(args, out, lse, causal=causal)
    pl = device_plan(1, S, 32, 2, 128, args[3].shape[1], torch.bfloat16, ctx_len=ctx)
    sms = torch.cuda.get_device_properties().multi_processor_count
    assert pl["row_splits"] * pl["grid_y"] >= sms, pl
    assert "merge_kernel" in last_launch() and f"grid({pl['grid_x']},{pl['grid_y']},1)" in last_launch(), last_launch()


@pytest.mark.parametrize("path", ["simt", "mma", "wgmma"])
def test_graph_replay_causal_with_new_ctx_lens(path, gen, monkeypatch):
    """Per-row splits are sized on the device: a captured graph replays correctly for other ctx_lens, including
    rows that switch between one split (direct write) and several."""
    force(monkeypatch, path)
    args = inputs(gen, 3, 16, 32, 2, 128, [3000, 20, 0], torch.bfloat16, extra=3000)
    tt.block_attention(*args, causal=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = tt.block_attention(*args, causal=True)
    for lens in ([3000, 20, 0], [0, 5999, 1], [6000, 6000, 6000], [17, 1500, 4001]):
        args[5].copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check(args, out, lse, causal=True)


def test_models_run_without_refusal(gen, monkeypatch):
    """The parity checkpoint (4q/2kv, head_dim 16), the shipped model (40) and the real model (32q/2kv, 128) all
    have a CUDA kernel in every dtype; the one that ran is the host plan's default."""
    monkeypatch.delenv("TWOTOWER_ATTN_PATH", raising=False)
    names = {0: "simt", 1: "mma", 2: "wgmma"}
    for Hq, Hkv, D in [(4, 2, 16), (4, 2, 40), (32, 2, 128)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            args = inputs(gen, 2, 16, Hq, Hkv, D, [100, 0], dtype)
            out, lse = tt.block_attention(*args)
            check(args, out, lse)
            want = names[device_plan(2, 16, Hq, Hkv, D, args[3].shape[1], dtype)["path"]]
            assert last_launch().startswith(f"{want}_split_kernel<"), (Hq, Hkv, D, dtype, last_launch())
