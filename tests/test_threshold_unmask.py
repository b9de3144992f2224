"""threshold_unmask: the reference against NVIDIA's golden schedules and logits, the kernels against the
reference (random and peaked logits, exact ties, every step, finished rows, sampling), and bad input."""
import json
import math
import os

import pytest
import torch

import twotower_ext as tt
from twotower_ext import reference

import oracle
from conftest import devices

MASK = 3
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "parity", "golden.json")
DTYPES = [torch.float32, torch.bfloat16]
TOL = 1e-4   # relative: fp32 confidences summed in another order differ by ~1e-6; bf16 logits are exact in fp32


def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def run_kernel(logits, x, gamma, step, spb, temperature=0.0, seed=0, offset=0, device="cpu", mask_id=MASK):
    """The op on `device` on copies; returns (x, counts, done) on the CPU."""
    xd = x.clone().to(device)
    counts, done = tt.threshold_unmask(logits.to(device), xd, mask_id, gamma, step, spb, temperature, seed, offset)
    return xd.cpu(), counts.cpu(), done.cpu()


def run_reference(logits, x, gamma, step, spb, temperature=0.0, seed=0, offset=0, mask_id=MASK):
    xr = x.clone()
    counts, done = reference.threshold_unmask(logits, xr, mask_id, gamma, step, spb, temperature, seed, offset)
    return xr, counts, done


def oracle_commits(logits, x, gamma, step, spb, temperature=0.0, seed=0, offset=0, mask_id=MASK):
    """(pred, fp64 conf, committed positions per row) from tests/oracle.py. Sampling (T > 0): the sampled token is
    the reference's Philox/Gumbel draw (bit-exact by definition, checked against Random123 below); its confidence
    and the commit rule come from the oracle."""
    pred, conf = oracle.predict(logits, mask_id)
    if temperature > 0:
        pred = reference.unmask_predict(logits, mask_id, temperature, seed, offset)[0]
        l = logits.double().clone()
        l[..., mask_id] = -math.inf
        conf = torch.softmax(l, -1).gather(-1, pred[..., None]).squeeze(-1).nan_to_num(0.0)
    return pred, conf, oracle.commit_rule(conf, x == mask_id, gamma, step, spb)


def near_gamma(conf, masked, gamma, step, spb, tol=TOL):
    """A masked confidence within tol (relative) of gamma: only then may the count itself differ by rounding."""
    c = conf[masked]
    return step != spb - 1 and bool(((c - gamma).abs() <= tol * max(gamma, 1e-30)).any())


def assert_step_matches(got, want, logits, x, gamma, step, spb, temperature=0.0, seed=0, offset=0, strict=False,
                        mask_id=MASK):
    """The kernel's and the reference's step (x, counts, done) against the oracle's commit rule: the same count
    in every row unless a confidence is within rounding (TOL) of gamma; the same positions unless the ones that
    differ tie (within TOL) with the last one committed; committed positions hold the predicted token; done
    == everything committed. strict: kernel and reference bit-identical as well."""
    (xg, cg, dg), (xw, cw, dw) = got, want
    if strict:
        assert torch.equal(xg, xw) and torch.equal(cg, cw) and torch.equal(dg, dw), (
            f"kernel != reference\nkernel x={xg}\nref x={xw}\ncounts {cg} vs {cw}")
    pred, conf, rows = oracle_commits(logits, x, gamma, step, spb, temperature, seed, offset, mask_id)
    masked = x == mask_id
    for name, (xo, co, do) in (("kernel", got), ("reference", want)):
        for b in range(x.shape[0]):
            mine = ((xo[b] != mask_id) & masked[b]).nonzero().flatten().tolist()
            assert int(co[b]) == len(mine), f"{name} row {b}: counts {int(co[b])} but {len(mine)} positions committed"
            assert bool(do[b]) == (len(mine) == int(masked[b].sum())), f"{name} row {b}: done flag"
            assert torch.equal(xo[b][~masked[b]], x[b][~masked[b]]), f"{name} row {b}: a committed token changed"
            assert torch.equal(xo[b][mine], pred[b][mine]), f"{name} row {b}: committed tokens != predictions"
            want_pos = rows[b]
            if not near_gamma(conf[b], masked[b], gamma, step, spb):
                assert len(mine) == len(want_pos), (
                    f"{name} row {b} commits {len(mine)}, the rule says {len(want_pos)} (no confidence near gamma "
                    f"{gamma}); conf {conf[b][masked[b]].tolist()}")
            if mine != want_pos and mine and want_pos:
                edge = min(float(conf[b][mine].min()), float(conf[b][want_pos].min()))
                odd = set(mine) ^ set(want_pos)
                assert all(abs(float(conf[b][s]) - edge) <= TOL * edge for s in odd), (
                    f"{name} row {b} commits {mine}, the rule says {want_pos}, not a tie at the edge: conf {conf[b]}")


def make_logits(kind, B, S, V, dtype, gen):
    """random: Gaussian logits with per-position scale and a boosted token on some positions, so confidences
    spread over (0, 1). peaked: most positions boosted far above the rest (confidences at or next to 1, many
    exactly equal), duplicated positions (exact confidence ties) and exact logit ties inside a position."""
    scale = torch.rand(B, S, 1, generator=gen) * 3.5 + 0.5
    logits = torch.randn(B, S, V, generator=gen) * scale
    tok = torch.randint(0, V, (B, S, 1), generator=gen)
    if kind == "random":
        boost = torch.rand(B, S, 1, generator=gen) * 14 * (torch.rand(B, S, 1, generator=gen) < 0.6)
        logits.scatter_add_(2, tok, boost)
    else:
        boost = 30 + 30 * torch.rand(B, S, 1, generator=gen)
        boost = boost * (torch.rand(B, S, 1, generator=gen) < 0.8)
        logits.scatter_add_(2, tok, boost)
        logits[:, 1::4] = logits[:, 0::4][:, : logits[:, 1::4].shape[1]]        # identical positions
        if V > 8:
            top = logits.amax(-1, keepdim=True)
            logits[:, :, V // 2 : V // 2 + 1] = top                              # exact tie with the max
    return logits.to(dtype)


def random_state(B, S, gen, done_rows=(), mask_id=MASK):
    """x with a random masked subset per row (at least one masked), rows in done_rows fully committed."""
    x = torch.randint(10, 1000, (B, S), generator=gen)
    frac = torch.rand(B, 1, generator=gen)
    masked = torch.rand(B, S, generator=gen) < frac
    masked[:, 0] |= ~masked.any(1)
    x[masked] = mask_id
    for r in done_rows:
        x[r] = torch.randint(10, 1000, (S,), generator=gen)
    return x


# ----------------------------------------------------------------------------------------------------
# The reference against NVIDIA's outputs


def test_reference_matches_nvidia_logits_and_commits():
    """NVIDIA's recorded denoiser logits: applying the step to xt_in gives the next recorded xt_in, the
    recorded commit counts, and the tokens NVIDIA finally produced."""
    g = golden()
    num = g["numeric"]
    settings = num["denoiser_settings"]
    run = next(r for r in g["runs"] if r["mode"] == "mask_diffusion" and r["prompt"] == "p1"
               and r["params"]["gamma"] == settings["gamma"] and r["params"]["steps_per_block"] == 16)
    commits = run["commits_per_step"]
    new_ids = torch.tensor(num["denoiser_run_new_ids"])
    steps = num["denoiser_steps"]
    for i, st in enumerate(steps):
        blk, step = int(st["block"]), int(st["step"])
        logits = torch.tensor(st["logits"], dtype=torch.float32).unsqueeze(0)
        x_in = torch.tensor(st["xt_in"]).unsqueeze(0)
        for fn in (run_reference, run_kernel):
            x, counts, done = fn(logits, x_in, settings["gamma"], step, settings["steps_per_block"])
            assert counts.tolist() == [commits[blk][step]]
            committed = x_in[0] == MASK
            committed &= x[0] != MASK
            S = settings["block_size"]
            assert torch.equal(x[0][committed], new_ids[blk * S : (blk + 1) * S][committed])
            if i + 1 < len(steps) and int(steps[i + 1]["block"]) == blk:
                assert x[0].tolist() == steps[i + 1]["xt_in"]
            assert bool(done[0]) == (sum(commits[blk][: step + 1]) == S)


def schedule_logits(masked, n_conf, V, gen):
    """Logits [1, S, V] in which exactly n_conf of the masked positions are confident (conf ~ 1 - 1e-7) and the
    others are not (conf ~ 0.03, distinct)."""
    S = masked.shape[0]
    logits = torch.zeros(1, S, V)
    idx = masked.nonzero().flatten()
    conf_pos = idx[torch.randperm(len(idx), generator=gen)[:n_conf]]
    tokens = torch.randint(MASK + 1, V, (S,), generator=gen)
    logits[0, torch.arange(S), tokens] = 0.5 + 0.01 * torch.arange(S)
    logits[0, conf_pos, tokens[conf_pos]] = 20.0
    return logits


@pytest.mark.parametrize("device", devices())
def test_rule_reproduces_golden_schedules(device, gen):
    """Every mask-diffusion run's commits_per_step: logits with as many confident positions as the schedule
    commits (none where the floor max(1, ceil(n / steps left)) alone explains it) reproduce it exactly."""
    runs = [r for r in golden()["runs"] if r["mode"] == "mask_diffusion"]
    assert len(runs) >= 10
    for r in runs:
        prm = r["params"]
        S, spb, gamma = prm["block_size"], prm["steps_per_block"], prm["gamma"]
        for blk_commits in r["commits_per_step"]:
            x = torch.full((1, S), MASK)
            for step, c in enumerate(blk_commits):
                n = int((x == MASK).sum())
                floor = n if step == spb - 1 else min(n, max(1, -(-n // (spb - step))))
                logits = schedule_logits(x[0] == MASK, c if c > floor else 0, 64, gen)
                got = run_kernel(logits, x, gamma, step, spb, device=device)
                want = run_reference(logits, x, gamma, step, spb)
                assert_step_matches(got, want, logits, x, gamma, step, spb, strict=True)
                assert int(want[1][0]) == c, f"{r['prompt']} gamma {gamma}: step {step} commits {want[1]} != {c}"
                x = want[0]
            assert bool(want[2][0]) and not (x == MASK).any()


def test_reference_confidence_matches_fp64_softmax(gen):
    logits = make_logits("random", 3, 16, 1000, torch.float32, gen)
    pred, conf = reference.unmask_predict(logits, MASK)
    l64 = logits.double()
    l64[..., MASK] = -math.inf
    p64 = torch.softmax(l64, -1)
    assert torch.equal(pred, l64.argmax(-1))
    torch.testing.assert_close(conf.double(), p64.gather(-1, pred.unsqueeze(-1)).squeeze(-1), rtol=2e-6, atol=1e-9)


def test_philox_and_gumbel_reference():
    """Random123's known answers for Philox-4x32-10, and the noise has the Gumbel(0, 1) mean and variance."""
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in reference.philox4x32_10(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                            0x9B00DBD8]
    c = [torch.tensor([v]) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    assert [int(w) for w in reference.philox4x32_10(*c, 0xA4093822, 0x299F31D0)] == [0xD16CFE09, 0x94FDCCEB,
                                                                                      0x5001E420, 0x24126EA1]
    g = reference.unmask_gumbel(123, 7, 1, 16, 8192).double()   # fixed key: a deterministic check
    assert abs(g.mean() - 0.5772156649) < 0.01 and abs(g.var() - math.pi ** 2 / 6) < 0.03
    u = torch.tensor([1.0, 0.5, 2.0, 1e-7, 16.6, 1 - 2 ** -24, 2 ** -24])
    torch.testing.assert_close(reference.unmask_log(u), torch.log(u), rtol=3e-7, atol=0)


# ----------------------------------------------------------------------------------------------------
# The kernels against the reference


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["random", "peaked"])
@pytest.mark.parametrize("V", [2, 111, 32000, 131072])
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, dtype, B, V, kind, gen):
    """Steps of a 16-step block (all of them for small V; first, middle and last for large V), fresh logits and
    masks each step, one finished row when B > 1."""
    S, spb = 16, 16
    mask_id = MASK if V > MASK else V - 1
    steps = range(spb) if V <= 111 else [0, 7, spb - 1]
    for step in steps:
        gamma = float(torch.rand((), generator=gen)) * 0.9 + 0.05
        logits = make_logits(kind, B, S, V, dtype, gen)
        x = random_state(B, S, gen, done_rows=(1,) if B > 1 else (), mask_id=mask_id)
        got = run_kernel(logits, x, gamma, step, spb, device=device, mask_id=mask_id)
        want = run_reference(logits, x, gamma, step, spb, mask_id=mask_id)
        assert_step_matches(got, want, logits, x, gamma, step, spb, mask_id=mask_id)
        if B > 1:   # the finished row is untouched
            assert torch.equal(got[0][1], x[1]) and got[1][1] == 0 and bool(got[2][1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_block_decode(device, dtype, gen):
    """Decoding blocks step by step until done: same states, counts and done flags as the reference."""
    B, S, V, spb = 5, 16, 2000, 16
    x_k = torch.full((B, S), MASK)
    x_r = x_k.clone()
    for step in range(spb):
        logits = make_logits("random", B, S, V, dtype, gen)
        got = run_kernel(logits, x_k, 0.7, step, spb, device=device)
        want = run_reference(logits, x_r, 0.7, step, spb)
        assert_step_matches(got, want, logits, x_r, 0.7, step, spb)
        x_k, x_r = want[0], want[0]
        if bool(want[2].all()):
            break
    assert not (x_r == MASK).any()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("V", [64, 20000])
def test_exact_ties_lower_position_first(device, V, gen):
    """Identical positions have bit-identical confidences: the floor commits the lowest positions first."""
    S = 16
    row = torch.randn(V, generator=gen)
    logits = row.expand(2, S, V).contiguous()
    x = torch.full((2, S), MASK)
    x[1, ::3] = 7                                     # row 1: positions 0, 3, 6, ... already committed
    for step, spb in [(0, 4), (1, 4), (0, 16), (2, 3)]:
        got = run_kernel(logits, x, 1.0, step, spb, device=device)
        want = run_reference(logits, x, 1.0, step, spb)
        assert_step_matches(got, want, logits, x, 1.0, step, spb, strict=True)
        for b in range(2):                            # gamma 1: nothing is above it, the floor decides
            free = (x[b] == MASK).nonzero().flatten()
            n = len(free)
            k = n if step == spb - 1 else min(n, max(1, -(-n // (spb - step))))
            assert torch.equal(((got[0][b] != MASK) & (x[b] == MASK)).nonzero().flatten(), free[:k])
            assert got[1][b] == k


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_confidence_equal_to_gamma_never_commits_beyond_the_floor(device, dtype, gen):
    """The rule is strict (conf > gamma): confidences of exactly 1.0 (one logit 200 above the rest) with gamma 1.0,
    and of exactly 0.5 (two equal top logits, the rest -inf: exact in any summation order) with gamma 0.5, commit
    only the floor max(1, ceil(n / steps left)), lowest positions first; just below gamma they all commit."""
    S, V = 16, 300
    for gamma, fill in ((1.0, "one"), (0.5, "two")):
        logits = torch.zeros(2, S, V) if fill == "one" else torch.full((2, S), -math.inf).unsqueeze(-1).repeat(1, 1, V)
        tok = torch.randint(MASK + 1, V - 1, (2, S), generator=gen)
        logits.scatter_(2, tok[..., None], 200.0 if fill == "one" else 1.0)
        if fill == "two":
            logits.scatter_(2, tok[..., None] + 1, 1.0)
        logits = logits.to(dtype)
        conf = reference.unmask_predict(logits, MASK)[1]
        assert bool((conf == gamma).all()), conf
        x = torch.full((2, S), MASK)
        x[1, 5:] = 9                                   # row 1: 5 masked
        for step, spb in ((0, 16), (0, 4), (2, 4)):
            got = run_kernel(logits, x, gamma, step, spb, device=device)
            want = run_reference(logits, x, gamma, step, spb)
            assert_step_matches(got, want, logits, x, gamma, step, spb, strict=True)
            for b, n in ((0, S), (1, 5)):
                k = max(1, -(-n // (spb - step)))
                assert int(got[1][b]) == k and int(want[1][b]) == k, (gamma, step, spb, got[1], want[1])
                assert ((got[0][b] != MASK) & (x[b] == MASK)).nonzero().flatten().tolist() == list(range(k))
            below = float(torch.nextafter(torch.tensor(gamma), torch.tensor(0.0)))   # the fp32 just below
            for fn in (run_kernel, run_reference):
                assert fn(logits, x, below, step, spb)[1].tolist() == [S, 5]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_ties_and_special_values(device, dtype):
    """Equal maxima in different vocabulary slices -> the lowest id; the mask id never wins even when largest;
    +inf logits win; -inf logits are allowed; all -inf -> lowest non-mask id with confidence 0."""
    S, V = 6, 20000
    logits = torch.zeros(1, S, V)
    logits[0, 0, [9000, 5, 4100]] = 4.0                 # CPU slices of 8192, CUDA slices of 4096
    logits[0, 1, MASK] = 50.0
    logits[0, 1, 17000] = 3.0
    logits[0, 2, [12000, 15000]] = math.inf
    logits[0, 3, :] = -math.inf
    logits[0, 3, 8191] = 1.0
    logits[0, 4, :] = -math.inf                         # only -inf (mask aside)
    logits[0, 5, :V // 2] = -math.inf
    logits = logits.to(dtype)
    x = torch.full((1, S), MASK)
    got = run_kernel(logits, x, 0.5, 15, 16, device=device)     # last step: everything is committed
    want = run_reference(logits, x, 0.5, 15, 16)
    assert torch.equal(got[0], want[0])
    assert got[0][0].tolist() == [5, 17000, 12000, 8191, 0, V // 2]
    _, conf = reference.unmask_predict(logits, MASK)
    assert conf[0, 3] == 1.0 and conf[0, 4] == 0.0 and abs(float(conf[0, 2]) - 0.5) < 1e-6
    x = torch.full((1, S), MASK)                        # first step, k = 1: the single most confident
    got = run_kernel(logits, x, 0.99, 0, 16, device=device)
    assert got[0][0].tolist() == [MASK, MASK, MASK, 8191, MASK, MASK] and got[1].tolist() == [1]


@pytest.mark.parametrize("device", devices())
def test_finished_rows_are_untouched_and_not_read(device, gen):
    B, S, V = 4, 16, 500
    logits = torch.randn(B, S, V, generator=gen)
    x = random_state(B, S, gen, done_rows=(0, 2))
    logits[0] = math.nan                                 # finished rows: their logits are never read
    logits[2] = math.nan
    logits[1][x[1] != MASK] = math.nan                   # nor those of committed positions
    got = run_kernel(logits, x, 0.6, 3, 16, device=device)
    assert torch.equal(got[0][[0, 2]], x[[0, 2]]) and got[1][[0, 2]].tolist() == [0, 0]
    assert got[2][[0, 2]].tolist() == [True, True]
    want = run_reference(logits, x, 0.6, 3, 16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("device", devices())
def test_strided_inputs_and_out_buffers(device, gen):
    B, S, V = 3, 8, 1000
    big = torch.randn(B, 2 * S, V + 24, generator=gen).to(device)
    logits = big[:, ::2, 8 : V + 8]                      # seq stride 2(V+24), vocab contiguous, offset start
    xbig = torch.full((B, S + 5), MASK, device=device)
    x = xbig[:, 2 : S + 2]
    counts = torch.full((B,), -7, dtype=torch.int32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    c, d = tt.threshold_unmask(logits, x, MASK, 0.5, 15, 16, out_counts=counts, out_done=done)
    assert c is counts and d is done
    want = run_reference(logits.cpu().contiguous(), torch.full((B, S), MASK), 0.5, 15, 16)
    assert torch.equal(x.cpu(), want[0]) and torch.equal(counts.cpu(), want[1]) and bool(done.all())
    assert (xbig[:, :2] == MASK).all() and (xbig[:, S + 2 :] == MASK).all()


@pytest.mark.parametrize("device", devices())
def test_step_and_seed_as_device_tensors(device, gen):
    B, S, V = 2, 16, 300
    logits = torch.randn(B, S, V, generator=gen)
    x = torch.full((B, S), MASK)
    as_int = run_kernel(logits, x, 0.5, 3, 8, 0.9, 11, 5, device=device)
    xd = x.clone().to(device)
    ten = lambda v: torch.tensor([v], device=device)  # noqa: E731
    counts, done = tt.threshold_unmask(logits.to(device), xd, MASK, 0.5, ten(3), 8, 0.9, ten(11), torch.tensor(5))
    assert torch.equal(xd.cpu(), as_int[0]) and torch.equal(counts.cpu(), as_int[1])


def test_empty_batch():
    x = torch.empty(0, 16, dtype=torch.int64)
    counts, done = tt.threshold_unmask(torch.randn(0, 16, 100), x, MASK, 0.5, 0, 16)
    assert counts.shape == (0,) and done.shape == (0,)


# ----------------------------------------------------------------------------------------------------
# Sampling (temperature > 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(3, 111), (1, 32000)])
def test_sampling_matches_reference_exactly(device, dtype, B, V, gen):
    """Same Philox stream and Gumbel arithmetic: on the last step (all committed, so x = the samples) the
    kernel's tokens equal the reference's bit for bit; mid-block the usual commit comparison."""
    S = 16
    logits = make_logits("random", B, S, V, dtype, gen)
    seed, offset = int(torch.randint(-2**62, 2**62, (), generator=gen)), int(torch.randint(0, 2**40, (), generator=gen))
    for temp in (0.7, 1.3) if V < 1000 else (1.3,):
        x = torch.full((B, S), MASK)
        got = run_kernel(logits, x, 0.5, 15, 16, temp, seed, offset, device=device)
        want = run_reference(logits, x, 0.5, 15, 16, temp, seed, offset)
        assert torch.equal(got[0], want[0])
        x = random_state(B, S, gen)
        got = run_kernel(logits, x, 0.3, 2, 16, temp, seed, offset, device=device)
        want = run_reference(logits, x, 0.3, 2, 16, temp, seed, offset)
        assert_step_matches(got, want, logits, x, 0.3, 2, 16, temp, seed, offset)


@pytest.mark.parametrize("device", devices())
def test_sampling_is_reproducible_and_keyed(device, gen):
    B, S, V = 2, 16, 5000
    logits = torch.randn(B, S, V, generator=gen)
    x = torch.full((B, S), MASK)
    a = run_kernel(logits, x, 0.5, 15, 16, 1.0, 42, 9, device=device)
    b = run_kernel(logits, x, 0.5, 15, 16, 1.0, 42, 9, device=device)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], run_kernel(logits, x, 0.5, 15, 16, 1.0, 42, 10, device=device)[0])
    assert not torch.equal(a[0], run_kernel(logits, x, 0.5, 15, 16, 1.0, 43, 9, device=device)[0])
    assert not torch.equal(a[0], run_kernel(logits, x, 0.5, 15, 16, 0.0, 42, 9, device=device)[0])


@pytest.mark.parametrize("device", devices())
def test_sampling_frequencies_follow_softmax(device):
    """Chi-square of 30720 samples against softmax(logits / T) over 6 tokens (mask excluded), T = 0.7."""
    B, S, V, T = 16, 64, 7, 0.7
    row = torch.tensor([0.3, -1.0, 0.9, 5.0, 0.0, 1.4, -0.2])   # id 3 is the mask: never sampled
    logits = row.expand(B, S, V).contiguous()
    counts = torch.zeros(V)
    for offset in range(30):
        x, _, _ = run_kernel(logits, torch.full((B, S), MASK), 0.5, 15, 16, T, 2024, offset, device=device)
        counts += torch.bincount(x.flatten(), minlength=V).float()
    assert counts[MASK] == 0
    p = torch.softmax(torch.cat([row[:MASK], row[MASK + 1 :]]) / T, 0).double()
    obs = torch.cat([counts[:MASK], counts[MASK + 1 :]]).double()
    chi2 = float(((obs - p * obs.sum()) ** 2 / (p * obs.sum())).sum())
    assert chi2 < 25.7, f"chi2 {chi2:.1f} over 5 degrees of freedom (p < 1e-4)"


# ----------------------------------------------------------------------------------------------------
# Errors, schema


def op_args(**kw):
    a = dict(logits=torch.randn(2, 4, 50), x=torch.full((2, 4), MASK), mask_id=MASK, gamma=0.5,
             step=torch.tensor([0]), steps_per_block=4, temperature=0.0, seed=torch.tensor([1]),
             offset=torch.tensor([0]), counts=torch.empty(2, dtype=torch.int32), done=torch.empty(2, dtype=torch.bool))
    a.update(kw)
    return a


@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(gamma=-0.1), ValueError, "gamma must be in"),
        (dict(gamma=1.5), ValueError, "gamma must be in"),
        (dict(gamma=math.nan), ValueError, "gamma must be in"),
        (dict(step=torch.tensor([4])), ValueError, "step must be in"),
        (dict(step=torch.tensor([-1])), ValueError, "step must be in"),
        (dict(steps_per_block=0, step=torch.tensor(0)), ValueError, "steps_per_block must be"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(temperature=1e-50), ValueError, "temperature must be"),
        (dict(mask_id=50), ValueError, "mask_id must be in"),
        (dict(logits=torch.randn(2, 4, 50, dtype=torch.float16)), TypeError, "logits must be float32 or bfloat16"),
        (dict(logits=torch.randn(2, 4, 50, dtype=torch.float64)), TypeError, "logits must be float32 or bfloat16"),
        (dict(logits=torch.randn(8, 50)), RuntimeError, "logits must be .batch, seq, vocab."),
        (dict(logits=torch.randn(2, 4, 1)), RuntimeError, "vocab dim must be in"),
        (dict(logits=torch.randn(2, 65, 50), x=torch.full((2, 65), MASK)), RuntimeError, "seq dim must be in"),
        (dict(logits=torch.randn(2, 50, 4).transpose(1, 2)), RuntimeError, "logits must have a contiguous last"),
        (dict(x=torch.full((2, 4), MASK, dtype=torch.int32)), TypeError, "x must be Long"),
        (dict(x=torch.full((2, 5), MASK)), RuntimeError, "x must be .batch, seq."),
        (dict(step=torch.tensor([0.0])), TypeError, "step must be Long"),
        (dict(seed=torch.tensor([1, 2])), RuntimeError, "seed must hold one value"),
        (dict(offset=torch.tensor([0], dtype=torch.int32)), TypeError, "offset must be Long"),
        (dict(counts=torch.empty(2, dtype=torch.int64)), TypeError, "counts must be Int"),
        (dict(counts=torch.empty(3, dtype=torch.int32)), RuntimeError, "counts must be a contiguous .batch."),
        (dict(done=torch.empty(2, dtype=torch.int32)), TypeError, "done must be Bool"),
    ],
)
def test_bad_input_names_the_argument(kw, exc, words):
    a = op_args(**kw)
    with pytest.raises(exc, match=words):
        torch.ops.twotower.threshold_unmask(*a.values())


def test_nan_logits_raise_on_cpu():
    logits = torch.randn(2, 4, 50)
    logits[1, 2, 17] = math.nan
    x = torch.full((2, 4), MASK)
    with pytest.raises(ValueError, match=r"must not contain NaN .*batch 1, seq 2"):
        tt.threshold_unmask(logits, x, MASK, 0.5, 0, 4)
    assert (x == MASK).all(), "nothing is committed when the step fails"
    with pytest.raises(ValueError, match="must not contain NaN"):
        reference.threshold_unmask(logits, x, MASK, 0.5, 0, 4)


def test_wrapper_checks_int_step():
    with pytest.raises(ValueError, match="step must be in"):
        tt.threshold_unmask(torch.randn(1, 4, 50), torch.full((1, 4), MASK), MASK, 0.5, 4, 4)


def test_opcheck(gen):
    for dtype, temp in [(torch.float32, 0.0), (torch.bfloat16, 0.8)]:
        a = op_args(logits=torch.randn(2, 4, 50, generator=gen).to(dtype), temperature=temp)
        torch.library.opcheck(torch.ops.twotower.threshold_unmask.default, tuple(a.values()))


def test_compiles_under_torch_compile(gen):
    logits = torch.randn(2, 4, 50, generator=gen)
    step, seed, offset = torch.tensor([1]), torch.tensor([3]), torch.tensor([0])

    @torch.compile(fullgraph=True, backend="eager")
    def f(logits, x, counts, done):
        torch.ops.twotower.threshold_unmask(logits, x, MASK, 0.5, step, 4, 0.0, seed, offset, counts, done)
        return counts + 1

    x = torch.full((2, 4), MASK)
    counts, done = torch.empty(2, dtype=torch.int32), torch.empty(2, dtype=torch.bool)
    out = f(logits, x, counts, done)
    want = run_reference(logits, torch.full((2, 4), MASK), 0.5, 1, 4)
    assert torch.equal(x, want[0]) and torch.equal(out, want[1] + 1)


# ----------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_samples_equal_cpu_samples(dtype, gen):
    B, S, V = 2, 16, 50000
    logits = torch.randn(B, S, V, generator=gen).to(dtype)
    x = torch.full((B, S), MASK)
    for temp in (0.0, 1.0):
        cpu = run_kernel(logits, x, 0.5, 15, 16, temp, 77, 3, device="cpu")
        gpu = run_kernel(logits, x, 0.5, 15, 16, temp, 77, 3, device="cuda")
        assert torch.equal(cpu[0], gpu[0])


@pytest.mark.cuda
def test_cuda_nan_is_minus_inf_and_debug_mode_raises(monkeypatch, gen):
    B, S, V = 1, 4, 9000
    logits = torch.randn(B, S, V, generator=gen)
    logits[0, 1, :5000] = math.nan
    x = torch.full((B, S), MASK)
    got = run_kernel(logits, x, 0.5, 15, 16, device="cuda")
    want = run_reference(torch.nan_to_num(logits, nan=-math.inf), x, 0.5, 15, 16)
    assert torch.equal(got[0], want[0])
    monkeypatch.setenv("TWOTOWER_UNMASK_DEBUG", "1")
    with pytest.raises(ValueError, match="must not contain NaN"):
        run_kernel(logits, x, 0.5, 15, 16, device="cuda")
    with pytest.raises(ValueError, match="step must be in"):
        tt.threshold_unmask(logits.cuda(), x.cuda(), MASK, 0.5, torch.tensor([16], device="cuda"), 16)


@pytest.mark.cuda
def test_cuda_bad_step_tensor_leaves_x_untouched():
    x = torch.full((2, 4), MASK, device="cuda")
    counts, done = tt.threshold_unmask(torch.randn(2, 4, 50, device="cuda"), x, MASK, 0.5,
                                       torch.tensor([9], device="cuda"), 4)
    assert (x == MASK).all() and counts.tolist() == [-1, -1] and not done.any()


@pytest.mark.cuda
def test_cuda_device_mix_is_refused():
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.twotower.threshold_unmask(*op_args(x=torch.full((2, 4), MASK, device="cuda")).values())


@pytest.mark.cuda
def test_cuda_graph_replays_every_step(gen):
    """One captured step, replayed with new logits and step values: a whole block decode, as the engine will."""
    B, S, V, spb = 3, 16, 32000, 16
    dev = "cuda"
    logits = torch.empty(B, S, V, device=dev)
    x = torch.full((B, S), MASK, device=dev)
    step, seed, offset = (torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(3))
    counts = torch.empty(B, dtype=torch.int32, device=dev)
    done = torch.empty(B, dtype=torch.bool, device=dev)
    args = (logits, x, MASK, 0.8, step, spb, 0.0, seed, offset, counts, done)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                     # warm-up outside capture, then restore the state
        torch.ops.twotower.threshold_unmask(*args)
    torch.cuda.current_stream().wait_stream(s)
    x.fill_(MASK)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.twotower.threshold_unmask(*args)
    x.fill_(MASK)
    x_ref = torch.full((B, S), MASK)
    for i in range(spb):
        new = make_logits("random", B, S, V, torch.float32, gen)
        logits.copy_(new)
        step.fill_(i)
        graph.replay()
        want = run_reference(new, x_ref, 0.8, i, spb)
        assert_step_matches((x.cpu(), counts.cpu(), done.cpu()), want, new, x_ref, 0.8, i, spb)
        x_ref = want[0]
        x.copy_(x_ref)
        if bool(want[2].all()):
            break
    assert not (x_ref == MASK).any()

