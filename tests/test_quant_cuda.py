"""moe_experts with fp8 / int4 expert weights on CUDA (csrc/moe/moe_cuda.cu, moe_dequant.cuh).

The kernel choice (tensor-core mma vs SIMT) is a pure host function, tested here on the CPU through
twotower::cuda_moe_path; the shapes the GPU tests below use are pinned to the path they are meant to exercise.
The GPU tests (marked `cuda`, skipped without a device) check each (x dtype, format, scale dtype, path):
- against the op on the dequantised weights (quant.dequantize in x's dtype, dense CUDA kernel): the kernels
  dequantise to exactly those values, so on the same path the outputs are bit-identical;
- against the fp64 oracle on the dequantised weights (dtype tolerance);
- odd sizes (odd K: the padded nibble; a short last group; K not a multiple of the k tile), more than 64
  tokens on one expert, NaN weights, strided weights, out=, CUDA-graph capture.
The tile plan itself (a k tile of 128 bytes per weight row in every format, decode vs prefill rows per pass, the
fused route, prefill chunks) is tested on the CPU in test_moe_cuda_plan.py, its modes on the GPU in test_moe_cuda.py.
"""
import pytest
import torch

import twotower_ext as tt
from twotower_ext import quant, reference

from conftest import tolerance

path = torch.ops.twotower.cuda_moe_path
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ---------------------------------------------------------------------------------------------------
# The kernel choice (CPU)

@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
def test_path_real_shapes_take_the_tensor_cores(fmt):
    group = 128 if fmt == "int4" else 0
    for dtype in (torch.bfloat16, torch.float16):
        assert path(dtype, fmt, 2688, 1856, group) == "mma"
    assert path(torch.float32, fmt, 2688, 1856, group) == "simt"  # no fp32 mma


def test_path_alignment_rules():
    bf = torch.bfloat16
    # A rows (x, hidden) in 16-byte chunks: H and I multiples of 8, x's row stride and pointer too.
    for fmt, g in (("dense", 0), ("fp8", 0), ("int4", 128)):
        assert path(bf, fmt, 160, 96, g) == "mma"
        assert path(bf, fmt, 164, 96, g) == "simt"
        assert path(bf, fmt, 160, 100, g) == "simt"
        assert path(bf, fmt, 160, 96, g, pointer_offset=8) == "simt"
        assert path(bf, fmt, 160, 96, g, pointer_offset=16) == "mma"
    # Quantised weight rows in 16-byte chunks of bytes: fp8 K % 16, int4 (two per byte) K % 32 when contiguous.
    assert path(bf, "dense", 168, 96) == "mma"
    assert path(bf, "fp8", 168, 96) == "simt"
    assert path(bf, "fp8", 176, 96) == "mma"
    assert path(bf, "int4", 176, 96, 16) == "simt"
    assert path(bf, "int4", 192, 96, 16) == "mma"
    # Strides (storage units: bytes when quantised) decide, not the row length.
    H, I = 168, 96
    assert path(bf, "fp8", H, I, strides=[H, I * 176, 176, H * I, I]) == "mma"
    assert path(bf, "fp8", 176, I, strides=[176, I * 176, 176, 176 * I + 8, I]) == "simt"
    assert path(bf, "dense", 176, I, strides=[180, I * 176, 176, 176 * I, I]) == "simt"


def test_path_int4_groups():
    bf = torch.bfloat16
    assert path(bf, "int4", 512, 256, 8) == "mma"       # 8 k per dequantised chunk share one scale
    assert path(bf, "int4", 512, 256, 6) == "simt"
    assert path(bf, "int4", 2688, 1856, 8) == "simt"    # 336 groups per row
    assert path(bf, "int4", 2688, 1856, 100) == "simt"
    assert path(bf, "int4", 2048, 1856, 16) == "mma"    # 128 groups per row: the staged scales' limit
    assert path(bf, "int4", 2080, 1856, 16) == "simt"   # 130 groups
    assert path(bf, "int4", 160, 96, 128, scale_dtype=torch.float16) == "mma"  # scale dtype != x's: via fp32


def test_path_rejects_mismatched_scales_and_bad_args():
    assert path(torch.bfloat16, "fp8", 64, 64, scale_dtype=torch.bfloat16) == "unsupported"
    assert path(torch.bfloat16, "int4", 64, 64, 128, scale_dtype=torch.float32) == "unsupported"
    assert path(torch.bfloat16, "int4", 64, 64, 0) == "unsupported"
    with pytest.raises(ValueError, match="format must be dense, fp8 or int4"):
        path(torch.bfloat16, "int8", 64, 64)
    with pytest.raises(ValueError, match="strides must be"):
        path(torch.bfloat16, "fp8", 64, 64, strides=[1, 2])
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        path(torch.float64, "fp8", 64, 64)


# ---------------------------------------------------------------------------------------------------
# The kernels (GPU)

def make(T, E, k, H, I, dtype, fmt, gen, group=128, scale_dtype=torch.bfloat16, ids=None):
    x = torch.randn(T, H, generator=gen).to(dtype)
    up = torch.randn(E, I, H, generator=gen) / H ** 0.5
    down = torch.randn(E, H, I, generator=gen) / I ** 0.5
    qu, qd = (quant.quantize(w, fmt, group, scale_dtype) for w in (up, down))
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen, dtype=torch.float64)
    return x, ids.long(), w, qu, qd


def run_op(x, ids, w, qu, qd, out=None):
    """The CUDA op itself on the quantised storage (no Python fallback in between)."""
    args = [t.cuda() for t in (x, ids, w, qu.data, qd.data)]
    scales = (qu.scale.cuda(), qd.scale.cuda(), qu.group)
    if out is None:
        return torch.ops.twotower.moe_experts(*args, *scales)
    torch.ops.twotower.moe_experts_out(*args, out, *scales)
    return out


def expected_path(x, qu, qd):
    return path(x.dtype, qu.fmt, qu.k, qd.k, qu.group, scale_dtype=qu.scale.dtype)


def check(y, x, ids, w, qu, qd):
    """Bit-identical to the dense kernel on the dequantised weights where both take the same path; within the
    dtype tolerance of the fp64 oracle on them."""
    wu, wd = quant.dequantize(qu, x.dtype), quant.dequantize(qd, x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_cuda
    dense = tt.ops.moe_experts(*(t.cuda() for t in (x, ids, w, wu, wd)))
    if path(x.dtype, "dense", qu.k, qd.k) == expected_path(x, qu, qd):
        torch.testing.assert_close(y, dense, atol=0, rtol=0, equal_nan=True)
    want = reference.moe_experts(x.double(), ids, w, wu.double(), wd.double())
    scale = max(want.nan_to_num().abs().max().item(), 1e-30)
    tol = tolerance(x.dtype) * (4 if x.dtype == torch.float32 else 1)
    torch.testing.assert_close(y.cpu().double(), want, atol=tol * scale, rtol=tol, equal_nan=True)


# (format, H, I, group) -> the path it exercises with bf16 / fp16 x (fp32 x: always SIMT), asserted in the test.
CASES = {
    ("fp8", 160, 96, 0): "mma",     # K = 1.25 k tiles of 128: the last tile mostly past the row
    ("fp8", 64, 48, 0): "mma",      # one k tile, N < the 64-row tile
    ("fp8", 200, 72, 0): "simt",    # K % 8 == 0 but 200-byte rows: not 16-byte aligned
    ("fp8", 53, 37, 0): "simt",     # odd sizes
    ("int4", 160, 96, 128): "mma",  # short last group (32 of 128), I a single short group
    ("int4", 160, 96, 32): "mma",   # two groups per 64-k dequantisation step
    ("int4", 192, 64, 8): "mma",    # the smallest group the mma path takes
    ("int4", 200, 72, 128): "simt",  # 100-byte rows
    ("int4", 53, 37, 16): "simt",   # odd K: the padded high nibble of the last byte
    ("int4", 96, 64, 6): "simt",    # a group that is not a multiple of 8
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("T", [1, 7, 100])
def test_matches_dense_and_oracle(T, case, dtype, gen):
    fmt, H, I, group = case
    x, ids, w, qu, qd = make(T, 8, 2, H, I, dtype, fmt, gen, group=group)
    assert expected_path(x, qu, qd) == ("simt" if dtype == torch.float32 else CASES[case])
    check(run_op(x, ids, w, qu, qd), x, ids, w, qu, qd)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_int4_scale_dtypes(dtype, scale_dtype, gen):
    """Scales of x's own type take the 16-bit dequantisation, the other type the fp32 one: both exact."""
    for H, I in ((160, 96), (53, 37)):
        x, ids, w, qu, qd = make(9, 6, 3, H, I, dtype, "int4", gen, scale_dtype=scale_dtype)
        check(run_op(x, ids, w, qu, qd), x, ids, w, qu, qd)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_real_sizes_reduced_experts(fmt, gen):
    """H 2688 / I 1856 (the real model's; int4: I's last group is 64 long), two experts, both on the mma path."""
    x, ids, w, qu, qd = make(3, 2, 2, 2688, 1856, torch.bfloat16, fmt, gen)
    assert expected_path(x, qu, qd) == "mma"
    check(run_op(x, ids, w, qu, qd), x, ids, w, qu, qd)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("H,I", [(160, 96), (53, 37)])
def test_many_tokens_on_one_expert(fmt, H, I, gen):
    """150 rows on one expert: three 64-row chunks reuse the CTA's staged scales."""
    ids = torch.full((150, 1), 3)
    x, ids, w, qu, qd = make(150, 8, 1, H, I, torch.bfloat16, fmt, gen, ids=ids)
    check(run_op(x, ids, w, qu, qd), x, ids, w, qu, qd)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("H,I", [(160, 96), (53, 37)])
def test_nan_weight_gives_nan(fmt, H, I, gen):
    """A NaN weight makes its row's (fp8) / group's (int4) scale NaN: every output it feeds is NaN, the rest
    match. fp8's NaN code is decoded as NaN too."""
    x = torch.randn(4, H, generator=gen).bfloat16()
    up = torch.randn(4, I, H, generator=gen) / H ** 0.5
    down = torch.randn(4, H, I, generator=gen) / I ** 0.5
    up[1, 5, 7] = float("nan")
    qu, qd = quant.quantize(up, fmt), quant.quantize(down, fmt)
    if fmt == "fp8":
        qd.data.view(torch.uint8)[2, 3, 4] = 0x7F  # a NaN code under a finite scale
    ids = torch.tensor([[1, 0], [2, 3], [0, 3], [1, 2]])
    w = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    y = run_op(x, ids, w, qu, qd)
    assert y[0].isnan().all() and y[3].isnan().all()  # expert 1's hidden unit 5 feeds every output
    if fmt == "fp8":
        assert y[1].isnan().nonzero().flatten().tolist() == [3] and not y[2].isnan().any()
    else:
        assert not y[1:3].isnan().any()
    check(y, x, ids, w, qu, qd)


def padded_on_cuda(q, first, pad=16):
    """q's experts [first:] as views of a CUDA stack with `pad` spare bytes per row (row stride != row bytes)."""
    E, N, kb = q.data.shape
    buf = torch.zeros(E, N, kb + pad, dtype=q.data.dtype, device="cuda")
    buf[..., :kb].copy_(q.data.cuda())
    return quant.QuantizedExperts(q.fmt, buf[first:, :, :kb], q.scale[first:].cuda(), q.k, q.group)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("H,I", [(160, 96), (53, 37)])
def test_strided_weights_and_out(fmt, H, I, gen):
    """Expert slices of a larger stack with padded rows (strides in bytes), out= with a row stride, int32 ids."""
    x, ids, w, qu, qd = make(5, 10, 2, H, I, torch.bfloat16, fmt, gen)
    gu, gd = padded_on_cuda(qu, 2), padded_on_cuda(qd, 2)
    assert gu.data.stride(1) != gu.data.shape[2]
    ids = ids % 8
    out = torch.full((5, H + 40), 7.0, dtype=torch.bfloat16, device="cuda")[:, :H]
    y = run_op(x, ids.int(), w, gu, gd, out=out)
    assert y.data_ptr() == out.data_ptr()
    check(out, x, ids, w, gu.to("cpu"), gd.to("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_public_op_takes_quantized_experts(fmt, gen):
    x, ids, w, qu, qd = make(6, 8, 2, 160, 96, torch.float16, fmt, gen)
    y = tt.ops.moe_experts(*(t.cuda() for t in (x, ids, w)), qu.to("cuda"), qd.to("cuda"))
    torch.testing.assert_close(y, run_op(x, ids, w, qu, qd), atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_cuda_graph_capture(fmt, gen):
    x, ids, w, qu, qd = make(16, 64, 6, 256, 128, torch.bfloat16, fmt, gen)
    xc, idc, wc = (t.cuda() for t in (x, ids, w))
    qu, qd = qu.to("cuda"), qd.to("cuda")
    out = torch.empty_like(xc)
    args = lambda: (xc, idc, wc, qu.data, qd.data, out, qu.scale, qd.scale, qu.group)  # noqa: E731
    torch.ops.twotower.moe_experts_out(*args())
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.ops.twotower.moe_experts_out(*args())
    new_ids = torch.stack([torch.randperm(64, generator=gen)[:6] for _ in range(16)])
    idc.copy_(new_ids)
    g.replay()
    torch.cuda.synchronize()
    check(out, x, new_ids, w, qu.to("cpu"), qd.to("cpu"))
