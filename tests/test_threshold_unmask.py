"""threshold_unmask: the reference against NVIDIA's golden schedules and logits, the kernels against the
reference (random and peaked logits, exact ties, every step, finished rows, sampling), per-row parameters
(batch invariance in any slot, broadcast, kept, mask_id -1, logprob), the key of row 0 against the old op, and
bad input."""
import json
import math
import os

import pytest
import torch

import twotower_ext as tt
from twotower_ext import reference

import oracle
from conftest import devices, tolerance

MASK = 3
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "parity", "golden.json")
DTYPES = [torch.float32, torch.bfloat16]
TOL = 1e-4   # relative: fp32 confidences summed in another order differ by ~1e-6; bf16 logits are exact in fp32


def golden():
    with open(GOLDEN) as f:
        return json.load(f)


def run_kernel(logits, x, gamma, step, spb, temperature=0.0, seed=0, block=0, device="cpu", mask_id=MASK, kept=None):
    """The op on `device` on copies (per-row tensors moved there too); returns (x, counts, done) on the CPU."""
    xd = x.clone().to(device)
    dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    counts, done = tt.threshold_unmask(logits.to(device), xd, mask_id, dev(gamma), dev(step), dev(spb),
                                       dev(temperature), dev(seed), dev(block), dev(kept))
    return xd.cpu(), counts.cpu(), done.cpu()


def run_reference(logits, x, gamma, step, spb, temperature=0.0, seed=0, block=0, mask_id=MASK, kept=None):
    xr = x.clone()
    counts, done = reference.threshold_unmask(logits, xr, mask_id, gamma, step, spb, temperature, seed, block, kept)
    return xr, counts, done


def oracle_commits(logits, x, gamma, step, spb, temperature=0.0, seed=0, block=0, mask_id=MASK):
    """(pred, fp64 conf, committed positions per row) from tests/oracle.py. Sampling rows (T > 0): the sampled token
    is the reference's Philox/Gumbel draw (bit-exact by definition, checked against Random123 below); its
    confidence and the commit rule come from the oracle."""
    pred, conf = oracle.predict(logits, mask_id)
    sample = torch.tensor([t > 0 for t in oracle.per_row(temperature, x.shape[0])])
    if bool(sample.any()):
        drawn = reference.unmask_predict(logits, mask_id, temperature, seed, block)[0]
        pred = torch.where(sample[:, None], drawn, pred)
        conf = oracle.log_prob(logits, pred, mask_id).exp()
    return pred, conf, oracle.commit_rule(conf, x == mask_id, gamma, step, spb)


def near_gamma(conf, masked, gamma, step, spb, tol=TOL):
    """A masked confidence within tol (relative) of gamma: only then may the count itself differ by rounding."""
    c = conf[masked]
    return step != spb - 1 and bool(((c - gamma).abs() <= tol * max(gamma, 1e-30)).any())


def assert_step_matches(got, want, logits, x, gamma, step, spb, temperature=0.0, seed=0, block=0, strict=False,
                        mask_id=MASK, kept=None):
    """The kernel's and the reference's step (x, counts, done) against the oracle's commit rule: the same number of
    commits in every row unless a confidence is within rounding (TOL) of gamma; the same positions unless the ones
    that differ tie (within TOL) with the last one committed; committed positions hold the predicted token;
    counts = committed kept positions, done == no kept position left masked. strict: kernel and reference
    bit-identical as well. Parameters: numbers or one per row."""
    (xg, cg, dg), (xw, cw, dw) = got, want
    if strict:
        assert torch.equal(xg, xw) and torch.equal(cg, cw) and torch.equal(dg, dw), (
            f"kernel != reference\nkernel x={xg}\nref x={xw}\ncounts {cg} vs {cw}")
    pred, conf, rows = oracle_commits(logits, x, gamma, step, spb, temperature, seed, block, mask_id)
    B, S = x.shape
    masked = x == mask_id
    params = zip(oracle.per_row(gamma, B), oracle.per_row(step, B), oracle.per_row(spb, B),
                 oracle.per_row(S if kept is None else kept, B))
    for b, (g, st, sb, kp) in enumerate(params):
        for name, (xo, co, do) in (("kernel", got), ("reference", want)):
            mine = ((xo[b] != mask_id) & masked[b]).nonzero().flatten().tolist()
            assert int(co[b]) == sum(s < kp for s in mine), f"{name} row {b}: counts {int(co[b])}, committed {mine}"
            left = [s for s in range(kp) if masked[b, s] and s not in mine]
            assert bool(do[b]) == (not left), f"{name} row {b}: done flag"
            assert torch.equal(xo[b][~masked[b]], x[b][~masked[b]]), f"{name} row {b}: a committed token changed"
            assert torch.equal(xo[b][mine], pred[b][mine]), f"{name} row {b}: committed tokens != predictions"
            want_pos = rows[b]
            if not near_gamma(conf[b], masked[b], g, st, sb):
                assert len(mine) == len(want_pos), (
                    f"{name} row {b} commits {len(mine)}, the rule says {len(want_pos)} (no confidence near gamma "
                    f"{g}); conf {conf[b][masked[b]].tolist()}")
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
    pred, logprob = reference.unmask_predict(logits, MASK)
    conf = logprob.exp()
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
        conf = reference.unmask_predict(logits, MASK)[1].exp()
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
    conf = reference.unmask_predict(logits, MASK)[1].exp()
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
    ten = lambda v: torch.tensor([v], device=device)  # noqa: E731  (int64: the wrapper converts step to int32)
    counts, done = tt.threshold_unmask(logits.to(device), xd, MASK, 0.5, ten(3), 8, 0.9, ten(11),
                                       torch.tensor(5, device=device))
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
    seed, block = int(torch.randint(-2**62, 2**62, (), generator=gen)), int(torch.randint(0, 2**40, (), generator=gen))
    for temp in (0.7, 1.3) if V < 1000 else (1.3,):
        x = torch.full((B, S), MASK)
        got = run_kernel(logits, x, 0.5, 15, 16, temp, seed, block, device=device)
        want = run_reference(logits, x, 0.5, 15, 16, temp, seed, block)
        assert torch.equal(got[0], want[0])
        x = random_state(B, S, gen)
        got = run_kernel(logits, x, 0.3, 2, 16, temp, seed, block, device=device)
        want = run_reference(logits, x, 0.3, 2, 16, temp, seed, block)
        assert_step_matches(got, want, logits, x, 0.3, 2, 16, temp, seed, block)


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
    for block in range(30):
        x, _, _ = run_kernel(logits, torch.full((B, S), MASK), 0.5, 15, 16, T, 2024, block, device=device)
        counts += torch.bincount(x.flatten(), minlength=V).float()
    assert counts[MASK] == 0
    p = torch.softmax(torch.cat([row[:MASK], row[MASK + 1 :]]) / T, 0).double()
    obs = torch.cat([counts[:MASK], counts[MASK + 1 :]]).double()
    chi2 = float(((obs - p * obs.sum()) ** 2 / (p * obs.sum())).sum())
    assert chi2 < 25.7, f"chi2 {chi2:.1f} over 5 degrees of freedom (p < 1e-4)"


# ----------------------------------------------------------------------------------------------------
# Per-row parameters


def mixed_params(B, S, gen, sample=0.5):
    """Every per-row parameter different per row: steps_per_block in [1, 20), step in [0, steps), gamma in
    (0.05, 0.95), a fraction `sample` of the rows sampling at T in [0.3, 2), int64 seeds (negative too), block
    indices past 2^32, kept in [0, S]."""
    spb = torch.randint(1, 20, (B,), generator=gen, dtype=torch.int32)
    return {"gamma": torch.rand(B, generator=gen) * 0.9 + 0.05,
            "step": (torch.randint(0, 2**20, (B,), generator=gen) % spb).to(torch.int32),
            "steps_per_block": spb,
            "temperature": torch.where(torch.rand(B, generator=gen) < sample,
                                       0.3 + 1.7 * torch.rand(B, generator=gen), torch.zeros(B)),
            "seed": torch.randint(-2**62, 2**62, (B,), generator=gen),
            "block": torch.randint(0, 2**40, (B,), generator=gen),
            "kept": torch.randint(0, S + 1, (B,), generator=gen, dtype=torch.int32)}


def rows_of(params, idx):
    """The parameters of rows idx (a slice or an index tensor); numbers stay numbers."""
    return {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in params.items()}


SENTINEL = 7.0   # logprob's value where the op must not write


def run_op(logits, x, params, device, mask_id=MASK):
    """The wrapper with keyword parameters on copies; returns (x, counts, done, logprob) on the CPU."""
    p = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    xd = x.clone().to(device)
    lp = torch.full(x.shape, SENTINEL, device=device)
    counts, done = tt.threshold_unmask(logits.to(device), xd, mask_id, out_logprob=lp, **p)
    return xd.cpu(), counts.cpu(), done.cpu(), lp.cpu()


def assert_same(a, b, what):
    for name, u, v in zip(("x", "counts", "done", "logprob"), a, b):
        assert torch.equal(u, v), f"{what}: {name} differs\n{u}\n{v}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S", [1, 5, 16, 33])
def test_per_row_parameters_equal_each_row_alone_in_any_slot(device, dtype, S, gen):
    """Rows with their own gamma, step, steps, temperature, seed, block and kept in one call: each row's x, counts,
    done and logprob equal, bit for bit, that row alone and that row in another slot of a permuted batch; and the
    call agrees with the reference and the oracle's commit rule."""
    B = 7
    V = int(torch.randint(97, 9001, (), generator=gen)) | 1            # odd: not a multiple of 4 or a slice
    logits = make_logits("random", B, S, V, dtype, gen)
    x = random_state(B, S, gen, done_rows=(3,))
    params = mixed_params(B, S, gen)
    got = run_op(logits, x, params, device)
    for b in range(B):
        alone = run_op(logits[b:b + 1], x[b:b + 1], rows_of(params, slice(b, b + 1)), device)
        assert_same(alone, tuple(t[b:b + 1] for t in got), f"row {b} alone")
    perm = torch.randperm(B, generator=gen)
    moved = run_op(logits[perm], x[perm], rows_of(params, perm), device)
    inv = torch.argsort(perm)
    assert_same(tuple(t[inv] for t in moved), got, f"rows permuted by {perm.tolist()}")
    want = run_reference(logits, x, params["gamma"], params["step"], params["steps_per_block"],
                         params["temperature"], params["seed"], params["block"], kept=params["kept"])
    assert_step_matches(got[:3], want, logits, x, params["gamma"], params["step"], params["steps_per_block"],
                        params["temperature"], params["seed"], params["block"], kept=params["kept"])
    committed = (x == MASK) & (got[0] != MASK)
    assert (got[3][~committed] == SENTINEL).all(), "logprob written where nothing was committed"


@pytest.mark.parametrize("device", devices())
def test_broadcast_scalar_one_element_and_full_tensors_agree(device, gen):
    """Each parameter as a Python number, a [1] tensor, a [B] tensor, a stride-0 [B] view and a tensor of another
    integer / float dtype (the wrapper converts it): the same bits."""
    B, S, V = 5, 16, 3001
    logits = make_logits("random", B, S, V, torch.float32, gen)
    x = random_state(B, S, gen)
    values = {"gamma": 0.6, "step": 2, "steps_per_block": 9, "temperature": 0.8,
              "seed": int(torch.randint(-2**62, 2**62, (), generator=gen)), "block": 2**33 + 7, "kept": 11}
    dtypes = {k: tt.ops.UNMASK_ROW_ARGS[k] for k in values}
    wide = {k: torch.float64 if dtypes[k].is_floating_point else torch.int64 for k in values}   # converted to dtypes
    forms = {
        "number": values,
        "[1]": {k: torch.full((1,), v, dtype=dtypes[k]) for k, v in values.items()},
        "[B]": {k: torch.full((B,), v, dtype=dtypes[k]) for k, v in values.items()},
        "stride 0": {k: torch.full((1,), v, dtype=dtypes[k]).expand(B) for k, v in values.items()},
        "0-d, wider dtype": {k: torch.tensor(v, dtype=wide[k]) for k, v in values.items()},
    }
    base = run_op(logits, x, forms["number"], device)
    for name, params in forms.items():
        assert_same(run_op(logits, x, params, device), base, name)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_kept_counts_only_kept_positions(device, dtype, gen):
    """kept changes the outputs only: the same x and logprob as kept = S; counts = committed positions below
    kept[b], done = none of them left masked (kept 0: nothing counted, done)."""
    B, S, V = 6, 16, 1111
    logits = make_logits("random", B, S, V, dtype, gen)
    x = random_state(B, S, gen)
    params = mixed_params(B, S, gen)
    params["kept"][0] = 0
    params["kept"][1] = S
    full = run_op(logits, x, {**params, "kept": None}, device)
    got = run_op(logits, x, params, device)
    assert torch.equal(got[0], full[0]) and torch.equal(got[3], full[3])
    committed = (x == MASK) & (got[0] != MASK)
    in_kept = torch.arange(S) < params["kept"][:, None]
    assert got[1].tolist() == (committed & in_kept).sum(1).tolist()
    assert got[2].tolist() == (~((got[0] == MASK) & in_kept).any(1)).tolist()
    assert bool(got[2][0]) and int(got[1][0]) == 0
    assert torch.equal(got[1][1], full[1][1]) and torch.equal(got[2][1], full[2][1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_id_minus_one_is_ar_sampling(device, dtype, gen):
    """mask_id -1, logits [B, 1, V], x = -1, one step of one: every row commits its position with the argmax of
    the whole vocabulary (ids 0 and 3 included) or a Gumbel-max sample keyed by (seed, block = token index,
    position 0); counts 1, done; logprob the full-vocabulary log softmax."""
    B, V = 8, 4099
    logits = make_logits("random", B, 1, V, dtype, gen).float()
    logits[0, 0, 3] = 40.0                                # ids the mask would have excluded win when largest
    logits[1, 0, 0] = 40.0
    logits = logits.to(dtype)
    temperature = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, 1.0, 1.3, 2.0])
    seed = torch.randint(-2**62, 2**62, (B,), generator=gen)
    block = torch.randint(0, 2**34, (B,), generator=gen)
    params = {"gamma": 0.9, "step": 0, "steps_per_block": 1, "temperature": temperature, "seed": seed, "block": block}
    x = torch.full((B, 1), -1)
    xo, counts, done, lp = run_op(logits, x, params, device, mask_id=-1)
    l = logits.float()
    greedy = l.argmax(-1)
    sampled = (l / temperature.clamp(min=1e-3)[:, None, None] + reference.unmask_gumbel(seed, block, B, 1, V)).argmax(-1)
    want = torch.where(temperature[:, None] > 0, sampled, greedy)
    assert torch.equal(xo, want) and xo[0, 0] == 3 and xo[1, 0] == 0
    assert counts.tolist() == [1] * B and bool(done.all())
    torch.testing.assert_close(lp.double(), oracle.log_prob(logits, xo, -1), rtol=0, atol=20 * tolerance(torch.float32))
    want_ref = run_reference(logits, x, 0.9, 0, 1, temperature, seed, block, mask_id=-1)
    assert_same((xo, counts, done), want_ref, "kernel vs reference")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [111, 20011])
def test_logprob_matches_fp64_oracle_and_the_commits(device, dtype, V, gen):
    """logprob against log_softmax in fp64 at every committed position (last step: every masked one), the
    sentinel elsewhere; and a mid-block step commits exactly what the rule gives for conf = exp(logprob) (up to
    ties within rounding). The kernel computes in fp32 from exactly widened logits, so the tolerance is fp32's
    for both storage dtypes."""
    B, S = 5, 16
    logits = make_logits("random", B, S, V, dtype, gen)
    x = random_state(B, S, gen, done_rows=(2,))
    params = mixed_params(B, S, gen)
    masked = x == MASK
    last = {**params, "step": params["steps_per_block"] - 1}
    xa, _, _, lp_all = run_op(logits, x, last, device)
    assert (xa != MASK).all()
    want = oracle.log_prob(logits, torch.where(masked, xa, 0), MASK)
    tol = 20 * tolerance(torch.float32)
    torch.testing.assert_close(lp_all[masked].double(), want[masked], rtol=tol, atol=tol)
    assert (lp_all[~masked] == SENTINEL).all()
    xo, _, _, lp = run_op(logits, x, params, device)
    committed = masked & (xo != MASK)
    assert torch.equal(lp[committed], lp_all[committed]) and (lp[~committed] == SENTINEL).all()
    for p, want_x in ((last, xa), (params, xo)):   # the reference's logprob: the oracle's, where it commits
        xr, lr = x.clone(), torch.full(x.shape, SENTINEL)
        reference.threshold_unmask(logits, xr, MASK, **p, out_logprob=lr)
        done_r = masked & (xr != MASK)
        torch.testing.assert_close(lr[done_r].double(), want[done_r], rtol=tol, atol=tol)
        assert (lr[~done_r] == SENTINEL).all()
    conf = lp_all.double().exp()
    rule = oracle.commit_rule(conf, masked, params["gamma"], params["step"], params["steps_per_block"])
    for b in range(B):
        mine = committed[b].nonzero().flatten().tolist()
        if mine == rule[b]:
            continue
        c = conf[b][masked[b]]
        close = lambda a, v: bool(((a - v).abs() <= 1e-6 * v).any())  # noqa: E731
        edge = float(conf[b][mine + rule[b]].min()) if mine + rule[b] else 0.0
        assert close(c, float(params["gamma"][b])) or all(close(conf[b][s:s + 1], edge)
                                                         for s in set(mine) ^ set(rule[b])), (
            f"row {b}: kernel commits {mine}, the rule on exp(logprob) gives {rule[b]}")


def old_key_gumbel(seed: int, offset: int, row: int, S: int, V: int) -> torch.Tensor:
    """The noise of the op before per-row keys (written out here): Philox key = seed, counter = (v // 4,
    s | row << 6, offset lo, offset hi), word v % 4."""
    U32 = 0xFFFFFFFF
    groups = (V + 3) // 4
    c0 = torch.arange(groups).view(1, groups).expand(S, groups)
    c1 = (torch.arange(S) | (row << 6)).view(S, 1).expand(S, groups)
    c2, c3 = torch.full((S, groups), offset & U32), torch.full((S, groups), (offset >> 32) & U32)
    words = torch.stack(reference.philox4x32_10(c0, c1, c2, c3, seed & U32, (seed >> 32) & U32), -1).view(S, -1)
    u = (((words[:, :V] >> 9) << 1) | 1).to(torch.float32) * 2.0 ** -24
    return -reference.unmask_log(-reference.unmask_log(u))


def pattern_logits(S, V, dtype):
    v = torch.arange(V, dtype=torch.float64)
    s = torch.arange(S, dtype=torch.float64)[:, None]
    return (torch.sin(v * 0.37 + s * 1.3) * 2.0).float().to(dtype)[None]


# Tokens the op produced before per-row keys (main at 502abbf), as row 0 with offset = the block index:
# (seed, offset, V, S, T, dtype) on pattern_logits, last step of 16 (every position committed).
OLD_ROW0 = [
    ((12345, 7, 1000, 5, 1.0, torch.float32), [598, 158, 220, 537, 8]),
    ((-3, 2**33 + 5, 4099, 16, 0.7, torch.bfloat16),
     [496, 1648, 933, 2542, 2370, 3367, 2816, 847, 3373, 1211, 2669, 3872, 981, 3779, 858, 599]),
    ((2**40 + 17, 0, 33, 33, 2.5, torch.float32),
     [21, 20, 31, 11, 13, 2, 30, 14, 9, 27, 2, 2, 15, 6, 17, 6, 29, 32, 11, 7, 27, 11, 27, 6, 20, 19, 13, 26, 22,
      7, 16, 13, 9]),
]


@pytest.mark.parametrize("device", devices())
def test_row_samples_equal_the_old_op_at_row_0(device, gen):
    """The engine sampled one row at a time as row 0 with offset = block: for b = 0 the old counter s | b << 6 is s,
    so those samples are unchanged. Recorded tokens of the old op, and the old formula on fresh logits, for the row
    placed in any slot of a batch."""
    for (seed, block, V, S, T, dtype), tokens in OLD_ROW0:
        got = run_kernel(pattern_logits(S, V, dtype), torch.full((1, S), MASK), 0.5, 15, 16, T, seed, block,
                         device=device)
        assert got[0][0].tolist() == tokens
    B, S, V, T = 4, 16, 5003, 0.9
    seed, block = int(torch.randint(-2**62, 2**62, (), generator=gen)), int(torch.randint(0, 2**40, (), generator=gen))
    logits = make_logits("random", B, S, V, torch.float32, gen)
    l = logits.clone()
    l[..., MASK] = -math.inf
    got = run_kernel(logits, torch.full((B, S), MASK), 0.5, 15, 16, T, seed, block, device=device)
    for b in range(B):   # row b's logits, keyed as the old op keyed row 0
        assert torch.equal(got[0][b], (l[b] / T + old_key_gumbel(seed, block, 0, S, V)).argmax(-1))


# ----------------------------------------------------------------------------------------------------
# Errors, schema


def op_args(**kw):
    """The op's arguments in schema order (per-row values as [1] tensors)."""
    a = dict(logits=torch.randn(2, 4, 50), x=torch.full((2, 4), MASK), mask_id=MASK, gamma=torch.tensor([0.5]),
             step=torch.tensor([0], dtype=torch.int32), steps_per_block=torch.tensor([4], dtype=torch.int32),
             temperature=torch.tensor([0.0]), seed=torch.tensor([1]), block=torch.tensor([0]), kept=None,
             counts=torch.empty(2, dtype=torch.int32), done=torch.empty(2, dtype=torch.bool), logprob=None)
    a.update(kw)
    return a


i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731


@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(gamma=torch.tensor([-0.1])), ValueError, "gamma must be in .* at row 0"),
        (dict(gamma=torch.tensor([0.5, 1.5])), ValueError, r"gamma must be in \[0, 1\], got 1.5 at row 1"),
        (dict(gamma=torch.tensor([math.nan])), ValueError, "gamma must be in"),
        (dict(step=i32(0, 4)), ValueError, r"step must be in \[0, steps_per_block = 4\), got 4 at row 1"),
        (dict(step=i32(-1)), ValueError, "step must be in"),
        (dict(step=i32(2, 2), steps_per_block=i32(4, 2)), ValueError, "step must be in .* = 2.* at row 1"),
        (dict(steps_per_block=i32(0), step=i32(0)), ValueError, "steps_per_block must be >= 1, got 0 at row 0"),
        (dict(temperature=torch.tensor([0.0, -1.0])), ValueError, "temperature must be .* at row 1"),
        (dict(temperature=torch.tensor([math.inf])), ValueError, "temperature must be"),
        (dict(temperature=torch.tensor([math.nan])), ValueError, "temperature must be"),
        (dict(kept=i32(5)), ValueError, r"kept must be in \[0, seq = 4\], got 5 at row 0"),
        (dict(kept=i32(0, -1)), ValueError, "kept must be in .* at row 1"),
        (dict(mask_id=50), ValueError, "mask_id must be in"),
        (dict(mask_id=-2), ValueError, "mask_id must be in"),
        (dict(logits=torch.randn(2, 4, 50, dtype=torch.float16)), TypeError, "logits must be float32 or bfloat16"),
        (dict(logits=torch.randn(2, 4, 50, dtype=torch.float64)), TypeError, "logits must be float32 or bfloat16"),
        (dict(logits=torch.randn(8, 50)), RuntimeError, "logits must be .batch, seq, vocab."),
        (dict(logits=torch.randn(2, 4, 1)), RuntimeError, "vocab dim must be in"),
        (dict(logits=torch.randn(2, 65, 50), x=torch.full((2, 65), MASK)), RuntimeError, "seq dim must be in"),
        (dict(logits=torch.randn(2, 50, 4).transpose(1, 2)), RuntimeError, "logits must have a contiguous last"),
        (dict(x=torch.full((2, 4), MASK, dtype=torch.int32)), TypeError, "x must be Long"),
        (dict(x=torch.full((2, 5), MASK)), RuntimeError, "x must be .batch, seq."),
        (dict(gamma=torch.tensor([0.5], dtype=torch.float64)), TypeError, "gamma must be Float"),
        (dict(step=torch.tensor([0.0])), TypeError, "step must be Int"),
        (dict(steps_per_block=torch.tensor([4])), TypeError, "steps_per_block must be Int"),
        (dict(temperature=torch.tensor([0], dtype=torch.int32)), TypeError, "temperature must be Float"),
        (dict(seed=i32(1)), TypeError, "seed must be Long"),
        (dict(block=torch.tensor([0.0])), TypeError, "block must be Long"),
        (dict(kept=torch.tensor([4])), TypeError, "kept must be Int"),
        (dict(gamma=torch.tensor([0.5, 0.5, 0.5])), RuntimeError, r"gamma must be a \[batch\] = \[2\] or a \[1\]"),
        (dict(step=torch.tensor([[0]], dtype=torch.int32)), RuntimeError, "step must be a .batch."),
        (dict(steps_per_block=torch.tensor(4, dtype=torch.int32)), RuntimeError, "steps_per_block must be a .batch."),
        (dict(temperature=torch.zeros(3)), RuntimeError, "temperature must be a .batch."),
        (dict(seed=torch.tensor([1, 2, 3])), RuntimeError, "seed must be a .batch."),
        (dict(block=torch.zeros(2, 1, dtype=torch.int64)), RuntimeError, "block must be a .batch."),
        (dict(kept=i32(4, 4, 4)), RuntimeError, "kept must be a .batch."),
        (dict(counts=torch.empty(2, dtype=torch.int64)), TypeError, "counts must be Int"),
        (dict(counts=torch.empty(3, dtype=torch.int32)), RuntimeError, "counts must be a contiguous .batch."),
        (dict(done=torch.empty(2, dtype=torch.int32)), TypeError, "done must be Bool"),
        (dict(logprob=torch.empty(2, 4, dtype=torch.float64)), TypeError, "logprob must be Float"),
        (dict(logprob=torch.empty(2, 5)), RuntimeError, "logprob must be .batch, seq."),
        (dict(logprob=torch.empty(4, 2).t()), RuntimeError, "logprob must have a contiguous last"),
    ],
)
def test_bad_input_names_the_argument(kw, exc, words):
    a = op_args(**kw)
    with pytest.raises(exc, match=words):
        torch.ops.twotower.threshold_unmask(*a.values())


@pytest.mark.parametrize(
    "kw,exc,words",
    [
        (dict(gamma=1.5), ValueError, "gamma must be in"),
        (dict(step=4), ValueError, r"step must be in \[0, steps_per_block = 4\), got 4"),
        (dict(step=-1, steps_per_block=torch.tensor([4])), ValueError, "step must be in"),
        (dict(steps_per_block=0, step=0), ValueError, "steps_per_block must be"),
        (dict(temperature=1e-50), ValueError, "temperature must be .* float32"),
        (dict(temperature=1e39), ValueError, "temperature must be"),
        (dict(kept=5), ValueError, r"kept must be in \[0, seq = 4\]"),
        (dict(gamma="0.5"), TypeError, "gamma must be a real number or a tensor"),
        (dict(step=1.0), TypeError, "step must be an int or a tensor"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(step=torch.tensor([0.0])), TypeError, "step must be Int"),
        (dict(gamma=torch.tensor([1], dtype=torch.int32)), TypeError, "gamma must be Float"),
        (dict(kept=torch.tensor([True])), TypeError, "kept must be Int"),
    ],
)
def test_wrapper_checks_numbers_and_kinds(kw, exc, words):
    a = dict(gamma=0.5, step=0, steps_per_block=4)
    a.update(kw)
    with pytest.raises(exc, match=words):
        tt.threshold_unmask(torch.randn(2, 4, 50), torch.full((2, 4), MASK), MASK, **a)


def test_reference_checks_per_row_values_like_the_op():
    x = torch.full((3, 4), MASK)
    with pytest.raises(ValueError, match="step must be in .* at row 2"):
        reference.threshold_unmask(torch.randn(3, 4, 50), x, MASK, 0.5, torch.tensor([0, 1, 3]), torch.tensor([4, 4, 3]))
    with pytest.raises(ValueError, match="kept must be in .* at row 0"):
        reference.threshold_unmask(torch.randn(3, 4, 50), x, MASK, 0.5, 0, 4, kept=torch.tensor([9]))


def test_nan_logits_raise_on_cpu():
    logits = torch.randn(2, 4, 50)
    logits[1, 2, 17] = math.nan
    x = torch.full((2, 4), MASK)
    with pytest.raises(ValueError, match=r"must not contain NaN .*batch 1, seq 2"):
        tt.threshold_unmask(logits, x, MASK, 0.5, 0, 4)
    assert (x == MASK).all(), "nothing is committed when the step fails"
    with pytest.raises(ValueError, match="must not contain NaN"):
        reference.threshold_unmask(logits, x, MASK, 0.5, 0, 4)


def test_opcheck(gen):
    B = 3
    per_row = dict(gamma=torch.rand(B, generator=gen), step=i32(0, 1, 2), steps_per_block=i32(4, 3, 5),
                   temperature=torch.tensor([0.0, 0.8, 1.2]), seed=torch.tensor([1, -5, 2**40]),
                   block=torch.tensor([0, 7, 2**35]), kept=i32(4, 2, 0), logprob=torch.zeros(B, 4))
    for dtype, kw in [(torch.float32, {}), (torch.bfloat16, dict(temperature=torch.tensor([0.8]))),
                      (torch.float32, per_row)]:
        a = op_args(logits=torch.randn(B, 4, 50, generator=gen).to(dtype), x=torch.full((B, 4), MASK),
                    counts=torch.empty(B, dtype=torch.int32), done=torch.empty(B, dtype=torch.bool), **kw)
        torch.library.opcheck(torch.ops.twotower.threshold_unmask.default, tuple(a.values()))


def test_compiles_under_torch_compile(gen):
    logits = torch.randn(2, 4, 50, generator=gen)
    gamma, step, spb = torch.tensor([0.5]), torch.tensor([1], dtype=torch.int32), torch.tensor([4], dtype=torch.int32)
    temp, seed, block = torch.tensor([0.0]), torch.tensor([3]), torch.tensor([0])

    @torch.compile(fullgraph=True, backend="eager")
    def f(logits, x, counts, done):
        torch.ops.twotower.threshold_unmask(logits, x, MASK, gamma, step, spb, temp, seed, block, None, counts, done,
                                            None)
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
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_mixed_rows_equal_cpu_rows(dtype, gen):
    """Per-row parameters: the CUDA call gives the CPU call's bits (x, counts, done, logprob up to the sum's
    rounding order: the tokens and commits match unless a confidence is within rounding of gamma or a tie)."""
    B, S, V = 9, 16, 32003
    logits = make_logits("random", B, S, V, dtype, gen)
    x = random_state(B, S, gen, done_rows=(4,))
    params = mixed_params(B, S, gen)
    last = {**params, "step": params["steps_per_block"] - 1}
    cpu, gpu = run_op(logits, x, last, "cpu"), run_op(logits, x, last, "cuda")
    assert_same(cpu[:3], gpu[:3], "last step: cpu vs cuda")
    tol = 20 * tolerance(torch.float32)
    torch.testing.assert_close(gpu[3], cpu[3], rtol=tol, atol=tol)


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
    with pytest.raises(ValueError, match="step must be in .* got 16 at row 0 .*DEBUG"):
        tt.threshold_unmask(logits.cuda(), x.cuda(), MASK, 0.5, torch.tensor([16], device="cuda"), 16)


@pytest.mark.cuda
def test_cuda_bad_row_values_leave_the_row_untouched(monkeypatch, gen):
    """A row with a bad step, steps_per_block, gamma or temperature: x and logprob untouched, counts -1, done
    false; the other rows as alone; kept out of range is clamped. The debug mode names the argument and row."""
    B, S, V = 7, 8, 700
    logits = make_logits("random", B, S, V, torch.float32, gen)
    x = torch.full((B, S), MASK)
    params = {"gamma": torch.full((B,), 0.5), "step": torch.zeros(B, dtype=torch.int32),
              "steps_per_block": torch.full((B,), 4, dtype=torch.int32), "temperature": torch.zeros(B),
              "seed": torch.arange(B), "block": torch.zeros(B, dtype=torch.int64),
              "kept": torch.full((B,), S, dtype=torch.int32)}
    params["step"][1] = 4
    params["steps_per_block"][2] = 0
    params["gamma"][3] = 1.5
    params["temperature"][4] = math.nan
    params["temperature"][5] = -1.0
    params["kept"][6] = S + 3
    got = run_op(logits, x, params, "cuda")
    for b in range(1, 6):
        assert torch.equal(got[0][b], x[b]) and (got[3][b] == SENTINEL).all(), f"row {b} touched"
        assert int(got[1][b]) == -1 and not bool(got[2][b])
    for b in (0, 6):
        alone = run_op(logits[b:b + 1], x[b:b + 1], {**rows_of(params, slice(b, b + 1)), "kept": S}, "cuda")
        assert_same(alone, tuple(t[b:b + 1] for t in got), f"row {b}")
    monkeypatch.setenv("TWOTOWER_UNMASK_DEBUG", "1")
    with pytest.raises(ValueError, match="step must be in .* at row 1 .*DEBUG"):
        run_op(logits, x, params, "cuda")
    with pytest.raises(ValueError, match="kept must be in .* at row 6 .*DEBUG"):
        run_op(logits, x, {**params, **rows_of(params, [0] * B), "kept": params["kept"]}, "cuda")


@pytest.mark.cuda
def test_cuda_device_mix_is_refused():
    with pytest.raises(RuntimeError, match="x and logits must be on the same device"):
        torch.ops.twotower.threshold_unmask(*op_args(x=torch.full((2, 4), MASK, device="cuda")).values())
    for name in ("gamma", "step", "steps_per_block", "temperature", "seed", "block", "kept"):
        a = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in op_args(kept=i32(4)).items()}
        a[name] = a[name].cpu()
        with pytest.raises(RuntimeError, match=f"{name} and logits must be on the same device"):
            torch.ops.twotower.threshold_unmask(*a.values())


@pytest.mark.cuda
def test_cuda_graph_replays_every_step_with_new_row_values(gen):
    """One captured step replayed with new logits and per-row values (step, temperature, seed, block, gamma): a
    whole block decode of rows with their own parameters, each replay equal to the eager call."""
    B, S, V, spb = 3, 16, 32000, 16
    dev = "cuda"
    logits = torch.empty(B, S, V, device=dev)
    x = torch.full((B, S), MASK, device=dev)
    rows = {"gamma": torch.zeros(B, device=dev), "step": torch.zeros(B, dtype=torch.int32, device=dev),
            "steps_per_block": torch.full((B,), spb, dtype=torch.int32, device=dev),
            "temperature": torch.zeros(B, device=dev), "seed": torch.zeros(B, dtype=torch.int64, device=dev),
            "block": torch.zeros(B, dtype=torch.int64, device=dev), "kept": torch.full((B,), S, dtype=torch.int32,
                                                                                      device=dev)}
    counts = torch.empty(B, dtype=torch.int32, device=dev)
    done = torch.empty(B, dtype=torch.bool, device=dev)
    lp = torch.zeros(B, S, device=dev)
    args = (logits, x, MASK, *rows.values(), counts, done, lp)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                     # warm-up outside capture, then restore the state
        torch.ops.twotower.threshold_unmask(*args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.twotower.threshold_unmask(*args)
    x.fill_(MASK)
    x_ref = torch.full((B, S), MASK)
    for i in range(spb):
        new = make_logits("random", B, S, V, torch.float32, gen)
        logits.copy_(new)
        vals = mixed_params(B, S, gen)
        vals["steps_per_block"].fill_(spb)
        vals["step"].fill_(i)
        vals["kept"].fill_(S)
        for k, v in vals.items():
            rows[k].copy_(v)
        graph.replay()
        want = run_op(new, x_ref, vals, "cuda")
        assert_same((x.cpu(), counts.cpu(), done.cpu()), want[:3], f"replay {i}")
        x_ref = want[0]
        if bool(want[2].all()):
            break
    assert not (x_ref == MASK).any()
