"""Mutation check: does the test suite catch small semantic bugs? Not part of CI (it runs pytest once per mutation).

    TWOTOWER_EXT_LIB=build/dev/_C.abi3.so python tools/mutate.py [--only NAME ...] [--list] [--no-baseline]

Each mutation is one exact text replacement in the Python sources, applied to a temporary COPY of python/ and
tests/ (the working tree is never touched); then the tests named for it run on the copy. "caught" = those tests
fail. Every pattern is looked up before anything runs: one that no longer occurs exactly once in the source
(someone rewrote the line) stops the run with its name, so an edit cannot silently retire a mutation; update the
pattern to the new code instead. The unmutated copy must pass the same tests first (--no-baseline skips that).
Run it before closing any issue that touches semantics and paste the table into the note; every mutation listed
must be caught. The C++/CUDA kernels are not mutated here (a rebuild per mutation); the tests judge them against
tests/oracle.py directly.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "python/twotower_ext/"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str          # relative to the repository root
    old: str           # must occur exactly once in the file
    new: str
    tests: tuple       # pytest arguments (files and -k expressions) that must fail


def M(name, file, old, new, *tests):
    return Mutation(name, PKG + file, old, new, tests)


MUTATIONS = [
    # --- router / layers
    M("route: stable argsort instead of torch.topk", "reference.py",
      "idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]",
      "idx = torch.argsort(choice, dim=-1, descending=True, stable=True)[:, :k]",
      "tests/test_moe_router.py", "tests/test_model.py", "-k", "route or tie"),
    M("route: no renormalisation of the top-k weights", "reference.py",
      "    if norm_topk_prob:\n        weights = weights /", "    if False:\n        weights = weights /",
      "tests/test_moe_router.py"),
    M("rms_norm: normalise in the input dtype (no fp32 cast)", "reference.py",
      "    xf = x.float()\n    xf = xf * torch.rsqrt", "    xf = x\n    xf = xf * torch.rsqrt",
      "tests/test_norm.py", "tests/test_model.py", "-k", "rms_norm or bitwise"),
    M("add_rms_norm: the residual's gate ignored", "reference.py",
      "    if gate is not None:\n        add = (add.reshape", "    if False:\n        add = (add.reshape",
      "tests/test_norm.py"),
    M("gated_rms_norm: no SiLU on z", "reference.py",
      "    g = y.float() * F.silu(z.float())", "    g = y.float() * z.float()",
      "tests/test_norm.py"),
    M("moe: weights of 1 instead of the router weights", "models/layers.py",
      "(experts or ops.moe_experts)(x, idx, weights, w.up, w.down)",
      "(experts or ops.moe_experts)(x, idx, torch.ones_like(weights), w.up, w.down)",
      "tests/test_model.py", "-k", "moe"),
    M("time_modulation: t not scaled by 1000", "models/layers.py",
      "t = t.to(dtype) * 1000", "t = t.to(dtype)",
      "tests/test_model.py", "-k", "time_modulation"),
    # --- the tower's use of the ops
    M("denoiser: ctx_lens one short", "models/towers.py",
      "return self._denoiser_pass(x, r, mod, r.take(st.lens),", "return self._denoiser_pass(x, r, mod, r.take(st.lens) - 1,",
      "tests/test_model.py", "-k", "denoiser_steps"),
    M("mock-AR: ctx_lens without the snapshot offset", "models/towers.py",
      "ctx_lens = r.take(st.lens) - 1", "ctx_lens = r.take(st.lens)",
      "tests/test_model.py", "-k", "mock_ar"),
    M("context tower: Mamba states not written back", "models/towers.py",
      "write_state=True", "write_state=False",
      "tests/test_model.py", "-k", "greedy_ar or extension"),
    # --- the decode core
    M("sampler: the excluded id can be drawn (mock-AR's mask id)", "runtime/sampler.py",
      "ops.threshold_unmask(logits[:, None], x, exclude,", "ops.threshold_unmask(logits[:, None], x.fill_(-1), -1,",
      "tests/test_engine.py", "-k", "sampling_frequencies"),
    M("sampler: every token index draws the same noise", "runtime/sampler.py",
      "gamma, step, steps, temperature, seed, index, kept,", "gamma, step, steps, temperature, seed, 0, kept,",
      "tests/test_engine.py", "-k", "sampling_frequencies"),
    M("policy: EOS cut before the EOS instead of after it", "runtime/policy.py",
      "keep = keep[:at + 1]", "keep = keep[:at]",
      "tests/test_engine.py", "-k", "eos_truncates"),
    M("runner: per-row t in reference_compat (not the batch mean)", "runtime/runner.py",
      "        if g.compat:   # NVIDIA's reference", "        if False:   # NVIDIA's reference",
      "tests/test_engine.py", "-k", "compat_mode"),
    M("policy: a partial last block keeps its surplus", "runtime/policy.py",
      "keep = [int(t) for t in out.tokens[j][:min(out.tokens.shape[1], r.remaining)]]",
      "keep = [int(t) for t in out.tokens[j]]",
      "tests/test_engine.py", "-k", "partial_last_block"),
    # (zeroing other groups' block tokens alone is no bug to plant: kept = 0 already makes those rows commit nothing)
    M("runner: other groups' rows in a padded bucket advance their step", "runtime/runner.py",
      "live = open_before if member is None else open_before & member", "live = open_before",
      "tests/test_graphs_cpu.py", "-k", "serving_core or padded_bucket_over"),
    # --- quant.py (the quantised formats' definition), judged by the round-trip bounds and by the kernel's
    #     dequantisation bit for bit (the C++ dequantisers are not mutated here; ten hand mutations of
    #     csrc/moe/moe_dequant_cpu.cpp -- nibble order, last group's scale, NaN patch, rounding, tables -- were
    #     all caught by test_quant.py -k "bit_identical or nan" when the issue-16 kernel landed)
    M("quant int4: high nibble first (odd k in the low nibble)", "quant.py",
      "torch.stack([lo, hi], dim=-1)", "torch.stack([hi, lo], dim=-1)",
      "tests/test_quant.py", "-k", "bit_identical or round_trip"),
    M("quant int4: scales aligned to the end (the short last group's scale shifted)", "quant.py",
      "repeat_interleave(q.group, dim=-1)[..., :q.k]", "repeat_interleave(q.group, dim=-1)[..., -q.k:]",
      "tests/test_quant.py", "-k", "bit_identical or round_trip"),
    M("quant int4: quantiser truncates instead of rounding to nearest", "quant.py",
      "qi = torch.round(wg / scale.float()[..., None])", "qi = torch.trunc(wg / scale.float()[..., None])",
      "tests/test_quant.py", "-k", "round_trip"),
    # --- reference.py (the fallback and the clarity baseline), judged by tests/oracle.py
    M("reference attention: V of the block from k_blk", "reference.py",
      "v = torch.cat([v_ctx[b, :n], v_blk[b]], dim=0)", "v = torch.cat([v_ctx[b, :n], k_blk[b]], dim=0)",
      "tests/test_block_attention.py", "-k", "reference_matches_oracle"),
    M("reference attention: one context key too many (ctx_lens off by one)", "reference.py",
      "        n = int(ctx_lens[b])\n        k = torch.cat", "        n = int(ctx_lens[b]) + 1\n        k = torch.cat",
      "tests/test_block_attention.py", "-k", "reference_matches_oracle"),
    M("reference attention: softmax without max subtraction", "reference.py",
      "        lse = torch.logsumexp(s, dim=-1)\n", "        lse = torch.log(torch.exp(s).sum(-1))\n",
      "tests/test_block_attention.py", "-k", "thousands"),
    M("reference merge: no max subtraction", "reference.py",
      "m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)", "m_safe = torch.zeros_like(m)",
      "tests/test_merge_state.py", "-k", "large_lse"),
    M("reference scan: seq_lens ignored", "reference.py",
      "live = (t < lens).view(B, 1, 1, 1)", "live = (t < torch.full_like(lens, L)).view(B, 1, 1, 1)",
      "tests/test_mamba_scan.py", "-k", "reference_matches_oracle"),
    M("reference scan: dt not clamped to the time-step limit", "reference.py",
      ".clamp(dt_min, dt_max)   # [B, L, H]", "   # [B, L, H]",
      "tests/test_mamba_scan.py", "-k", "reference_matches_oracle"),
    M("commit rule: conf >= gamma instead of >", "reference.py",
      "(masked & (conf > gamma))", "(masked & (conf >= gamma))",
      "tests/test_threshold_unmask.py", "-k", "gamma_never"),
    M("commit rule: floor n // left instead of ceil", "reference.py",
      "(n + left - 1) // left", "n // left",
      "tests/test_threshold_unmask.py", "-k", "golden or exact_ties or gamma_never"),
    # (The last-step "commit everything" branch and the floor's max(1, ...) are implied by ceil(n / steps left):
    # mutating them alone changes nothing, so they are not listed.)
    M("commit rule: confidences above gamma counted at committed positions too", "reference.py",
      "k = (masked & (conf > gamma)).sum(1)", "k = (conf > gamma).sum(1)",
      "tests/test_threshold_unmask.py", "-k", "matches_reference and random and 111"),
    M("commit rule: the k least confident instead of the most", "reference.py",
      "order = torch.sort(ranked, dim=1, descending=True, stable=True)", "order = torch.sort(ranked, dim=1, descending=False, stable=True)",
      "tests/test_threshold_unmask.py", "-k", "matches_reference and random and 111"),
    M("unmask: the mask id not excluded from the prediction", "reference.py",
      '    if mask_id >= 0:\n        l[..., mask_id] = float("-inf")\n', "",
      "tests/test_threshold_unmask.py", "-k", "special_values"),
    M("unmask sampling: logits * T instead of / T", "reference.py",
      "score = l[rows] / temperature[rows]", "score = l[rows] * temperature[rows]",
      "tests/test_threshold_unmask.py", "-k", "sampling_matches_reference and 111"),
    M("unmask sampling: the row's slot in the Philox counter", "reference.py",
      "c1 = torch.arange(seq, **i64).view(1, seq, 1).expand(shape)",
      "c1 = (torch.arange(seq, **i64).view(1, seq, 1) | (torch.arange(batch, **i64).view(batch, 1, 1) << 6)).expand(shape)",
      "tests/test_threshold_unmask.py", "-k", "mask_id_minus_one"),
    M("unmask kept: counts and done over every position", "reference.py",
      "in_kept = torch.arange(S, device=dev) < kept.unsqueeze(1)", "in_kept = torch.ones_like(masked)",
      "tests/test_threshold_unmask.py", "-k", "per_row_parameters and 16"),
    M("unmask logprob: written at every masked position", "reference.py",
      "out_logprob.copy_(torch.where(commit, logprob, out_logprob))",
      "out_logprob.copy_(torch.where(masked, logprob, out_logprob))",
      "tests/test_threshold_unmask.py", "-k", "logprob"),
]


def check_patterns(muts) -> list[str]:
    """Every mutation's pattern must occur exactly once in the current source; returns the problems."""
    bad = []
    for m in muts:
        with open(os.path.join(ROOT, m.file)) as f:
            n = f.read().count(m.old)
        if n != 1:
            bad.append(f"{m.name}: pattern occurs {n} times in {m.file} (want 1): {m.old!r}")
    return bad


def copy_tree(dst: str) -> None:
    for part in ("python", "tests"):
        shutil.copytree(os.path.join(ROOT, part), os.path.join(dst, part),
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), dst)


def run_tests(tree: str, tests, lib: str, timeout: int) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.join(tree, "python"), "TWOTOWER_EXT_LIB": lib,
           "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if p.returncode == 0:
        return "passed", dt
    if p.returncode == 1:
        return "failed", dt
    if p.returncode == 5:
        return "no tests ran", dt
    return f"error (pytest rc {p.returncode}): {p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ''}", dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run the mutations whose name contains one of these words")
    ap.add_argument("--list", action="store_true", help="list the mutations and check their patterns")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    args = ap.parse_args(argv)
    muts = [m for m in MUTATIONS if not args.only or any(w in m.name for w in args.only)]
    bad = check_patterns(muts)
    if bad:
        print("tools/mutate.py: patterns not found (the source changed; update these mutations):", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        return 2
    if args.list:
        for m in muts:
            print(f"{m.name}  [{m.file}]  -> {' '.join(m.tests)}")
        return 0
    lib = os.path.abspath(os.environ.get("TWOTOWER_EXT_LIB", os.path.join(ROOT, "build", "dev", "_C.abi3.so")))
    if not os.path.exists(lib):
        print(f"tools/mutate.py: no built library at {lib}; set TWOTOWER_EXT_LIB", file=sys.stderr)
        return 2
    rows, broken = [], []
    with tempfile.TemporaryDirectory(prefix="tt-mutate-") as tmp:
        if not args.no_baseline:
            selections = list(dict.fromkeys(m.tests for m in muts))
            base = os.path.join(tmp, "baseline")
            copy_tree(base)
            for sel in selections:
                res, dt = run_tests(base, sel, lib, args.timeout)
                print(f"baseline {' '.join(sel)}: {res} ({dt:.0f} s)", flush=True)
                if res != "passed":
                    broken.append(sel)
            if broken:
                print("tools/mutate.py: the unmutated tree fails these selections; fix them first:", file=sys.stderr)
                for sel in broken:
                    print("  " + " ".join(sel), file=sys.stderr)
                return 2
        for i, m in enumerate(muts):
            tree = os.path.join(tmp, f"m{i}")
            copy_tree(tree)
            path = os.path.join(tree, m.file)
            with open(path) as f:
                src = f.read()
            with open(path, "w") as f:
                f.write(src.replace(m.old, m.new, 1))
            res, dt = run_tests(tree, m.tests, lib, args.timeout)
            verdict = "caught" if res == "failed" else f"NOT CAUGHT ({res})"
            rows.append((m.name, m.file.replace(PKG, ""), " ".join(m.tests).replace("tests/", ""), verdict, f"{dt:.0f}"))
            print(f"[{i + 1}/{len(muts)}] {m.name}: {verdict} ({dt:.0f} s)", flush=True)
            shutil.rmtree(tree)
    print("\n| mutation | file | tests | result | s |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    missed = [r for r in rows if r[3] != "caught"]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
