"""linear on packed weights (csrc/linear/linear.h, twotower_ext.packed): the kernels against the fp64 oracle's
rigorous error bound at odd sizes, fp32 / bf16, every instruction set and both paths (micro kernel, matrix
library) this CPU runs; the paths that must round identically do; the threads' split changes nothing; the packed
layout and its round trip; NaN; bad input; the plan; opcheck and torch.compile."""
import pytest
import torch

import twotower_ext as tt
from twotower_ext import ops, packed, reference
from twotower_ext.threads import using_threads

import oracle

ISAS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]
SIZES = [(1, 37, 53), (3, 16, 16), (16, 100, 33), (17, 200, 320), (100, 47, 130), (5, 1, 1)]   # (M, N, K)


def isa_skip_reason(isa):
    """Why `isa` cannot be forced here (the op says so when asked), or None."""
    x, w = torch.ones(1, 2), packed.pack(torch.ones(1, 2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TWOTOWER_LINEAR_CPU_ISA", isa)
        try:
            ops.linear(x, w)
        except ValueError as e:
            return str(e)
    return None


FORCED = [pytest.param(i, marks=pytest.mark.skipif(isa_skip_reason(i) is not None, reason=str(isa_skip_reason(i))))
          for i in ISAS]


def make(M, N, K, dtype, gen):
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    return x, w


def check(y, x, w):
    want, bound = oracle.linear(x, w)
    assert y.dtype == x.dtype and y.shape == want.shape
    err = (y.double() - want).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound.clamp_min(1e-300)).max().item():.3g}"


@pytest.mark.parametrize("isa", FORCED)
@pytest.mark.parametrize("gemm", ["micro", "library"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", SIZES)
def test_every_path_within_fp32_rounding(M, N, K, dtype, gemm, isa, monkeypatch, gen):
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", isa)
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_GEMM", gemm)
    x, w = make(M, N, K, dtype, gen)
    check(ops.linear(x, packed.pack(w)), x, w)


@pytest.mark.parametrize("isa", FORCED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_library_path_over_several_chunks(dtype, isa, monkeypatch, gen):
    """The library path unpacks 2^22 weights at a time (64 panels at K = 4095), the threads splitting each chunk's
    panels: N = 1100 takes two chunks, the second partial, and an odd K leaves bf16's last k pair half empty."""
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", isa)
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_GEMM", "library")
    x, w = make(3, 1100, 4095, dtype, gen)
    check(ops.linear(x, packed.pack(w)), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_plan_and_leading_dims(dtype, gen):
    """The plan's own choice over M from 1 to 300 rows; x [..., K] keeps its leading dims; a strided x (a row
    slice) is read in place."""
    for M in (1, 2, 7, 16, 33, 64, 300):
        x, w = make(M, 70, 90, dtype, gen)
        check(ops.linear(x, packed.pack(w)), x, w)
    x, w = make(24, 40, 33, dtype, gen)
    y = ops.linear(x.view(2, 3, 4, 33), packed.pack(w))
    assert y.shape == (2, 3, 4, 40)
    check(y.view(24, 40), x, w)
    wide = torch.randn(6, 50, generator=gen).to(dtype)
    check(ops.linear(wide[:, 10:43], packed.pack(w)), wide[:, 10:43], w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widening_paths_round_identically(dtype, monkeypatch, gen):
    """scalar, avx2 and avx512 sum each output in k order with one FMA per k (bf16 widened exactly): bit for bit
    the same results, whatever the blocking (M from 1 to 20 covers every row block of each)."""
    isas = [i for i in ("scalar", "avx2", "avx512") if isa_skip_reason(i) is None]
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_GEMM", "micro")
    for M in (1, 2, 3, 5, 8, 9, 13, 20):
        x, w = make(M, 203, 77, dtype, gen)
        p = packed.pack(w)
        ys = []
        for isa in isas:
            monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", isa)
            ys.append(ops.linear(x, p))
        assert all(torch.equal(ys[0], y) for y in ys[1:]), M


def on_1_and_2_threads(fn):
    """fn() at 1 thread, then at 2."""
    with using_threads(1):
        one = fn()
    with using_threads(2):
        return one, fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_split_changes_nothing(dtype, gen):
    """A weight big enough to be split over the threads (an LM head's kind): the same bits on 1 and 2 threads, and
    a row's result does not depend on the other rows (batch invariance of the engine)."""
    x, w = make(16, 20000, 256, dtype, gen)
    p = packed.pack(w)
    one, two = on_1_and_2_threads(lambda: ops.linear(x, p))
    assert torch.equal(one, two)
    assert torch.equal(ops.linear(x[5:6], p), one[5:6])
    check(one, x, w)


@pytest.mark.parametrize("M", [65, 200, 1025, 2100])
def test_fp32_rows_are_batch_invariant_at_every_row_count(M, gen):
    """fp32 stays on the micro kernel at prefill sizes too, its rows split over the threads where the panels are
    too few (N = 40: one item): every row's bits are those of the row computed alone, on 1 and 2 threads; within
    fp32 rounding of the oracle."""
    x, w = make(M, 40, 96, torch.float32, gen)
    p = packed.pack(w)
    one, two = on_1_and_2_threads(lambda: ops.linear(x, p))
    assert torch.equal(one, two)
    for rows in (slice(0, 1), slice(M - 3, M), slice(17, 60)):
        assert torch.equal(ops.linear(x[rows], p), one[rows]), rows
    check(one, x, w)


# ----------------------------------------------------------------------------------------------------
# the packed layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(1, 1), (16, 16), (17, 3), (37, 53), (64, 320)])
def test_packing_round_trip_and_layout(N, K, dtype, gen):
    w = torch.randn(N, K, generator=gen).to(dtype)
    p = packed.pack(w)
    assert p.shape == (N, K) and p.dtype == dtype and p.data.shape == packed.packed_shape(N, K, dtype)
    assert torch.equal(packed.unpack(p), w)
    n, k = torch.meshgrid(torch.arange(N), torch.arange(K), indexing="ij")
    if dtype == torch.float32:
        assert torch.equal(p.data[n // 16, k, n % 16], w)
    else:
        assert torch.equal(p.data[n // 16, k // 2, n % 16, k % 2], w)
    flat = p.data.reshape(-1)
    assert int((flat != 0).sum()) == int((w != 0).sum())   # the padding is zero
    # streamed in blocks of whole panels (the loader), rows of another dtype rounded to the packed one
    q = packed.empty(N, K, dtype)
    src = w.double()
    for r in range(0, N, 32):
        packed.pack_rows_into(q, r, src[r:r + 32])
    assert torch.equal(q.data, p.data)


def test_pack_rows_into_refuses_rows_that_split_a_panel():
    p = packed.empty(40, 8, torch.float32)
    for row0, rows in ((8, torch.zeros(16, 8)), (0, torch.zeros(20, 8)), (32, torch.zeros(16, 8)),
                       (0, torch.zeros(16, 9))):
        with pytest.raises(ValueError, match="pack_rows_into"):
            packed.pack_rows_into(p, row0, rows)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        packed.empty(4, 4, torch.float16)


def test_plain_weights_and_other_devices_keep_f_linear(gen):
    """A plain weight (training, CUDA, fp16) is F.linear; a packed weight where no kernel runs is the reference."""
    x, w = make(3, 20, 30, torch.float32, gen)
    assert torch.equal(ops.linear(x, w), torch.nn.functional.linear(x, w))
    h = x.half()
    assert torch.equal(ops.linear(h, w.half()), torch.nn.functional.linear(h, w.half()))
    old = ops.use_reference(True)
    try:
        check(ops.linear(x, packed.pack(w)), x, w)
    finally:
        ops.use_reference(old)
    check(reference.linear(x, packed.pack(w)), x, w)


# ----------------------------------------------------------------------------------------------------
# NaN, bad input


@pytest.mark.parametrize("isa", FORCED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_reaches_exactly_its_outputs(dtype, isa, monkeypatch, gen):
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", isa)
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_GEMM", "micro")
    x, w = make(5, 40, 35, dtype, gen)
    x[1, 34] = float("nan")           # an odd K's last column: the bf16 kernels' lone tail k
    w[7, 3] = float("nan")
    y = ops.linear(x, packed.pack(w))
    nan = torch.zeros(5, 40, dtype=torch.bool)
    nan[1, :] = True
    nan[:, 7] = True
    assert torch.equal(y.isnan(), nan)


def test_bad_inputs_name_the_argument(gen):
    x, w = make(4, 20, 30, torch.float32, gen)
    p = packed.pack(w)
    op = torch.ops.twotower.linear
    cases = [
        (lambda: op(x, w, 20), RuntimeError, r"w must be a linear weight packed .* got shape \[20, 30\]"),  # unpacked
        (lambda: op(x, p.data, 33), RuntimeError, r"w must be a linear weight packed .*n = 33"),
        (lambda: op(x[:, :29], p.data, 20), RuntimeError, r"w must be .*in_features = 29"),
        (lambda: op(x.bfloat16(), p.data, 20), TypeError, r"w must be BFloat16"),
        (lambda: op(x.half(), p.data, 20), TypeError, r"x must be float32 or bfloat16"),
        (lambda: op(x[0, 0], p.data, 20), RuntimeError, r"x must be \[..., in_features\], got a 0-d tensor"),
        (lambda: op(x.t().contiguous().t(), p.data, 20), RuntimeError, r"x must have a contiguous last dimension"),
        (lambda: op(x, p.data.transpose(0, 1), 20), RuntimeError, r"w must be .*non-contiguous"),
        (lambda: op(x, p.data, 0), ValueError, r"n \(out_features\) must be >= 1"),
        (lambda: ops.linear(x[:, :29], p), RuntimeError, r"w must be .*in_features = 29"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_forced_isa_and_path_are_checked(monkeypatch):
    x, p = torch.ones(2, 3), packed.pack(torch.ones(4, 3))
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", "sse")
    with pytest.raises(ValueError, match="TWOTOWER_LINEAR_CPU_ISA must be scalar, avx2, avx512, avx512_bf16 or amx"):
        ops.linear(x, p)
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_ISA", "scalar")
    monkeypatch.setenv("TWOTOWER_LINEAR_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="TWOTOWER_LINEAR_CPU_GEMM must be auto, micro or library"):
        ops.linear(x, p)


def test_no_rows():
    y = ops.linear(torch.ones(0, 3), packed.pack(torch.ones(4, 3)))
    assert y.shape == (0, 4)


# ----------------------------------------------------------------------------------------------------
# the plan (a pure function: what each CPU gets, asked from any machine)


def plan(m, n=1288, k=320, dtype=torch.float32, isa="amx", threads=1):
    return torch.ops.twotower.linear_cpu_plan(m, n, k, dtype, isa, threads)


def test_plan_choices():
    # fp32 never runs on the bf16 units; bf16 on AMX, else vdpbf16ps, else widened
    assert plan(1) == plan(16, isa="avx512_bf16") == "micro:avx512"
    assert plan(16, dtype=torch.bfloat16) == "micro:amx"
    assert plan(16, dtype=torch.bfloat16, isa="avx512_bf16") == "micro:avx512_bf16"
    assert plan(1, dtype=torch.bfloat16, isa="avx2") == "micro:avx2"
    assert plan(16, isa="scalar") == "micro:scalar"
    # the instruction set never depends on M (batch invariance); decode sizes (1..16 rows x a batch) stay on the
    # micro kernel; bf16 prefill sizes go to the matrix library (earlier for widened bf16), fp32 never does: its
    # sums must not depend on the rows batched beside a row (bit-for-bit batch invariance)
    for isa in ("amx", "avx2", "scalar"):
        assert {plan(m, isa=isa) for m in (1, 16, 64, 1024, 1025, 100000)} == {plan(1, isa=isa)}, isa
    for dtype, isa, last_micro in ((torch.bfloat16, "amx", 512), (torch.bfloat16, "avx512_bf16", 512),
                                   (torch.bfloat16, "avx512", 128), (torch.bfloat16, "avx2", 128)):
        micro = {plan(m, dtype=dtype, isa=isa) for m in (1, 16, 64, last_micro)}
        assert len(micro) == 1 and micro.pop().startswith("micro:"), (dtype, isa)
        assert plan(last_micro + 1, dtype=dtype, isa=isa) == "library", (dtype, isa)
    # a matrix too narrow for every thread to get an item of 12 panels, once the rows make it compute-bound:
    # bf16 takes the library (it splits the rows too), fp32 splits its rows into blocks of 64 rows or more
    bf16 = torch.bfloat16
    assert plan(256, n=320, dtype=bf16, threads=4) == "library" and plan(64, n=320, dtype=bf16, threads=4) == "micro:amx"
    assert plan(256, n=320, threads=4) == "micro:avx512/rows2" and plan(64, n=320, threads=4) == "micro:avx512"
    assert plan(256, n=20, threads=4) == "micro:avx512/rows4" and plan(100, n=20, threads=4) == "micro:avx512/rows2"
    assert plan(4096, n=20, threads=16) == "micro:avx512/rows16"        # 1 item: a block per thread (64 rows a block at least)
    assert plan(4096, n=320, threads=16) == "micro:avx512/rows8"        # 2 items x 8 blocks
    assert plan(256, n=320, threads=2) == "micro:avx512"


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="isa must be"):
        plan(1, isa="sse")
    with pytest.raises(ValueError, match="m >= 0, n >= 1"):
        plan(-1)
    with pytest.raises(TypeError, match="dtype must be float32 or bfloat16"):
        plan(1, dtype=torch.float16)


# ----------------------------------------------------------------------------------------------------
# the op under torch


def test_opcheck(gen):
    for dtype in (torch.float32, torch.bfloat16):
        x, w = make(5, 20, 33, dtype, gen)
        torch.library.opcheck(torch.ops.twotower.linear.default, (x, packed.pack(w).data, 20))


def test_compiles_under_torch_compile(gen):
    x, w = make(5, 20, 33, torch.float32, gen)
    p = packed.pack(w)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return torch.ops.twotower.linear(x * 2, p.data, 20) + 1

    torch.testing.assert_close(f(x), ops.linear(x * 2, p) + 1, rtol=0, atol=0)


def test_build_lists_the_op():
    assert tt.build_info()["ops"]["linear"] == ["CPU"]   # ops.linear routes every non-CPU packed weight to the reference


def test_concurrent_callers_share_the_helper_threads(gen):
    """Four Python threads splitting ops over the same helper threads at once (common/worker_pool_cpu.h: one offer
    slot, the latest offer wins, every caller finishes its own work): each gets the single-thread bits, for the
    linear (parallel_chunks) and the MoE op (its own phases) alike."""
    import threading

    x, w = make(16, 20000, 256, torch.float32, gen)
    p = packed.pack(w)
    E, H, I, k = 32, 256, 128, 4   # 8 MB of experts: above the MoE op's 4 MB for splitting
    mx = torch.randn(40, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(40)])
    mw = torch.rand(40, k, generator=gen)
    up = torch.randn(E, I, H, generator=gen) * 0.1
    down = torch.randn(E, H, I, generator=gen) * 0.1
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want_lin, want_moe = ops.linear(x, p), ops.moe_experts(mx, ids, mw, up, down)
        torch.set_num_threads(2)
        bad: list = []

        def caller():
            torch.set_num_threads(2)   # (a new thread's own setting)
            try:
                for _ in range(20):
                    if not torch.equal(ops.linear(x, p), want_lin) or not torch.equal(
                            ops.moe_experts(mx, ids, mw, up, down), want_moe):
                        bad.append("different bits")
            except Exception as e:   # noqa: BLE001 - reported below
                bad.append(repr(e))

        ts = [threading.Thread(target=caller) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in ts), "a caller hung"
        assert bad == []
    finally:
        torch.set_num_threads(old)
