"""The chunked Mamba-2 (SSD) scan (models/ssd.py) against the naive fp64 step-by-step recurrence of
test_mamba_scan (lengths 1..1000 across chunk boundaries, chunk sizes 16/64/128, 1 or 2 groups, fp32 and
bf16 inputs, nonzero initial states, ragged rows, multi-pass splitting), and the context tower's long-prompt
prefill through it against the exact sequential path on the parity checkpoint (logits, cache states, and
the denoise / extend / mock-AR calls that follow)."""
import math
import os

import pytest
import torch

from twotower_ext.models import TwoTowerModel, layers, ssd, towers

from conftest import devices, tolerance
from oracle import mamba_block_scan as fp64_oracle
from test_mamba_scan import make_inputs

CHUNKS = (16, 64, 128)
H, P, N, K = 4, 8, 16, 4
CKPT = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")


def run_chunked(args, lens, chunk):
    conv_out, ssm_out = torch.empty_like(args["conv_state"]), torch.empty_like(args["ssm_state"])
    y = ssd.mamba_chunked_scan(**args, seq_lens=lens, conv_state_out=conv_out, ssm_state_out=ssm_out,
                               chunk_size=chunk)
    return y, conv_out, ssm_out


def assert_matches_oracle(got, want, dtype):
    y, conv_out, ssm_out = got
    want_y, want_s, want_c = want
    assert y.dtype == dtype and y.shape == want_y.shape
    tol = tolerance(dtype) if dtype != torch.float32 else 2e-5
    torch.testing.assert_close(y.cpu().double(), want_y, atol=tol * max(1.0, want_y.abs().max().item()), rtol=tol)
    stol = max(tol, 2e-5)
    torch.testing.assert_close(ssm_out.cpu().double(), want_s, atol=stol * max(1.0, want_s.abs().max().item()),
                               rtol=stol)
    assert torch.equal(conv_out.cpu(), want_c)  # raw rows: copied exactly


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("L", [1, 5, 127, 128, 129, 300, 1000])
def test_matches_fp64_oracle(L, G, dtype, device, gen):
    """Two rows from random nonzero conv / SSM states; row 1 ragged (a random length in [0, L])."""
    torch.backends.cuda.matmul.allow_tf32 = False
    args = make_inputs(gen, 2, L, H, P, N, G, K, dtype, device)
    lens = torch.tensor([L, int(torch.randint(0, L + 1, (1,), generator=gen))], dtype=torch.int32, device=device)
    want = fp64_oracle(**args, seq_lens=lens)
    for chunk in CHUNKS:
        got = run_chunked(args, lens, chunk)
        assert_matches_oracle(got, want, dtype)
        assert torch.all(got[0][1, int(lens[1]):] == 0) and got[0].device == args["xBC"].device


def test_time_step_limit_and_no_seq_lens(gen):
    args = make_inputs(gen, 2, 70, H, P, N, 2, K, torch.float32)
    conv_out, ssm_out = torch.empty_like(args["conv_state"]), torch.empty_like(args["ssm_state"])
    y = ssd.mamba_chunked_scan(**args, dt_min=0.01, dt_max=0.05, conv_state_out=conv_out, ssm_state_out=ssm_out,
                               chunk_size=32)
    assert_matches_oracle((y, conv_out, ssm_out), fp64_oracle(**args, dt_min=0.01, dt_max=0.05), torch.float32)


def test_split_into_passes(gen, monkeypatch):
    """Long sequences are scanned in several passes of whole chunks (state carried): force passes of one
    and of two chunks and compare with the oracle."""
    args = make_inputs(gen, 2, 300, H, P, N, 2, K, torch.float32)
    lens = torch.tensor([300, 141], dtype=torch.int32)
    want = fp64_oracle(**args, seq_lens=lens)
    for chunks_per_pass in (1, 2):
        monkeypatch.setitem(ssd.PASS_ELEMENTS, "cpu", 2 * H * 64 * 64 * chunks_per_pass)
        assert ssd.pass_tokens(2, H, 64, "cpu") == 64 * chunks_per_pass
        assert_matches_oracle(run_chunked(args, lens, 64), want, torch.float32)


def test_in_place_state_update(gen):
    """The model passes the seed tensors as outputs: same results as separate outputs."""
    args = make_inputs(gen, 2, 40, H, P, N, 2, K, torch.float32)
    lens = torch.tensor([40, 2], dtype=torch.int32)
    y, conv_out, ssm_out = run_chunked(args, lens, 16)
    conv, ssm = args["conv_state"].clone(), args["ssm_state"].clone()
    y2 = ssd.mamba_chunked_scan(**{**args, "conv_state": conv, "ssm_state": ssm}, seq_lens=lens,
                                conv_state_out=conv, ssm_state_out=ssm, chunk_size=16)
    assert torch.equal(y2, y) and torch.equal(conv, conv_out) and torch.equal(ssm, ssm_out)


def test_core_api_chunk_states_and_defaults(gen):
    """ssd_chunked_scan directly: no D, no initial state; the states before every chunk equal the final
    states of scanning the prefixes."""
    b, L, G, Q = 2, 50, 2, 16
    x = torch.randn(b, L, H, P, generator=gen)
    dt = torch.rand(b, L, H, generator=gen) * 0.2
    A = -torch.rand(H, generator=gen) * 4
    Bm, Cm = torch.randn(b, L, G, N, generator=gen), torch.randn(b, L, G, N, generator=gen)
    y, final, starts = ssd.ssd_chunked_scan(x, dt, A, Bm, Cm, None, None, Q, return_chunk_states=True)
    assert y.shape == (b, L, H, P) and final.shape == (b, H, P, N) and starts.shape == (b, math.ceil(L / Q), H, P, N)
    assert torch.all(starts[:, 0] == 0)
    for k in range(1, starts.shape[1]):
        prefix = ssd.ssd_chunked_scan(x[:, :k * Q], dt[:, :k * Q], A, Bm[:, :k * Q], Cm[:, :k * Q], None, None, Q)[1]
        torch.testing.assert_close(starts[:, k], prefix, atol=1e-5, rtol=1e-5)
    # y with D = y without + D x; a whole-sequence chunk gives the same
    D = torch.randn(H, generator=gen)
    yD = ssd.ssd_chunked_scan(x, dt, A, Bm, Cm, D, None, Q)[0]
    torch.testing.assert_close(yD, y + D[:, None] * x, atol=1e-5, rtol=1e-5)
    y_one, final_one = ssd.ssd_chunked_scan(x, dt, A, Bm, Cm, None, None, 1000)
    torch.testing.assert_close(y_one, y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final_one, final, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change,words", [
    (lambda a: {"x": a["x"][0]}, "x must be"),
    (lambda a: {"dt": a["dt"][:, :-1]}, "dt must have shape"),
    (lambda a: {"A": a["A"][:1]}, "A must have shape"),
    (lambda a: {"B": torch.zeros(2, 6, 3, N), "C": torch.zeros(2, 6, 3, N)}, "B.s group count 3 must divide"),
    (lambda a: {"C": a["C"][..., :-1]}, "C must have B's shape"),
    (lambda a: {"D": torch.zeros(3)}, "D must have shape"),
    (lambda a: {"init_state": torch.zeros(2, H, P, N + 1)}, "init_state must have shape"),
    (lambda a: {"chunk_size": 0}, "chunk_size must be a positive int"),
    (lambda a: {"seq_lens": torch.tensor([1])}, "seq_lens must have shape"),
])
def test_bad_input_names_the_argument(change, words):
    a = dict(x=torch.zeros(2, 6, H, P), dt=torch.zeros(2, 6, H), A=-torch.ones(H), B=torch.zeros(2, 6, 2, N),
             C=torch.zeros(2, 6, 2, N), D=None, init_state=None, chunk_size=4)
    a.update(change(a))
    with pytest.raises(ValueError, match=f"ssd_chunked_scan: {words}"):
        ssd.ssd_chunked_scan(**a)


# ----------------------------------------------------------------------------------------------------
# the context tower's long-prompt prefill


@pytest.fixture(scope="module", params=devices())
def model(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    return TwoTowerModel.from_pretrained(CKPT, dtype=torch.float32, device=request.param)


def assert_close_rel(got, want, rel=1e-4):
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * max(1e-6, want.abs().max().item()))


def cache_states(cache):
    st = cache.ctx
    return {f"{name}{i}": t for name, ts in (("conv", st.conv), ("ssm", st.ssm), ("prev_conv", st.prev_conv),
                                             ("prev_ssm", st.prev_ssm), ("k", st.k), ("v", st.v))
            for i, t in enumerate(ts) if t is not None}


def test_chunked_form_only_on_cuda_and_from_its_threshold(model, monkeypatch):
    """The plan: chunked SSD from PREFILL_CHUNKED_MIN_LEN tokens on CUDA, never on the CPU (the op is faster at
    every prefill pass length there). With a threshold set, passes below it (every parity prompt, blocks, AR
    steps) run the op and passes from it on the chunked scan, with the model's chunk size."""
    assert towers.prefill_chunked_min_len("cuda") == towers.PREFILL_CHUNKED_MIN_LEN == towers.PREFILL_SEGMENT > 40
    assert towers.prefill_chunked_min_len("cuda:1") == towers.PREFILL_CHUNKED_MIN_LEN
    assert towers.prefill_chunked_min_len("cpu") is None and model.prefill_chunked_min_len is None
    used = []
    real = layers.mamba_chunked_scan
    monkeypatch.setattr(layers, "mamba_chunked_scan", lambda *a, **k: used.append(k["chunk_size"]) or real(*a, **k))
    cache = model.new_cache(1, 600)
    model.prefill([[5] * 300], cache, logits=False)
    assert used == []
    monkeypatch.setattr(model, "prefill_chunked_min_len", towers.PREFILL_CHUNKED_MIN_LEN)
    cache = model.new_cache(1, 512)
    model.prefill([list(range(5, 45))], cache, logits=False)
    model.extend(torch.full((1, 16), 7), cache)
    assert used == []
    model.prefill([[5] * model.prefill_chunked_min_len], cache, logits=False)
    assert used == [model.config.chunk_size] * len(model.config.layers_of("mamba"))


@pytest.mark.parametrize("snapshot", [False, True])
def test_long_prompt_prefill_matches_sequential(model, snapshot, gen):
    """A ragged pair of long prompts (300 and 187 tokens) through the chunked path and the sequential one:
    last-token logits, every cache tensor, then a denoiser pass, a block extension, an AR step and (with
    snapshot) mock-AR all agree to fp32 rounding."""
    prompts = [torch.randint(4, 512, (300,), generator=gen), torch.randint(4, 512, (187,), generator=gen)]
    block = torch.randint(4, 512, (2, 16), generator=gen)
    x = block.clone()
    x[:, ::2] = 3
    results = []
    default = model.prefill_chunked_min_len
    for min_len in (None, 64):  # sequential, then chunked
        model.prefill_chunked_min_len = min_len
        try:
            cache = model.new_cache(3, 352, snapshot=snapshot)
            out = {"prefill": model.prefill(prompts, cache, rows=[2, 0], snapshot=snapshot)}
            out.update(cache_states(cache))
            out["denoise"] = model.denoise(x, cache, torch.tensor([0.5, 1.0]), rows=[2, 0])
            if snapshot:
                out["mock_ar"] = model.mock_ar(torch.stack([p[-1] for p in prompts]), cache, rows=[2, 0])
            out["extend"] = model.extend(block, cache, rows=[2, 0], logits=True)
            out["decode"] = model.decode(block[:, 0], cache, rows=[2, 0])
            out["denoise_after"] = model.denoise(x, cache, 0.25, rows=[2, 0])
            results.append(out)
        finally:
            model.prefill_chunked_min_len = default
    seq, chunked = results
    assert seq.keys() == chunked.keys()
    for name in seq:
        assert_close_rel(chunked[name], seq[name], rel=2e-5)
    assert torch.all(chunked["ssm0"][1] == 0)  # row 1 untouched


def test_autograd_path_matches_the_inplace_path_and_naive_gradients(gen):
    """With autograd on (the training model) ssd_chunked_scan runs out of place: the same outputs as the
    in-place inference path, and gradients equal to those of a naive step-by-step recurrence."""
    b, L, H, P, N, G, Q = 2, 37, 4, 3, 5, 2, 8
    x, B, C = torch.randn(b, L, H, P, generator=gen), torch.randn(b, L, G, N, generator=gen), torch.randn(b, L, G, N, generator=gen)
    dt = torch.rand(b, L, H, generator=gen) * 0.5
    A, D = -torch.rand(H, generator=gen) * 2 - 0.1, torch.randn(H, generator=gen)
    init = torch.randn(b, H, P, N, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, init)]
    with torch.no_grad():
        want = ssd.ssd_chunked_scan(x, dt, A, B, C, D, init, Q, return_chunk_states=True)
    got = ssd.ssd_chunked_scan(*leaves[:6], leaves[6], Q, return_chunk_states=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach(), w, rtol=1e-5, atol=1e-5)
    wy, ws = torch.randn(b, L, H, P, generator=gen), torch.randn(b, H, P, N, generator=gen)
    grads = torch.autograd.grad((got[0] * wy).sum() + (got[1] * ws).sum(), leaves)

    naive = [t.clone().requires_grad_(True) for t in (x, dt, A, B, C, D, init)]
    nx, ndt, nA, nB, nC, nD, S = naive
    group = torch.arange(H) // (H // G)
    ys = []
    for i in range(L):
        Bi, Ci = nB[:, i, group], nC[:, i, group]                              # [b, H, N]
        S = torch.exp(ndt[:, i, :, None, None] * nA[:, None, None]) * S + \
            ndt[:, i, :, None, None] * nx[:, i, :, :, None] * Bi[:, :, None]
        ys.append((S * Ci[:, :, None]).sum(-1) + nD[:, None] * nx[:, i])
    want_grads = torch.autograd.grad((torch.stack(ys, 1) * wy).sum() + (S * ws).sum(), naive)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()))
