"""The CUDA MoE's host plan on the CPU: `twotower::cuda_moe_plan` runs the same pure host functions
(csrc/moe/moe_cuda_plan.h) that a CUDA call uses, for any GPU named by compute capability and SM count. Bytes in
flight per SM for each weight format, the prefill chunking that bounds the workspace, when the route is fused into
the up GEMM, and that every plan fits the GPU's shared memory."""
import itertools

import pytest
import torch

FIELDS = ["path", "chunk_tokens", "chunks", "workspace_bytes", "fused_route", "launches", "bm", "stages", "k_tile",
          "gemm_smem", "route_smem", "ctas_per_sm", "up_in_flight", "down_in_flight"]
PATHS = {-1: "unsupported", 0: "simt", 1: "mma"}
# The real model's routed experts (../shared/SPEC.md): hidden 2688, expert width 1856, 128 experts, top-6.
H, I, E, K = 2688, 1856, 128, 6
GROUP = {"dense": 0, "fp8": 0, "int4": 128}
GPUS = {"A100": (80, 108, 163 * 1024, 164 * 1024), "H100": (90, 132, 227 * 1024, 228 * 1024),
        "RTX": (120, 84, 99 * 1024, 100 * 1024)}
BYTES_PER_WEIGHT = {"dense": 2, "fp8": 1, "int4": 0.5}


def plan(fmt, T, dtype=torch.bfloat16, h=H, i=I, e=E, k=K, gpu="H100", group=None):
    cc, sms, optin, per_sm = GPUS[gpu]
    values = torch.ops.twotower.cuda_moe_plan(dtype, fmt, h, i, e, k, T, GROUP[fmt] if group is None else group, cc,
                                              sms, smem_optin=optin, smem_per_sm=per_sm)
    pl = dict(zip(FIELDS, values))
    return {f: (v if f.endswith("in_flight") else int(v)) for f, v in pl.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
@pytest.mark.parametrize("T", [1, 16])
def test_quantised_weights_keep_bf16s_bytes_in_flight(fmt, T, dtype):
    """An AR step (T = 1) and a 16-token denoiser pass on an H100: at least 32 KiB of weights in flight per SM in
    both GEMMs, whatever the format (the k tile holds 128 bytes of a weight row in every format)."""
    pl = plan(fmt, T, dtype)
    assert PATHS[pl["path"]] == "mma"
    assert pl["up_in_flight"] >= 32 * 1024 and pl["down_in_flight"] >= 32 * 1024, pl
    assert pl["k_tile"] * BYTES_PER_WEIGHT[fmt] == 128
    dense = plan("dense", T, dtype)
    assert pl["up_in_flight"] >= 0.65 * dense["up_in_flight"] and pl["down_in_flight"] >= 0.65 * dense["down_in_flight"]


def test_in_flight_table_at_the_real_shapes():
    """The README's table: T = 1 runs 6 experts x 29 / 42 N tiles (1.3 / 1.9 CTAs per SM), so per-CTA depth is what
    counts; T = 16 touches ~69 experts, so occupancy does (int4's larger tiles: 2 CTAs per SM)."""
    for fmt in ("dense", "fp8", "int4"):
        one, sixteen = plan(fmt, 1), plan(fmt, 16)
        assert one["stages"] == sixteen["stages"] == 5 and one["bm"] == sixteen["bm"] == 16
        assert round(one["up_in_flight"] / 1024) == 42 and round(one["down_in_flight"] / 1024) == 61
        assert sixteen["up_in_flight"] == sixteen["ctas_per_sm"] * 4 * 64 * 128
    assert plan("dense", 16)["ctas_per_sm"] == plan("fp8", 16)["ctas_per_sm"] == 3
    assert plan("int4", 16)["ctas_per_sm"] == 2


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_chunks_bound_the_workspace(fmt, dtype):
    """A 32K-token prompt: chunks of at most 4096 tokens whose one shared workspace stays within 256 MiB (unchunked:
    ~2.8 GB of per-slot buffers at the real shapes)."""
    pl = plan(fmt, 32768, dtype)
    assert pl["workspace_bytes"] <= 256 << 20
    assert pl["chunks"] * pl["chunk_tokens"] >= 32768 > (pl["chunks"] - 1) * pl["chunk_tokens"]
    assert 1000 < pl["chunk_tokens"] <= 4096
    # the chunk is as large as the budget allows: one more token would not fit (or the 4096 cap binds)
    es = 4 if dtype == torch.float32 else 2
    per_token = K * (16 + I * es + H * 4)
    assert pl["chunk_tokens"] == 4096 or pl["workspace_bytes"] + per_token + 10 * 256 > 256 << 20


def test_chunking_over_many_shapes():
    for T, h, i, e, k in itertools.product([1, 16, 3000, 4096, 4097, 100000], [64, 2688, 8192], [32, 1856],
                                           [4, 128], [1, 6]):
        if k > e:
            continue
        pl = plan("dense", T, h=h, i=i, e=e, k=k)
        assert pl["workspace_bytes"] <= 256 << 20 or pl["chunk_tokens"] == 1
        assert 1 <= pl["chunk_tokens"] <= min(T, 4096) and pl["chunks"] == -(-T // pl["chunk_tokens"])
        if T <= 16:  # decode never chunks
            assert pl["chunks"] == 1 and pl["chunk_tokens"] == T
    # a small model's prefill: the 4096-token cap, not the budget, cuts it
    small = plan("dense", 4100, h=64, i=32, e=4, k=2)
    assert small["chunk_tokens"] == 4096 and small["chunks"] == 2


def test_route_fused_into_the_up_gemm_for_decode():
    """Up to 512 (token, choice) slots per chunk the up GEMM's CTAs route themselves: 3 launches (up, down,
    combine); past that one route CTA runs first: 4."""
    for T, fused in [(1, True), (16, True), (85, True), (86, False), (4096, False)]:
        pl = plan("int4", T)
        assert pl["fused_route"] == fused and pl["launches"] == (3 if fused else 4), (T, pl)
        assert (pl["route_smem"] > 0) == fused
    assert plan("dense", 1, e=2048, k=6)["fused_route"] == 0  # the counters must fit the CTA: at most 1024 experts
    assert plan("dense", 16, dtype=torch.float32)["fused_route"] == 1  # the SIMT kernel routes too


def test_rows_per_pass_decode_vs_prefill():
    """16 A rows per pass while the mean rows per expert stay <= 4 (T k <= 4 E), 64 for prefill-sized chunks."""
    assert plan("dense", 85)["bm"] == 16 and plan("dense", 86)["bm"] == 64
    for fmt in ("dense", "fp8", "int4"):
        pre = plan(fmt, 8192)
        assert pre["bm"] == 64 and pre["stages"] in (2, 3) and pre["ctas_per_sm"] >= 2


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_every_plan_fits_the_gpus_shared_memory(gpu, fmt):
    _, _, optin, per_sm = GPUS[gpu]
    for T in (1, 16, 64, 256, 32768):
        for dtype in (torch.bfloat16, torch.float16):
            pl = plan(fmt, T, dtype, gpu=gpu)
            assert PATHS[pl["path"]] == "mma"
            assert 2 <= pl["stages"] <= 6 and pl["ctas_per_sm"] >= 1
            assert pl["gemm_smem"] + pl["route_smem"] <= optin
            assert pl["ctas_per_sm"] * (pl["gemm_smem"] + pl["route_smem"] + 1024) <= per_sm


def test_tiles_too_big_for_the_gpu_take_simt():
    """int4 with 128 groups per row at K = 16384: 2 stages of 64 A rows need ~109 KiB, over a 99 KiB GPU's limit."""
    assert PATHS[plan("int4", 256, h=16384, i=1856, gpu="H100", group=128)["path"]] == "mma"
    pl = plan("int4", 256, h=16384, i=1856, gpu="RTX", group=128)
    assert PATHS[pl["path"]] == "simt" and pl["stages"] == 0


def test_simt_plan_has_no_tiles():
    pl = plan("fp8", 16, torch.float32)
    assert PATHS[pl["path"]] == "simt" and pl["stages"] == 0 and pl["up_in_flight"] == 0
    assert PATHS[plan("int4", 16, group=6)["path"]] == "simt"  # groups not a multiple of 8


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cuda_moe_plan needs experts >= 1"):
        torch.ops.twotower.cuda_moe_plan(torch.bfloat16, "dense", 64, 32, 0, 1, 1)
    with pytest.raises(ValueError, match="format must be dense, fp8 or int4"):
        torch.ops.twotower.cuda_moe_plan(torch.bfloat16, "fp4", 64, 32, 4, 1, 1)
