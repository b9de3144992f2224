"""The CUDA attention's host plan and path choice, on the CPU: `twotower::cuda_attention_plan` runs the same pure
host functions (csrc/block_attention/block_attention_cuda_plan.h) that a CUDA call uses, for any GPU named by
its compute capability. Grid limits, shared memory, split sizes and which kernel each model gets."""
import itertools
import random

import pytest
import torch

FIELDS = ["path", "grid_x", "grid_y", "grid_z", "threads", "smem", "tile", "stages", "rows_per_cta", "split_unit",
          "merge", "row_splits", "row_chunk", "split_align"]
PATHS = {0: "simt", 1: "mma", 2: "wgmma"}
SMEM_OPTIN = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024}
WAVE_FROM_KEYS = 1024  # block_attention_cuda_plan.h: ba_cuda::kWaveFromKeys


def plan(B, S, Hq, Hkv, D, L, dtype="bfloat16", cc=90, sms=132, **kw):
    return dict(zip(FIELDS, torch.ops.twotower.cuda_attention_plan(B, S, Hq, Hkv, D, L, dtype, cc, sms, **kw)))


def ceil_div(a, b):
    return -(-a // b)


def check_plan(pl, B, S, Hq, Hkv, D, L, cc, sms):
    M = S * (Hq // Hkv)
    keys = L + S
    assert 1 <= pl["threads"] <= 1024 and pl["threads"] % 32 == 0
    assert 0 < pl["smem"] <= SMEM_OPTIN[cc]
    assert pl["grid_z"] == B <= 65535
    assert pl["grid_y"] == Hkv * ceil_div(M, pl["rows_per_cta"]) <= 65535
    # 128 rows per CTA only where the grid fills a wave of SMs without any split
    assert (pl["rows_per_cta"] == 128) == (PATHS[pl["path"]] != "simt" and M > 64 and B * Hkv * ceil_div(M, 128) >= sms)
    align = pl["split_align"]
    assert align == (pl["tile"] if PATHS[pl["path"]] == "wgmma" else 8)
    assert pl["split_unit"] % align == 0 and align <= pl["split_unit"] <= 4 * max(M, pl["tile"]) + align
    ctas = B * pl["grid_y"]
    # A row of WAVE_FROM_KEYS context keys fills a wave (where the alignment allows), unless splits of
    # 4 x max(M, tile) keys already do.
    if pl["split_unit"] > align and pl["split_unit"] < 4 * max(M, pl["tile"]):
        assert ceil_div(WAVE_FROM_KEYS + S, pl["split_unit"]) * ctas >= sms
    # Splits: never more than the longest row can fill with split_unit keys each; else enough CTAs for 2 waves.
    most = max(1, ceil_div(keys, pl["split_unit"]))
    assert pl["grid_x"] == min(most, max(1, ceil_div(2 * sms, ctas)))
    assert pl["merge"] == (pl["grid_x"] > 1)


def check_row(pl, ctx, S):
    keys = ctx + S
    n, chunk = pl["row_splits"], pl["row_chunk"]
    assert 1 <= n <= pl["grid_x"] and chunk % pl["split_align"] == 0 and chunk >= pl["split_unit"]
    assert (n - 1) * chunk < keys <= n * chunk  # the splits cover the row, none of them empty
    # As many splits as the grid and the row's own length allow (not the cache's), less what rounding the
    # chunks up to the alignment costs.
    want = min(pl["grid_x"], ceil_div(keys, pl["split_unit"]))
    assert n <= want
    if chunk > pl["split_unit"]:
        assert chunk - pl["split_align"] < ceil_div(keys, pl["grid_x"])


@pytest.mark.parametrize("cc,sms", [(80, 108), (90, 132)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_limits_over_many_shapes(cc, sms, dtype):
    rng = random.Random(0)
    for B, Hkv, G, S, D, L in itertools.product([1, 2, 3, 16, 64, 255, 256], [1, 2, 3, 8], [1, 2, 16],
                                                [1, 16], [16, 40, 64, 128, 256], [0, 1, 127, 4096, 262144]):
        if rng.random() > 0.3:  # a third of the grid (~2500 shapes per case) keeps the test fast
            continue
        ctx = rng.randint(0, L)
        pl = plan(B, S, G * Hkv, Hkv, D, L, dtype, cc, sms, ctx_len=ctx)
        check_plan(pl, B, S, G * Hkv, Hkv, D, L, cc, sms)
        check_row(pl, ctx, S)


@pytest.mark.parametrize("path", ["simt", "mma", "wgmma"])
def test_row_splits_cover_every_length(path):
    """The model's shapes (S 16, 32q/2kv, D 128) in a 256K cache: every row length splits into non-empty chunks
    of at least split_unit keys; a short row spreads over as many splits as its own length fills."""
    for ctx in [0, 1, 15, 1007, 1008, 1009, 4096, 20000, 65535, 100000, 262144]:
        pl = plan(1, 16, 32, 2, 128, 262144, cc=90, sms=132, path=path, ctx_len=ctx)
        check_row(pl, ctx, 16)
    short = plan(1, 16, 32, 2, 128, 262144, cc=90, sms=132, path="mma", ctx_len=1024)
    assert short["row_splits"] == ceil_div(1024 + 16, short["split_unit"]) > 2


# The real model (32 q heads, 2 KV heads, head_dim 128) on an H100 (132 SMs): a denoiser pass (16 block tokens,
# bidirectional), the context tower's extension by a committed block (16 tokens, causal) and an AR step (1 token).
REAL_SHAPES = {"denoiser": 16, "extension": 16, "ar_step": 1}
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


def ctas_at_b1(S, ctx, capacity, path=""):
    pl = plan(1, S, 32, 2, 128, capacity, cc=90, sms=132, path=path, ctx_len=ctx)
    return pl["row_splits"] * pl["grid_y"], pl


@pytest.mark.parametrize("shape", sorted(REAL_SHAPES))
def test_real_shapes_fill_a_wave_at_batch_1(shape):
    """B = 1 on 132 SMs: at least one CTA per SM from a 1K context up, whether the cache holds just the row or is
    a 128K cache the row sits in (the grid is sized for the cache; each row splits by its own length)."""
    S = REAL_SHAPES[shape]
    for ctx in CONTEXTS:
        for capacity in (ctx, 131072):
            ctas, pl = ctas_at_b1(S, ctx, capacity)
            assert PATHS[pl["path"]] == "mma"
            assert ctas >= 132, (shape, ctx, capacity, pl)
            assert ctas <= 2 * 132 + pl["grid_y"], (shape, ctx, capacity, pl)  # at most ~2 waves
    # The opt-in wgmma kernel keeps whole 128-key tiles per split: a 16-token block fills a wave from 2K up (an AR
    # step's 16 rows per KV head leave its 64-row warpgroup 3/4 idle anyway).
    if S == 16:
        for ctx in CONTEXTS[1:]:
            assert ctas_at_b1(S, ctx, 131072, path="wgmma")[0] >= 132


def test_real_shapes_plan_table():
    """What each row of the plan table in the README's GPU section comes from: the denoiser pass at B = 1 on an
    H100 gets 4-warp mma CTAs (64 rows, 8 per split) and splits that make a wave at 1K, two at 4K and up."""
    ctas = {ctx: ctas_at_b1(16, ctx, ctx)[0] for ctx in CONTEXTS}
    assert ctas[1024] >= 132 and all(ctas[ctx] >= 2 * 132 for ctx in CONTEXTS[2:])
    pl = ctas_at_b1(16, 4096, 4096)[1]
    assert pl["rows_per_cta"] == 64 and pl["grid_y"] == 8 and pl["threads"] == 128


def test_wave_count_includes_row_blocks():
    # M = 256 packed rows: 4 row blocks of 64 (mma, 4 warps at B = 1) or 16 of 16 (simt) per KV head; 8 warps
    # (2 row blocks of 128) once the batch alone fills the SMs.
    mma = plan(1, 16, 32, 2, 128, 262144, path="mma")
    simt = plan(1, 16, 32, 2, 128, 262144, path="simt")
    assert mma["grid_y"] == 2 * 4 and simt["grid_y"] == 2 * 16
    assert mma["grid_x"] == ceil_div(2 * 132, 8) and simt["grid_x"] == ceil_div(2 * 132, 32)
    wide = plan(33, 16, 32, 2, 128, 4096, path="mma")
    assert wide["rows_per_cta"] == 128 and wide["grid_y"] == 2 * 2


def test_one_split_means_no_merge():
    pl = plan(128, 16, 32, 2, 128, 4096, path="mma")  # 512 CTAs per split already fill 2 waves of 132 SMs
    assert pl["grid_x"] == 1 and pl["merge"] == 0 and pl["row_splits"] == 1
    tiny = plan(1, 1, 4, 4, 64, 0, path="simt")
    assert tiny["grid_x"] == 1 and tiny["merge"] == 0


def test_mma_stages_where_shared_memory_allows():
    # 8 warps (1 CTA/SM by registers; a batch that fills the SMs): 3 stages (102 KiB) fit on A100 and H100; 4 warps
    # (2 CTAs/SM) at head_dim 128 only where two 3-stage rings fit an SM (H100, not A100); sm_86-class GPUs
    # (100 KiB/SM) keep 2 at 64.
    assert plan(64, 16, 32, 2, 128, 4096, cc=80, sms=108, path="mma")["stages"] == 3
    assert plan(1, 16, 32, 2, 128, 4096, cc=80, sms=108, path="mma")["stages"] == 2
    assert plan(1, 16, 4, 4, 128, 4096, cc=80, sms=108, path="mma")["stages"] == 2
    assert plan(1, 16, 4, 4, 128, 4096, cc=90, sms=132, path="mma")["stages"] == 3
    assert plan(1, 16, 4, 4, 64, 4096, cc=86, sms=84, path="mma")["stages"] == 2
    assert plan(1, 16, 4, 2, 16, 4096, cc=86, sms=84, path="mma")["stages"] == 3
    w = plan(1, 16, 32, 2, 128, 4096, cc=90, sms=132, path="wgmma")  # one consumer warpgroup at B = 1
    assert w["stages"] == 3 and w["smem"] <= 227 * 1024 and w["threads"] == 256
    w = plan(64, 16, 32, 2, 128, 4096, cc=90, sms=132, path="wgmma")  # two once the batch fills the SMs
    assert w["stages"] == 3 and w["smem"] <= 227 * 1024 and w["threads"] == 384


# The models: the parity checkpoint (4q/2kv, head_dim 16), the shipped model (4q/2kv, 40), the real model (32q/2kv,
# 128); GPUs: A100 (sm_80), H100/H200 (sm_90), B200 (sm_100, PTX JIT), RTX 50xx (sm_120), GB10 (sm_121).
MODELS = {"parity": (4, 2, 16), "shipped": (4, 2, 40), "real": (32, 2, 128)}
GPUS = {80: 108, 90: 132, 100: 148, 120: 84, 121: 48}
EXPECTED = {  # (model, dtype) -> default path on every GPU above (wgmma is opt-in until verified on Hopper)
    ("parity", "float32"): "simt", ("parity", "bfloat16"): "mma", ("parity", "float16"): "mma",
    ("shipped", "float32"): "simt", ("shipped", "bfloat16"): "simt", ("shipped", "float16"): "simt",
    ("real", "float32"): "simt", ("real", "bfloat16"): "mma", ("real", "float16"): "mma",
}


@pytest.mark.parametrize("cc", sorted(GPUS))
@pytest.mark.parametrize("model,dtype", sorted(EXPECTED))
def test_path_selection_per_model_and_gpu(model, dtype, cc):
    Hq, Hkv, D = MODELS[model]
    pl = plan(4, 16, Hq, Hkv, D, 8192, dtype, cc, GPUS[cc])
    assert PATHS[pl["path"]] == EXPECTED[model, dtype]
    check_plan(pl, 4, 16, Hq, Hkv, D, 8192, cc, GPUS[cc])
    # Every path the inputs allow can be forced; the others are refused with the reason.
    for path in ["simt", "mma", "wgmma"]:
        ok = path == "simt" or (dtype != "float32" and (D in (16, 32, 64, 128) if path == "mma" else
                                                        D == 128 and cc == 90))
        if ok:
            assert PATHS[plan(4, 16, Hq, Hkv, D, 8192, dtype, cc, GPUS[cc], path=path)["path"]] == path
        else:
            with pytest.raises(RuntimeError, match=f"path={path} cannot run these inputs: {path} needs"):
                plan(4, 16, Hq, Hkv, D, 8192, dtype, cc, GPUS[cc], path=path)


def test_wgmma_refuses_builds_without_sm90a_code():
    with pytest.raises(RuntimeError, match="no sm_90a code of the wgmma kernel"):
        plan(1, 16, 32, 2, 128, 4096, cc=90, path="wgmma", sm90a_image=False)
    with pytest.raises(RuntimeError, match="wgmma needs an sm_90"):
        plan(1, 16, 32, 2, 128, 4096, cc=100, sms=148, path="wgmma")


@pytest.mark.parametrize("D", [1, 8, 24, 40, 72, 136, 200, 256])
def test_simt_takes_every_head_dim_up_to_256(D):
    for cc in GPUS:
        pl = plan(2, 16, 4, 2, D, 1000, "float32", cc, GPUS[cc])
        assert PATHS[pl["path"]] == "simt" and pl["smem"] <= SMEM_OPTIN[cc]


def test_refusals_name_the_limit():
    with pytest.raises(RuntimeError, match="no CUDA kernel for these inputs: simt takes head_dim 1..256"):
        plan(1, 16, 4, 2, 264, 100)
    with pytest.raises(RuntimeError, match="batch exceeds the CUDA grid limit of 65535"):
        plan(65536, 1, 4, 2, 64, 100)
    with pytest.raises(ValueError, match="path must be simt, mma or wgmma"):
        plan(1, 16, 4, 2, 64, 100, path="tensorcore")
    with pytest.raises(ValueError, match="ctx_len must be <= ctx_capacity"):
        plan(1, 16, 4, 2, 64, 100, ctx_len=101)


def test_last_launch_is_empty_before_any_cuda_call():
    assert torch.ops.twotower.cuda_attention_last_launch() == ""
