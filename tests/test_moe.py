"""moe_experts: the kernels against an fp64 oracle (the reference on fp64 inputs) over E, k, T, odd hidden /
inter sizes, dtypes, every CPU instruction set and inner GEMM this CPU runs; routing corner cases (experts
with no tokens, all tokens on one expert, duplicate ids in a row), strided and aliased tensors, NaN, bad input,
opcheck and torch.compile."""
import pytest
import torch

import twotower_ext as tt
from twotower_ext import packed, reference
from twotower_ext.threads import using_threads

from conftest import devices, tolerance

ISAS = ["scalar", "avx2", "avx512", "avx512_bf16"]


def make(T, E, k, H, I, dtype, gen, ids=None):
    x = torch.randn(T, H, generator=gen).to(dtype)
    up = (torch.randn(E, I, H, generator=gen) / H ** 0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64)
    return x, ids.long(), w, up, down


def oracle(x, ids, w, up, down):
    """fp64 everywhere (the hidden activation is not rounded to x's dtype: within the dtype tolerance)."""
    with using_threads(1):   # the reference's many small matmuls would each pay an OpenMP wake-up
        return reference.moe_experts(x.double(), ids, w.double(), up, down)


def check(y, x, ids, w, up, down, dtype=None):
    dtype = dtype or x.dtype
    want = oracle(x.cpu(), ids.cpu(), w.cpu(), up.cpu(), down.cpu())
    assert y.dtype == x.dtype and y.shape == x.shape
    scale = max(want.abs().max().item(), 1e-30)
    tol = tolerance(dtype) * (4 if dtype == torch.float32 else 1)
    torch.testing.assert_close(y.cpu().double(), want, atol=tol * scale, rtol=tol)


def isa_supported(isa):
    x, ids, w, up, down = make(1, 2, 1, 8, 8, torch.float32, torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWOTOWER_MOE_CPU_ISA", isa)
        try:
            tt.ops.moe_experts(x, ids, w, up, down)
        except ValueError as e:
            assert "does not run it" in str(e)
            return False
    return True


SUPPORTED = [i for i in ISAS if isa_supported(i)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 16, 100, 512])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 4), (128, 6)])
def test_matches_oracle(E, k, T, dtype, device, gen):
    H, I = (48, 24) if T == 512 else (160, 96)
    x, ids, w, up, down = make(T, E, k, H, I, dtype, gen)
    y = tt.ops.moe_experts(*(t.to(device) for t in (x, ids, w, up, down)))
    check(y, x, ids, w, up, down)


@pytest.mark.parametrize("isa", SUPPORTED)
@pytest.mark.parametrize("gemm", ["micro", "library", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_isa_and_gemm(isa, gemm, dtype, monkeypatch, gen):
    """Odd sizes (k tails, N tails of every microkernel block), tokens per expert from 1 to 40."""
    monkeypatch.setenv("TWOTOWER_MOE_CPU_ISA", isa)
    monkeypatch.setenv("TWOTOWER_MOE_CPU_GEMM", gemm)
    ids = torch.randint(0, 3, (40, 2), generator=gen)
    ids[:, 1] = 3 + torch.randint(0, 5, (40,), generator=gen)  # expert 3..7: few tokens each
    x, ids, w, up, down = make(40, 8, 2, 53, 37, dtype, gen, ids=ids)
    check(tt.ops.moe_experts(x, ids, w, up, down), x, ids, w, up, down)


@pytest.mark.parametrize("gemm", ["auto", "library"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_sizes_reduced_experts(dtype, gemm, monkeypatch, gen):
    """H 2688 / I 1856 (the real model's), two experts: the weights' full k loops and N tiles, on the threaded
    path (over 4 MB of weights) with each inner GEMM."""
    monkeypatch.setenv("TWOTOWER_MOE_CPU_GEMM", gemm)
    x, ids, w, up, down = make(3, 2, 2, 2688, 1856, dtype, gen)
    check(tt.ops.moe_experts(x, ids, w, up, down), x, ids, w, up, down)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_fp32_token_is_batch_invariant_at_any_rows_per_expert(nthreads, gen):
    """fp32 keeps every expert on the microkernel however many tokens choose it (the library's blocking would
    follow the rows): 300 tokens on 4 experts (~150 rows each, past where bf16 takes the library) give every token
    the bits it gets alone, in a slice of the batch and at 1 or 2 threads."""
    x, ids, w, up, down = make(300, 4, 2, 96, 64, torch.float32, gen)
    with using_threads(nthreads):
        y = tt.ops.moe_experts(x, ids, w, up, down)
    with using_threads(1):
        for rows in (slice(0, 1), slice(299, 300), slice(40, 97)):
            assert torch.equal(tt.ops.moe_experts(x[rows], ids[rows], w[rows], up, down), y[rows]), rows
    check(y, x, ids, w, up, down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_in_dtype(dtype, gen):
    """Same rounding points as the reference in the storage dtype (hidden rounded once): only summation order
    differs, so far inside the dtype tolerance."""
    x, ids, w, up, down = make(16, 16, 4, 160, 96, dtype, gen)
    y = tt.ops.moe_experts(x, ids, w, up, down)
    with using_threads(1):
        want = reference.moe_experts(x, ids, w, up, down)
    torch.testing.assert_close(y.float(), want.float(), atol=tolerance(dtype) * 0.5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("device", devices())
def test_routing_corner_cases(device, gen):
    E, H, I = 16, 40, 24
    cases = {
        "all tokens on one expert": torch.full((100, 1), 5),
        "duplicate ids in a row": torch.tensor([[3, 3], [1, 3], [3, 1], [0, 0]]),
        "one token, most experts empty": torch.tensor([[15, 0, 7]]),
        "all tokens on one expert, duplicated": torch.full((33, 4), 2),
    }
    for name, ids in cases.items():
        T, k = ids.shape
        x, ids, w, up, down = make(T, E, k, H, I, torch.float32, gen, ids=ids)
        y = tt.ops.moe_experts(*(t.to(device) for t in (x, ids, w, up, down)))
        check(y, x, ids, w, up, down)


@pytest.mark.parametrize("device", devices())
def test_int32_ids_fp32_weights_and_k_zero(device, gen):
    x, ids, w, up, down = make(7, 8, 3, 32, 16, torch.float32, gen)
    args = [t.to(device) for t in (x, ids.int(), w.float(), up, down)]
    check(tt.ops.moe_experts(*args), x, ids, w.float(), up, down)
    y0 = tt.ops.moe_experts(x.to(device), ids[:, :0].to(device), w[:, :0].to(device), up.to(device), down.to(device))
    assert torch.equal(y0.cpu(), torch.zeros_like(x))


@pytest.mark.parametrize("device", devices())
def test_strided_tensors_and_out(device, gen):
    """x, w_up, w_down and out as slices of bigger tensors (last dim contiguous, other strides free); out = x."""
    T, E, k, H, I = 9, 6, 2, 40, 24
    x, ids, w, up, down = make(T, E, k, H, I, torch.bfloat16, gen)
    d = device
    xs = torch.zeros(T, H + 8, dtype=x.dtype, device=d)[:, 3:3 + H].copy_(x)
    ups = torch.zeros(E, 2 * I, H + 4, dtype=x.dtype, device=d)[:, ::2, 4:].copy_(up)
    downs = torch.zeros(2 * E, H, I + 5, dtype=x.dtype, device=d)[::2, :, :I].copy_(down)
    args = (ids.to(d), w.to(d), ups, downs)
    y = tt.ops.moe_experts(xs, *args)
    check(y, x, ids, w, up, down)
    out = torch.full((T, H + 2), float("nan"), dtype=x.dtype, device=d)[:, 1:1 + H]
    assert tt.ops.moe_experts(xs, *args, out=out) is out
    assert torch.equal(out, y)
    tt.ops.moe_experts(xs, *args, out=xs)   # in place: x is read before y is written
    assert torch.equal(xs, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_result_for_any_thread_count(dtype, gen):
    """3-6 MB of weights: the threaded path (the work queue shared with helper threads, its up items claimed from
    both ends) at 2, 3 and 5 threads against one thread; the shared expert fused in."""
    x, ids, w, up, down = make(64, 16, 4, 256, 192, dtype, gen)
    s_up = (torch.randn(96, 256, generator=gen) / 16).to(dtype)
    s_down = (torch.randn(256, 96, generator=gen) / 10).to(dtype)
    kw = dict(shared_up=packed.pack(s_up), shared_down=packed.pack(s_down))
    with using_threads(1):
        y1 = tt.ops.moe_experts(x, ids, w, up, down, **kw)
    for nthreads in (2, 3, 5):
        with using_threads(nthreads):
            assert torch.equal(y1, tt.ops.moe_experts(x, ids, w, up, down, **kw)), nthreads


@pytest.mark.parametrize("device", devices())
def test_empty_and_nan(device, gen):
    x, ids, w, up, down = make(4, 8, 2, 32, 16, torch.float32, gen)
    d = device
    y = tt.ops.moe_experts(x[:0].to(d), ids[:0].to(d), w[:0].to(d), up.to(d), down.to(d))
    assert y.shape == (0, 32)
    unused = int(torch.tensor([e for e in range(8) if e not in ids.tolist()[0] + ids.tolist()[1]
                               + ids.tolist()[2] + ids.tolist()[3]][0]))
    up[unused] = float("nan")   # an expert no token chose is never read
    x[1, 3] = float("nan")      # a NaN input gives NaN in its row
    y = tt.ops.moe_experts(x.to(d), ids.to(d), w.to(d), up.to(d), down.to(d)).cpu()
    assert torch.isnan(y[1]).all()
    keep = torch.tensor([0, 2, 3])
    assert torch.isfinite(y[keep]).all()
    check(y[keep], x[keep], ids[keep], w[keep], up, down)


def test_bad_input(gen):
    x, ids, w, up, down = make(4, 8, 2, 32, 16, torch.float32, gen)
    f = tt.ops.moe_experts
    bad = ids.clone()
    bad[2, 1] = 8
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, 8\).*got 8 at \[2, 1\]"):
        f(x, bad, w, up, down)
    bad[2, 1] = -1
    with pytest.raises(ValueError, match="expert_ids must be in"):
        f(x, bad, w, up, down)
    with pytest.raises(TypeError, match="expert_ids must be int32 or int64"):
        f(x, ids.float(), w, up, down)
    with pytest.raises(TypeError, match="expert_weights must be float32 or float64"):
        f(x, ids, w.half(), up, down)
    with pytest.raises(RuntimeError, match=r"expert_weights must be \[tokens, k\]"):
        f(x, ids, w[:, :1], up, down)
    with pytest.raises(RuntimeError, match=r"expert_ids must be \[tokens, k\]"):
        f(x, ids[:3], w[:3], up, down)
    with pytest.raises(TypeError, match="w_up must be"):
        f(x, ids, w, up.bfloat16(), down)
    with pytest.raises(RuntimeError, match="w_down must be"):
        f(x, ids, w, up, down[:, :, :8])
    with pytest.raises(RuntimeError, match="w_up must be"):
        f(x, ids, w, up[:, :, :8], down)
    with pytest.raises(RuntimeError, match="x must be"):
        f(x[None], ids, w, up, down)
    with pytest.raises(RuntimeError, match="w_up must have a contiguous last dimension"):
        f(x, ids, w, up.transpose(1, 2).contiguous().transpose(1, 2), down)
    with pytest.raises(TypeError, match="x must be float32"):
        f(x.double(), ids, w, up.double(), down.double())
    with pytest.raises(ValueError, match="k = 9 choices per token but there are only 8 experts"):
        f(x, torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, 9), up, down)
    with pytest.raises(RuntimeError, match="out must be"):
        f(x, ids, w, up, down, out=torch.empty(4, 31))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device, gen):
    x, ids, w, up, down = make(5, 8, 2, 32, 16, torch.float32, gen)
    args = tuple(t.to(device) for t in (x, ids, w, up, down))
    torch.library.opcheck(torch.ops.twotower.moe_experts.default, args)
    torch.library.opcheck(torch.ops.twotower.moe_experts_out.default, (*args, torch.empty_like(args[0])))


def test_compiles_under_torch_compile(gen):
    x, ids, w, up, down = make(5, 8, 2, 32, 16, torch.bfloat16, gen)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, ids, w):
        return torch.ops.twotower.moe_experts(x * 2, ids, w, up, down) + 1

    torch.testing.assert_close(f(x, ids, w), tt.ops.moe_experts(x * 2, ids, w, up, down) + 1, atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_out_of_range_ids_are_skipped(monkeypatch, gen):
    x, ids, w, up, down = make(6, 8, 2, 64, 32, torch.bfloat16, gen)
    bad = ids.clone()
    bad[1, 0] = 99
    y = tt.ops.moe_experts(*(t.cuda() for t in (x, bad, w, up, down))).cpu()
    w0 = w.clone()
    w0[1, 0] = 0
    check(y, x, ids, w0, up, down)
    monkeypatch.setenv("TWOTOWER_MOE_DEBUG", "1")
    with pytest.raises(ValueError, match="TWOTOWER_MOE_DEBUG"):
        tt.ops.moe_experts(*(t.cuda() for t in (x, bad, w, up, down)))
        torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_capture(gen):
    x, ids, w, up, down = (t.cuda() for t in make(16, 128, 6, 256, 128, torch.bfloat16, gen))
    out = torch.empty_like(x)
    tt.ops.moe_experts(x, ids, w, up, down, out=out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tt.ops.moe_experts(x, ids, w, up, down, out=out)
    ids.copy_(torch.stack([torch.randperm(128, generator=gen)[:6] for _ in range(16)]))
    g.replay()
    torch.cuda.synchronize()
    check(out, x, ids, w, up, down)
