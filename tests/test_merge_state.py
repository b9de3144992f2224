"""merge_states and reference.merge_states against the fp64 oracle (tests/oracle.py): random inputs, empty parts,
lse offsets of +1000, odd shapes, every dtype, bad input."""
import math

import pytest
import torch

import twotower_ext as tt
from twotower_ext import reference

import oracle
from conftest import devices, tolerance

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_states(gen, parts, rows, dim, dtype, empty_frac=0.25):
    o = torch.randn(parts, *rows, dim, generator=gen).to(dtype)
    lse = torch.randn(parts, *rows, generator=gen) * 4
    lse[torch.rand(lse.shape, generator=gen) < empty_frac] = -math.inf
    return o, lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts,rows,dim", [(1, (3,), 64), (2, (5, 7), 128), (5, (1, 16, 4), 17), (16, (33,), 1),
                                            (3, (0,), 64), (7, (2, 3), 256)])
def test_matches_fp64_oracle(device, dtype, parts, rows, dim, gen):
    o, lse = random_states(gen, parts, rows, dim, dtype)
    out, lse_out = tt.merge_states(o.to(device), lse.to(device))
    want_o, want_lse = oracle.merge_states(o, lse)
    assert out.dtype == dtype and out.shape == want_o.shape and lse_out.dtype == torch.float32
    tol = tolerance(dtype)
    torch.testing.assert_close(out.cpu().double(), want_o, atol=4 * tol, rtol=4 * tol)
    torch.testing.assert_close(lse_out.cpu().double(), want_lse, atol=1e-5, rtol=1e-5)
    # The reference (the fallback path) agrees with the oracle too.
    ref_o, ref_lse = reference.merge_states(o, lse)
    torch.testing.assert_close(ref_o.double(), want_o, atol=4 * tol, rtol=4 * tol)
    torch.testing.assert_close(ref_lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_empty_parts_are_never_read_and_never_nan(device):
    o = torch.randn(3, 4, 8)
    lse = torch.tensor([[0.0, -math.inf, -math.inf, 1.0]] * 3)
    lse[1, 0] = -math.inf
    o[1] = float("nan")          # garbage in an empty part must not leak
    lse[1] = -math.inf
    out, lse_out = tt.merge_states(o.to(device), lse.to(device))
    out, lse_out = out.cpu(), lse_out.cpu()
    assert not out.isnan().any() and not lse_out.isnan().any()
    assert torch.equal(out[1], torch.zeros(8)) and lse_out[1] == -math.inf and lse_out[2] == -math.inf
    torch.testing.assert_close(out[0], (o[0, 0] + o[2, 0]) / 2)
    torch.testing.assert_close(lse_out[0], torch.tensor(math.log(2.0)))


@pytest.mark.parametrize("device", devices())
def test_strided_inputs_and_sequence_form(device, gen):
    base = torch.randn(4, 6, 10, 32, generator=gen, device="cpu").to(device)
    o = base[:, ::2, 1:9]                    # non-contiguous row dims, contiguous last dim
    lse = torch.randn(4, 10, 6, generator=gen).to(device).transpose(1, 2)[:, ::2, 1:9]
    out, lse_out = tt.merge_states(o, lse)
    want_o, want_lse = oracle.merge_states(o.cpu(), lse.cpu())
    torch.testing.assert_close(out.cpu().double(), want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_out.cpu().double(), want_lse, atol=1e-5, rtol=1e-5)
    out2, lse2 = tt.merge_states(list(o.unbind(0)), list(lse.unbind(0)))
    assert torch.equal(out2, out) and torch.equal(lse2, lse_out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1000.0, -1000.0])
def test_large_lse_offsets(device, dtype, offset, gen):
    """lse around +-1000 (exp overflows / underflows in any float format): only a max-subtracted merge is right,
    in the kernel and in the reference."""
    o, lse = random_states(gen, 4, (6, 5), 64, dtype)
    lse = lse + offset
    want_o, want_lse = oracle.merge_states(o, lse)
    tol = tolerance(dtype)
    for got_o, got_lse in (tt.merge_states(o.to(device), lse.to(device)), reference.merge_states(o, lse)):
        torch.testing.assert_close(got_o.cpu().double(), want_o, atol=4 * tol, rtol=4 * tol)
        torch.testing.assert_close(got_lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-6)


def test_single_part_is_identity(gen):
    o, lse = random_states(gen, 1, (9,), 64, torch.float32, empty_frac=0)
    out, lse_out = tt.merge_states(o, lse)
    assert torch.equal(out, o[0]) and torch.equal(lse_out, lse[0])


@pytest.mark.parametrize(
    "o,lse,exc,words",
    [
        (torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3), TypeError, "o must be float32"),
        (torch.randn(2, 3, 8), torch.randn(2, 3, dtype=torch.float16), TypeError, "lse must be Float"),
        (torch.randn(2, 3, 8), torch.randn(2, 4), RuntimeError, "lse must have o's shape"),
        (torch.randn(8), torch.randn(1), RuntimeError, "at least 2-D"),
        (torch.randn(0, 3, 8), torch.randn(0, 3), RuntimeError, "at least one part"),
        (torch.randn(2, 8, 3).transpose(1, 2), torch.randn(2, 3), RuntimeError, "o must have a contiguous last"),
    ],
)
def test_bad_input_names_the_argument(o, lse, exc, words):
    with pytest.raises(exc, match=words):
        torch.ops.twotower.merge_states(o, lse)


@pytest.mark.cuda
def test_device_mix_is_refused():
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.twotower.merge_states(torch.randn(2, 3, 8, device="cuda"), torch.randn(2, 3))


def test_opcheck(gen):
    o = torch.randn(3, 4, 2, 64, generator=gen)
    lse = torch.randn(3, 4, 2, generator=gen)
    torch.library.opcheck(torch.ops.twotower.merge_states.default, (o, lse))
    torch.library.opcheck(torch.ops.twotower.merge_states.default, (o.bfloat16(), lse))


def test_compiles_under_torch_compile(gen):
    o, lse = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, generator=gen)

    @torch.compile(fullgraph=True, backend="eager")
    def f(o, lse):
        out, l = torch.ops.twotower.merge_states(o, lse)
        return out * 2, l

    out, l = f(o, lse)
    want, wl = oracle.merge_states(o, lse)
    torch.testing.assert_close(out.double(), want * 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l.double(), wl, atol=1e-5, rtol=1e-6)
