"""mamba_block_scan and reference.mamba_block_scan against the fp64 oracle (tests/oracle.py: the recurrence step
by step per row and head): random seeds, block lengths 1..64, ragged
rows, in-place and separate state outputs, strided views, fp32/bf16/fp16, every CPU vector path (bitwise equal
to each other), NaN, bad input, opcheck."""
import math

import pytest
import torch

import twotower_ext as tt
from twotower_ext import reference

import oracle
from conftest import devices, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(gen, B, L, H, P, N, G, K, dtype, device="cpu"):
    C = H * P + 2 * G * N
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    dt_init = torch.exp(torch.rand(H, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    args = dict(
        xBC=rnd(B, L, C).to(dtype), dt=rnd(B, L, H).to(dtype), conv_state=rnd(B, K - 1, C).to(dtype),
        ssm_state=rnd(B, H, P, N), conv_weight=(rnd(C, K) * 0.5).to(dtype), conv_bias=(rnd(C) * 0.1).to(dtype),
        dt_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus, like NVIDIA's init
        A_log=torch.log(torch.rand(H, generator=gen) * 15 + 1), D=rnd(H))
    return {k: v.to(device) for k, v in args.items()}


def check(args, seq_lens=None, dtype=torch.float32):
    dev = args["xBC"].device
    conv_out, ssm_out = torch.empty_like(args["conv_state"]), torch.empty_like(args["ssm_state"])
    y = tt.mamba_block_scan(**args, seq_lens=seq_lens, conv_state_out=conv_out, ssm_state_out=ssm_out)
    want_y, want_s, want_c = oracle.mamba_block_scan(**args, seq_lens=seq_lens)
    assert y.dtype == dtype and y.shape == want_y.shape and y.device == dev
    tol = tolerance(dtype) if dtype != torch.float32 else 2e-5
    scale = max(1.0, want_y.abs().max().item())
    torch.testing.assert_close(y.cpu().double(), want_y, atol=tol * scale, rtol=tol)
    sscale = max(1.0, want_s.abs().max().item())
    torch.testing.assert_close(ssm_out.cpu().double(), want_s, atol=max(tol, 2e-5) * sscale, rtol=max(tol, 2e-5))
    assert torch.equal(conv_out.cpu(), want_c)  # raw rows: copied exactly
    return y, conv_out, ssm_out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,P,N,G,K", [(2, 16, 4, 8, 16, 2, 4), (3, 5, 6, 5, 7, 3, 4), (1, 1, 2, 3, 4, 1, 2),
                                           (2, 9, 3, 4, 33, 1, 1), (1, 64, 2, 16, 16, 2, 4)])
def test_matches_fp64_oracle(device, dtype, B, L, H, P, N, G, K, gen):
    check(make_inputs(gen, B, L, H, P, N, G, K, dtype, device), dtype=dtype)


@pytest.mark.parametrize("device", devices())
def test_every_block_length_1_to_64(device, gen):
    for L in range(1, 65):
        check(make_inputs(gen, 1, L, 2, 4, 8, 1, 4, torch.float32, device))


@pytest.mark.parametrize("device", devices())
def test_model_shapes(device, gen):
    """The real model's Mamba shapes: 64 heads x 64, state 128, 8 groups, 16-token block."""
    args = make_inputs(gen, 1, 16, 64, 64, 128, 8, 4, torch.float32, device)
    y = tt.mamba_block_scan(**args)
    want = oracle.mamba_block_scan(**args)[0]
    torch.testing.assert_close(y.cpu().double(), want, atol=2e-5 * max(1.0, want.abs().max().item()), rtol=2e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_rows_and_time_step_limit(device, dtype, gen):
    args = make_inputs(gen, 4, 12, 4, 8, 16, 2, 4, dtype, device)
    lens = torch.tensor([12, 5, 0, 1], dtype=torch.int32, device=device)
    y, _, _ = check(args, seq_lens=lens, dtype=dtype)
    assert torch.all(y[1, 5:] == 0) and torch.all(y[2] == 0)
    # the clamp applies to softplus(dt + dt_bias)
    y = tt.mamba_block_scan(**args, dt_min=0.01, dt_max=0.05)
    want = oracle.mamba_block_scan(**args, dt_min=0.01, dt_max=0.05)[0]
    tol = tolerance(dtype) if dtype != torch.float32 else 2e-5
    torch.testing.assert_close(y.cpu().double(), want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("device", devices())
def test_in_place_update_equals_separate_outputs(device, gen):
    args = make_inputs(gen, 3, 2, 4, 8, 16, 2, 4, torch.float32, device)  # L < K-1: new state mixes old rows
    lens = torch.tensor([2, 1, 0], dtype=torch.int32, device=device)
    y, conv_out, ssm_out = check(args, seq_lens=lens)
    conv, ssm = args["conv_state"].clone(), args["ssm_state"].clone()
    y2 = tt.mamba_block_scan(**{**args, "conv_state": conv, "ssm_state": ssm}, seq_lens=lens,
                             conv_state_out=conv, ssm_state_out=ssm)
    assert torch.equal(y2, y) and torch.equal(conv, conv_out) and torch.equal(ssm, ssm_out)


@pytest.mark.parametrize("device", devices())
def test_read_only_scan_leaves_states_alone_and_splits_compose(device, gen):
    """Scanning a block in two pieces (state written back in between) equals one scan of the whole."""
    args = make_inputs(gen, 2, 10, 4, 8, 16, 2, 4, torch.float32, device)
    seeds = args["conv_state"].clone(), args["ssm_state"].clone()
    y = tt.mamba_block_scan(**args)
    assert torch.equal(args["conv_state"], seeds[0]) and torch.equal(args["ssm_state"], seeds[1])
    conv, ssm = seeds[0].clone(), seeds[1].clone()
    part = {**args, "conv_state": conv, "ssm_state": ssm}
    y1 = tt.mamba_block_scan(**{**part, "xBC": args["xBC"][:, :6], "dt": args["dt"][:, :6]},
                             conv_state_out=conv, ssm_state_out=ssm)
    y2 = tt.mamba_block_scan(**{**part, "xBC": args["xBC"][:, 6:], "dt": args["dt"][:, 6:]},
                             conv_state_out=conv, ssm_state_out=ssm)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_strided_views_as_the_model_passes_them(device, gen):
    """xBC and dt as column slices of the in_proj output; states as row slices of a bigger cache."""
    H, P, N, G, K, L = 4, 8, 16, 2, 4, 7
    C = H * P + 2 * G * N
    proj = torch.randn(2, L, H * P + C + H, generator=gen).to(device)
    z, xbc, dt = proj.split([H * P, C, H], dim=-1)
    base = make_inputs(gen, 2, L, H, P, N, G, K, torch.float32, device)
    conv_cache = torch.randn(5, K - 1, C, generator=gen).to(device)
    ssm_cache = torch.randn(5, H, P, N, generator=gen).to(device)
    args = {**base, "xBC": xbc, "dt": dt, "conv_state": conv_cache[1:3], "ssm_state": ssm_cache[1:3]}
    y = tt.mamba_block_scan(**args)
    dense = {**args, **{k: args[k].contiguous() for k in ("xBC", "dt", "conv_state", "ssm_state")}}
    assert torch.equal(y, tt.mamba_block_scan(**dense))
    want = oracle.mamba_block_scan(**dense)[0]
    torch.testing.assert_close(y.cpu().double(), want, atol=2e-5 * max(1.0, want.abs().max().item()), rtol=2e-5)


CPU_PATHS = ["scalar", "avx2", "avx512"]   # the recurrence's vector code (TWOTOWER_SCAN_CPU_ISA forces it)


def cpu_path(isa):
    return pytest.param(isa, marks=pytest.mark.skipif(isa not in tt.ops.cpu_isas(),
                                                      reason=f"this CPU does not run {isa}"))


# Odd sizes: head rows not a multiple of the 4-row tile, state columns in one partial vector, several 64-column
# chunks with a partial last one, the width-1/8 model's layer (8 heads x 64 x 128, one group).
ODD_SHAPES = [(2, 16, 4, 8, 16, 2, 4), (3, 5, 6, 5, 7, 3, 4), (2, 9, 3, 7, 130, 1, 3), (1, 16, 8, 64, 128, 1, 4),
              (2, 3, 2, 13, 64, 2, 2)]


@pytest.mark.parametrize("isa", [cpu_path(i) for i in CPU_PATHS])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,P,N,G,K", ODD_SHAPES)
def test_each_cpu_path_matches_fp64_oracle(isa, dtype, B, L, H, P, N, G, K, monkeypatch, gen):
    monkeypatch.setenv("TWOTOWER_SCAN_CPU_ISA", isa)
    args = make_inputs(gen, B, L, H, P, N, G, K, dtype)
    lens = torch.randint(0, L + 1, (B,), generator=gen, dtype=torch.int32)
    check(args, seq_lens=lens, dtype=dtype)


@pytest.mark.parametrize("B,L,H,P,N,G,K", ODD_SHAPES)
def test_cpu_paths_are_bitwise_equal(B, L, H, P, N, G, K, monkeypatch, gen):
    """Same operations in the same order on every path: a model decodes the same tokens on every CPU."""
    paths = [i for i in CPU_PATHS if i in tt.ops.cpu_isas()]
    if len(paths) < 2:
        pytest.skip(f"this CPU runs only {paths}")
    args = make_inputs(gen, B, L, H, P, N, G, K, torch.float32)
    runs = {}
    for isa in paths:
        monkeypatch.setenv("TWOTOWER_SCAN_CPU_ISA", isa)
        ssm = torch.empty_like(args["ssm_state"])
        runs[isa] = tt.mamba_block_scan(**args, ssm_state_out=ssm), ssm
    for isa in paths[1:]:
        assert torch.equal(runs[isa][0], runs[paths[0]][0]) and torch.equal(runs[isa][1], runs[paths[0]][1]), isa


@pytest.mark.parametrize("isa", [cpu_path(i) for i in CPU_PATHS])
def test_nan_in_gives_nan_out(isa, monkeypatch, gen):
    """A NaN in one head's x channel, in one state element or in a group's B channel reaches exactly the outputs
    that depend on it."""
    monkeypatch.setenv("TWOTOWER_SCAN_CPU_ISA", isa)
    B, L, H, P, N, G, K = 2, 6, 4, 5, 20, 2, 4
    args = make_inputs(gen, B, L, H, P, N, G, K, torch.float32)
    args["xBC"][0, 3, 1 * P + 2] = float("nan")            # row 0, token 3, head 1's x row 2
    args["ssm_state"][1, 2, 4, 17] = float("nan")           # row 1, head 2, state row 4 (last vector's tail)
    args["xBC"][1, 2, H * P + 1 * N + 3] = float("nan")     # row 1, token 2, group 1's B (heads 2, 3)
    ssm = torch.empty_like(args["ssm_state"])
    y = tt.mamba_block_scan(**args, ssm_state_out=ssm).view(B, L, H, P)
    nan = torch.zeros_like(y, dtype=torch.bool)
    nan[0, 3:, 1, 2] = True
    nan[1, :, 2, 4] = True
    nan[1, 2:, 2:] = True
    assert torch.equal(y.isnan(), nan)
    assert ssm[0, 1, 2].isnan().all() and ssm[1, 2:].isnan().any(-1).all()
    assert not ssm[0, [0, 2, 3]].isnan().any() and not ssm[1, :2].isnan().any()


def test_reference_matches_oracle(gen):
    args = make_inputs(gen, 2, 9, 4, 8, 16, 2, 4, torch.float32)
    lens = torch.tensor([9, 4], dtype=torch.int32)
    conv_out, ssm_out = torch.empty_like(args["conv_state"]), torch.empty_like(args["ssm_state"])
    y = reference.mamba_block_scan(**args, seq_lens=lens, conv_state_out=conv_out, ssm_state_out=ssm_out)
    want_y, want_s, want_c = oracle.mamba_block_scan(**args, seq_lens=lens)
    torch.testing.assert_close(y.double(), want_y, atol=2e-5 * want_y.abs().max().item(), rtol=2e-5)
    torch.testing.assert_close(ssm_out.double(), want_s, atol=2e-5 * want_s.abs().max().item(), rtol=2e-5)
    assert torch.equal(conv_out, want_c)
    y = reference.mamba_block_scan(**args, dt_min=0.01, dt_max=0.05)      # the time-step limit
    want_y = oracle.mamba_block_scan(**args, dt_min=0.01, dt_max=0.05)[0]
    torch.testing.assert_close(y.double(), want_y, atol=2e-5 * want_y.abs().max().item(), rtol=2e-5)


def _bad(gen, **over):
    args = make_inputs(gen, 2, 3, 4, 8, 16, 2, 4, torch.float32)
    args.update(over)
    return args


@pytest.mark.parametrize("change,exc,words", [
    (lambda a: {"ssm_state": a["ssm_state"].bfloat16()}, TypeError, "ssm_state must be Float"),
    (lambda a: {"dt": a["dt"].bfloat16()}, TypeError, "dt must be Float"),
    (lambda a: {"xBC": a["xBC"].double()}, TypeError, "xBC must be float32, bfloat16 or float16"),
    (lambda a: {"dt": a["dt"][:, :, :3]}, RuntimeError, "dt must have shape"),
    (lambda a: {"xBC": a["xBC"][:, :, :-2]}, RuntimeError, "xBC's last dim"),
    (lambda a: {"conv_state": a["conv_state"][:, :2]}, RuntimeError, "conv_state must have shape"),
    (lambda a: {"conv_weight": a["conv_weight"][:-1]}, RuntimeError, "conv_weight must have shape"),
    (lambda a: {"A_log": a["A_log"][:3]}, RuntimeError, "A_log must have shape"),
    (lambda a: {"D": a["D"].half()}, TypeError, "D must be Float"),
    (lambda a: {"seq_lens": torch.tensor([1, 2])}, TypeError, "seq_lens must be Int"),
    (lambda a: {"ssm_state": a["ssm_state"].transpose(2, 3)}, RuntimeError, "ssm_state must be contiguous"),
    (lambda a: {"xBC": a["xBC"].transpose(1, 2).contiguous().transpose(1, 2)}, RuntimeError,
     "xBC must have a contiguous last"),
    (lambda a: {"dt_min": 1.0, "dt_max": 0.5}, ValueError, "dt_min must be <= dt_max"),
    (lambda a: {"ssm_state_out": torch.empty(2, 4, 8, 15)}, RuntimeError, "ssm_state_out must have shape"),
])
def test_bad_input_names_the_argument(change, exc, words, gen):
    args = _bad(gen)
    args.update(change(args))
    a = {"seq_lens": None, "dt_min": 0.0, "dt_max": math.inf, "conv_state_out": None, "ssm_state_out": None, **args}
    order = ["xBC", "dt", "conv_state", "ssm_state", "conv_weight", "conv_bias", "dt_bias", "A_log", "D",
             "seq_lens", "dt_min", "dt_max", "conv_state_out", "ssm_state_out"]
    with pytest.raises(exc, match=words):
        torch.ops.twotower.mamba_block_scan(*[a[k] for k in order])


@pytest.mark.cuda
def test_device_mix_is_refused(gen):
    args = make_inputs(gen, 1, 2, 2, 4, 8, 1, 4, torch.float32, "cuda")
    args["D"] = args["D"].cpu()
    with pytest.raises(RuntimeError, match="same device"):
        tt.mamba_block_scan(**args)


def _op_args(a, lens=None, outs=(None, None)):
    return (a["xBC"], a["dt"], a["conv_state"], a["ssm_state"], a["conv_weight"], a["conv_bias"], a["dt_bias"],
            a["A_log"], a["D"], lens, 0.0, math.inf, *outs)


def test_opcheck(gen):
    for dtype in (torch.float32, torch.bfloat16):
        a = make_inputs(gen, 2, 5, 4, 8, 16, 2, 4, dtype)
        torch.library.opcheck(torch.ops.twotower.mamba_block_scan.default, _op_args(a))
        outs = (torch.empty_like(a["conv_state"]), torch.empty_like(a["ssm_state"]))
        torch.library.opcheck(torch.ops.twotower.mamba_block_scan.default,
                              _op_args(a, torch.tensor([5, 2], dtype=torch.int32), outs))


def test_compiles_under_torch_compile(gen):
    a = make_inputs(gen, 1, 4, 2, 4, 8, 1, 4, torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def f(*args):
        return torch.ops.twotower.mamba_block_scan(*args) * 2

    want = oracle.mamba_block_scan(**a)[0] * 2
    torch.testing.assert_close(f(*_op_args(a)).double(), want, atol=4e-5 * max(1.0, want.abs().max().item()), rtol=2e-5)
