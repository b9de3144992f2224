"""Quality of quantised routed experts (fp8 / int4) against the unquantised model in the same dtype.

  python -m bench.bench_quant_quality [--prompts 32] [--prompt-len 64] [--new-tokens 64] [--width 0.0625]

Two models: the shipped one (trained) and a random-weight model of the real layer pattern (all 52 layers of
models/config.REAL_PATTERN at `--width` of the real widths, bf16 checkpoint, the shipped tokenizer's
vocabulary). Each is loaded three times (experts=None, "fp8", "int4", same dtype) and all three decode the same
held-out prompts (bench_quality.heldout_prompts) greedily, in one batch, with no EOS stop, in AR mode and in
diffusion at gamma 0.8 (blocks of 16, up to 16 passes each). Per quantised model and mode, against the
unquantised model's continuation in the same mode:
  first_div_mean / first_div_median   position of the first generated token that differs (a continuation with no
               difference counts as its length, new_tokens)
  identical    share of generated positions equal to the unquantised model's token at that position
  ll           mean log-likelihood per held-out token (nats) of the prompt windows' own text (each prompt's tokens
               after the first and the next 16 held-out tokens) under the model's context tower
               (bench_quality.ar_loglik); ll_ratio = exp(ll - ll_unquantised), the ratio of geometric-mean
               probabilities the model gives real text (1 = no loss)
  top1_tf, kl  teacher forced on the same held-out text: the share of positions where the model's most likely
               next token is the unquantised model's, and the mean KL(unquantised || this) of the next-token
               distributions (nats): per-position measures that one early flip cannot cascade through
  tokens_per_nfe  generated tokens per denoiser pass (diffusion rows); tokens_per_s: the batch on this machine
Writes bench/results/quant_quality.{md,json}.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

from . import harness
from .bench_quality import ar_loglik, heldout_prompts

COLUMNS = ["model", "experts", "mode", "gamma", "first_div_mean", "first_div_median", "identical", "ll",
           "ll_ratio", "top1_tf", "kl", "tokens_per_nfe", "tokens_per_s"]
FORMATS = (None, "fp8", "int4")
SETTINGS = (("ar", None), ("diffusion", 0.8))


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first position where a and b differ (min length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(new: list[list[int]], ref: list[list[int]]) -> dict:
    """first_div_mean / median and identical (share of equal positions) of continuations `new` vs `ref`."""
    firsts = [first_divergence(n, r) for n, r in zip(new, ref)]
    same = sum(sum(x == y for x, y in zip(n, r)) for n, r in zip(new, ref))
    return {"first_div_mean": statistics.mean(firsts), "first_div_median": statistics.median(firsts),
            "identical": same / sum(len(r) for r in ref)}


@torch.no_grad()
def next_token_logprobs(lm, windows) -> list[torch.Tensor]:
    """Per window (head, text): the context tower's next-token log-probabilities [len(text), V] (fp32, CPU)
    at the positions that predict text, the same forward as bench_quality.ar_loglik."""
    from twotower_ext.train.model import context_forward

    out = []
    for head, text in windows:
        ids = torch.tensor([head + text[:-1]], device=lm.model.ctx_device)
        logits = context_forward(lm.model.weights, lm.config, ids)[0].float().cpu()
        out.append(torch.log_softmax(logits[len(head) - 1:], dim=-1))
    return out


def random_model(path: str, width: float, vocab: int, tokenizer: str) -> str:
    """A random bf16 checkpoint of the real 52-layer pattern at `width`, with the shipped tokenizer."""
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    random_checkpoint(path, scaled_config(width, vocab=vocab), seed=0, dtype=torch.bfloat16)
    shutil.copy(tokenizer, os.path.join(path, "tokenizer.json"))
    return path


def evaluate(name: str, path: str, dtype: str, prompts, new_tokens: int, log=print) -> list[dict]:
    import twotower_ext as tt

    windows = [(p[:1], p[1:] + ref) for p, ref, _ in prompts]   # the held-out text the ll is measured on
    ids = [p for p, _, _ in prompts]
    rows, base = [], {}
    for fmt in FORMATS:
        lm = tt.load(path, dtype=dtype, experts=fmt)
        lm.generate(ids[:2], mode="diffusion", max_new_tokens=16)   # warm-up
        lls = [x for head, text in windows for x in ar_loglik(lm, head, text)]
        ll = sum(lls) / len(lls)
        logp = torch.cat(next_token_logprobs(lm, windows))
        if fmt is None:
            logp0 = logp
        tf = {"top1_tf": (logp.argmax(-1) == logp0.argmax(-1)).double().mean().item(),
              "kl": (logp0.exp() * (logp0 - logp)).sum(-1).mean().item()}
        for mode, gamma in SETTINGS:
            out = {}

            def gen():
                out["res"] = lm.generate(ids, mode=mode, max_new_tokens=new_tokens, threshold=gamma or 0.8,
                                         eos_token_id=None)
            t = harness.time_calls(gen, 1)
            res = out["res"]
            new = res.new_tokens
            tokens = sum(map(len, new))
            nfe = sum(sum(b) for b in res.nfe_per_block) if mode == "diffusion" else tokens
            row = {"model": name, "experts": fmt or f"{dtype} (unquantised)", "mode": mode,
                   "gamma": "-" if gamma is None else gamma, "ll": ll, **tf, "tokens_per_nfe": tokens / nfe,
                   "tokens_per_s": tokens / t.median_s, **harness.load_fields(t)}
            if fmt is None:
                base[mode] = (new, ll)
                row.update(first_div_mean="-", first_div_median="-", identical=1.0, ll_ratio=1.0)
            else:
                ref, ll0 = base[mode]
                row.update(agreement(new, ref), ll_ratio=math.exp(ll - ll0))
            rows.append(row)
            log(f"  {name} {row['experts']:>18s} {mode:9s}: first divergence {row['first_div_mean']!s:.5s} "
                f"(median {row['first_div_median']}), identical {row['identical']:.3f}, ll_ratio "
                f"{row['ll_ratio']:.4f}, top1_tf {row['top1_tf']:.3f}, {row['tokens_per_nfe']:.2f} tokens/pass")
        del lm
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_quant_quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--width", type=float, default=0.0625, help="random model's width relative to the real one")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="results directory (default bench/results)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--allow-busy", action="store_true", help="save even if other processes used the CPU (marked busy)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import twotower_ext as tt

    shipped = tt.default_model_path()
    if shipped is None:
        print("bench_quant_quality: this installation ships no default model", file=sys.stderr)
        return 2
    lm = tt.load(shipped)
    prompts = heldout_prompts(lm, a.prompts, a.prompt_len)
    vocab = lm.config.vocab_size
    del lm
    t0 = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    rows = evaluate("shipped", shipped, a.dtype, prompts, a.new_tokens, log)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_model(os.path.join(tmp, "random"), a.width, vocab, os.path.join(shipped, "tokenizer.json"))
        name = f"random real pattern, width {a.width:g}"
        rows += evaluate(name, path, a.dtype, prompts, a.new_tokens, log)
    title = (f"quantised routed experts vs unquantised ({len(prompts)} held-out prompts x {a.new_tokens} tokens, "
             f"greedy, one batch, {a.dtype}, {a.threads} thread(s))")
    harness.print_table(title, rows, COLUMNS)
    if not a.no_save:
        extra = {"prompts": len(prompts), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "dtype": a.dtype,
                 "width": a.width, "seconds": time.perf_counter() - t0}
        out = harness.write_results("quant_quality", title, rows, COLUMNS, extra, out_dir=a.out,
                                     allow_busy=a.allow_busy or None)
        print(f"(written to {out}/quant_quality.md/.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
