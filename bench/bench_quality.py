"""Speed / quality curve of block diffusion against AR on held-out text (the paper's trade-off in miniature).

  python -m bench.bench_quality [--model DIR] [--prompts 32] [--prompt-len 64] [--new-tokens 64]

For each held-out prompt (windows of the standard library files the training split left out, chosen by a
fixed seed) it generates greedily with AR (context tower + context_lm_head, one token per pass) and with
mask diffusion at gamma in {0.5, 0.7, 0.8, 0.9, 0.95} (blocks of 16, up to 16 denoiser passes each), one
prompt at a time, and reports:
  tokens/NFE   generated tokens per forward pass (AR: 1; diffusion: per denoiser pass)
  tokens/s     on this machine, batch 1 (context prefill + extension included)
  ll           the AR model's mean log-likelihood per generated token (nats), and ll_ratio =
               exp(ll - ll_AR): the ratio of geometric-mean token probabilities (AR = 1)
  match16      exact-match accuracy of the first 16 generated tokens against the held-out text, and
               match_ratio = match16 / match16_AR
  agree16, agree_all  agreement with AR greedy decoding: the share of positions equal to the AR model's own
               greedy continuation over the first 16 generated tokens and over the whole continuation
  speed_vs_ar  tokens/s relative to AR's on the same prompts
  ar_chain     what the AR tower's own confidence allows (diffusion rows): tokens per pass if every pass
               committed the AR model's greedy token at the first open position of the block and then each
               following one while the AR probability of that token stays above gamma - a denoiser exactly as
               sure as the AR model given all earlier tokens (an optimistic reference: a real pass predicts the
               later positions without the earlier ones)
Writes bench/results/quality.{md,json} and, when matplotlib is installed, quality.png.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import harness

GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95)
COLUMNS = ["mode", "gamma", "tokens", "nfe", "tokens_per_nfe", "tokens_per_s", "speed_vs_ar", "ll", "ll_ratio",
           "match16", "match_ratio", "agree16", "agree_all", "ar_chain"]
BLOCK = 16
REF_TOKENS = 16


def heldout_prompts(lm, n: int, prompt_len: int, seed: int = 0) -> list[tuple[list[int], list[int], str]]:
    """n (prompt ids, next REF_TOKENS held-out ids, file) windows from the held-out split, tokenised with
    the model's tokenizer; windows start at the beginning of a line."""
    from twotower_ext.train.data import EOS, read_texts

    files = [(rel, lm.encode(text) + [EOS]) for rel, text in read_texts("heldout")]
    files = [(rel, ids) for rel, ids in files if len(ids) > prompt_len + REF_TOKENS + 1]
    if not files:
        raise SystemExit("bench_quality: no held-out file is long enough for the prompt length")
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        rel, ids = files[int(torch.randint(len(files), (1,), generator=g))]
        s = int(torch.randint(1, len(ids) - prompt_len - REF_TOKENS, (1,), generator=g))
        if not lm.decode(ids[s - 1:s]).endswith("\n"):   # start on a line boundary
            continue
        out.append((ids[s:s + prompt_len], ids[s + prompt_len:s + prompt_len + REF_TOKENS], rel))
    return out


@torch.no_grad()
def ar_loglik(lm, prompt: list[int], cont: list[int]) -> list[float]:
    """Log-probabilities of cont given prompt under the context tower (context_lm_head), from one causal
    pass (the training forward over the inference model's own weights; the two are tested equal)."""
    from twotower_ext.train.model import context_forward

    if not cont:
        return []
    ids = torch.tensor([prompt + cont])
    logits = context_forward(lm.model.weights, lm.config, ids[:, :-1].to(lm.model.ctx_device))[0].float().cpu()
    logp = torch.log_softmax(logits[len(prompt) - 1:], dim=-1)
    return logp.gather(1, torch.tensor(cont)[:, None]).squeeze(1).tolist()


def chain_passes(probs: list[float], gamma: float, block: int = BLOCK) -> int:
    """Passes a left-to-right chain decoder needs for these greedy tokens (AR probabilities `probs`): each pass
    commits the first open token of the block, then the next ones while their probability exceeds gamma."""
    passes = 0
    for b0 in range(0, len(probs), block):
        i, end = b0, min(b0 + block, len(probs))
        while i < end:
            passes += 1
            i += 1
            while i < end and probs[i] > gamma:
                i += 1
    return passes


def evaluate(lm, prompts, new_tokens: int, gammas=GAMMAS, log=print) -> list[dict]:
    settings = [("ar", None)] + [("diffusion", g) for g in gammas]
    lm.generate(prompts[0][0], mode="ar", max_new_tokens=4)                 # warm-up
    lm.generate(prompts[0][0], mode="diffusion", max_new_tokens=16)
    rows = []
    ar_probs = []  # per prompt: the AR model's probability of each of its own greedy tokens
    ar_new = []    # per prompt: the AR model's greedy continuation
    for mode, gamma in settings:
        tokens = nfe = 0
        seconds, lls, matches, samples, agree16, agree_all = 0.0, [], [], [], [], []
        for i, (prompt, ref, rel) in enumerate(prompts):
            res = lm.generate(prompt, mode=mode, max_new_tokens=new_tokens, threshold=gamma or 0.8)
            new = res.new_tokens[0]
            tokens += res.stats["tokens"]
            nfe += res.stats["nfe"]
            seconds += res.stats["seconds"]
            ll = ar_loglik(lm, prompt, new)
            lls += ll
            if mode == "ar":
                ar_probs.append([math.exp(x) for x in ll])
                ar_new.append(new)
            greedy = ar_new[i]
            agree16.append(sum(a == b for a, b in zip(new[:REF_TOKENS], greedy)) / max(1, min(REF_TOKENS, len(greedy))))
            agree_all.append(sum(a == b for a, b in zip(new, greedy)) / max(1, len(greedy)))
            matches.append(sum(a == b for a, b in zip(new[:REF_TOKENS], ref)) / REF_TOKENS)
            if len(samples) < 3:
                samples.append({"file": rel, "prompt": lm.decode(prompt), "generated": lm.decode(new),
                                "nfe_per_block": res.nfe_per_block[0]})
        row = {"mode": mode, "gamma": "-" if gamma is None else gamma, "tokens": tokens, "nfe": nfe,
               "tokens_per_nfe": tokens / nfe, "tokens_per_s": tokens / seconds,
               "ll": sum(lls) / len(lls), "match16": sum(matches) / len(matches), "samples": samples,
               "agree16": sum(agree16) / len(agree16), "agree_all": sum(agree_all) / len(agree_all),
               "ar_chain": "-" if gamma is None else
               sum(map(len, ar_probs)) / sum(chain_passes(pr, gamma) for pr in ar_probs)}
        rows.append(row)
        log(f"  {mode:9s} gamma {row['gamma']!s:4s}: {row['tokens_per_nfe']:.2f} tokens/NFE, "
            f"{row['tokens_per_s']:.0f} tokens/s, ll {row['ll']:.3f}, match16 {row['match16']:.3f}, "
            f"agree16 {row['agree16']:.3f}")
    ar = rows[0]
    for r in rows:
        r["ll_ratio"] = math.exp(r["ll"] - ar["ll"])
        r["match_ratio"] = r["match16"] / ar["match16"] if ar["match16"] else float("nan")
        r["speed_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
    return rows


def plot(rows: list[dict], path: str) -> bool:
    plt = harness.pyplot()
    if plt is None:
        return False
    diff = [r for r in rows if r["mode"] == "diffusion"]
    ar = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x in zip(axes, ("tokens_per_nfe", "tokens_per_s")):
        for key, label, marker in (("ll_ratio", "AR log-likelihood (ratio of geo-mean prob.)", "o"),
                                   ("match_ratio", "exact match of next 16 tokens", "s")):
            ax.plot([r[x] for r in diff], [r[key] for r in diff], marker=marker, label=label)
            for r in diff:
                ax.annotate(f"{r['gamma']}", (r[x], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.scatter([ar[x]], [1.0], color="black", zorder=3, label="AR")
        if x == "tokens_per_nfe":  # where a denoiser as sure as the AR tower would sit (ar_chain, AR quality)
            ax.scatter([r["ar_chain"] for r in diff], [1.0] * len(diff), marker="x", color="gray", zorder=3,
                       label="ar_chain: a denoiser as sure as the AR model")
            for r in diff:
                ax.annotate(f"{r['gamma']}", (r["ar_chain"], 1.0), textcoords="offset points", xytext=(2, -10),
                            fontsize=7, color="gray")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set_xlabel({"tokens_per_nfe": "tokens per forward pass (NFE)", "tokens_per_s": "tokens/s (CPU, batch 1)"}[x])
        ax.set_ylabel("quality relative to AR")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("block diffusion (gamma labelled) vs AR, held-out stdlib code")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the package's shipped model)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results directory (default bench/results)")
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import twotower_ext as tt

    path = a.model or tt.default_model_path()
    if path is None:
        print("bench_quality: no --model and no shipped default model", file=sys.stderr)
        return 2
    lm = tt.load(path, dtype=a.dtype)
    if lm.tokenizer is None:
        print(f"bench_quality: {path} has no tokenizer.json (or `tokenizers` is not installed)", file=sys.stderr)
        return 2
    prompts = heldout_prompts(lm, a.prompts, a.prompt_len, a.seed)
    print(f"{len(prompts)} held-out prompts of {a.prompt_len} tokens, {a.new_tokens} new tokens each, "
          f"model {path}", file=sys.stderr)
    t0 = time.perf_counter()
    rows = evaluate(lm, prompts, a.new_tokens, log=lambda m: print(m, file=sys.stderr))
    title = (f"quality vs speed: block diffusion vs AR ({len(prompts)} held-out prompts x {a.new_tokens} "
             f"tokens, greedy, batch 1, {a.dtype}, {a.threads} thread(s))")
    harness.print_table(title, rows, COLUMNS)
    if not a.no_save:
        extra = {"model": os.path.abspath(path), "prompts": len(prompts), "prompt_len": a.prompt_len,
                 "new_tokens": a.new_tokens, "dtype": a.dtype, "seconds": time.perf_counter() - t0}
        out = harness.write_results("quality", title, rows, COLUMNS, extra, out_dir=a.out)
        if plot(rows, os.path.join(out, "quality.png")):
            print(f"(plot written to {out}/quality.png)")
        print(f"(written to {out}/quality.md/.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
