"""`twotower` command line: generate text (streamed per block) or describe a checkpoint.

  twotower generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--mode --threshold --block-size
                    --steps --temperature --max-new-tokens --seed --device --dtype --reference-compat]
  twotower info --model DIR [--roofline [--device h100|h200|cpu]] | --roofline --real-config
"""
from __future__ import annotations

import argparse
import sys


def _default_model() -> str:
    from . import default_model_path

    path = default_model_path()
    if path is None:
        raise SystemExit("twotower: no --model given and this installation ships no default model")
    return path


def _cmd_generate(a) -> int:
    import torch

    from .api import load

    lm = load(a.model or _default_model(), device=a.device, dtype=a.dtype)
    if a.threads:
        torch.set_num_threads(a.threads)
    elif a.device == "cpu" and lm.config.hidden_size < 1024:
        # Small models: each op is microseconds, so thread hand-offs cost more than they save (and on a
        # busy machine a waiting OpenMP thread can stall every op by a scheduler tick).
        torch.set_num_threads(1)
    if a.prompt_ids is not None:
        try:
            prompt = [int(v) for v in a.prompt_ids.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"twotower: --prompt-ids must be comma-separated integers, got {a.prompt_ids!r}") from None
        as_text = lm.tokenizer is not None
    else:
        if lm.tokenizer is None:
            raise SystemExit("twotower: this checkpoint has no tokenizer.json; use --prompt-ids")
        prompt, as_text = lm.encode(a.prompt), True
    shown = [0]
    out = sys.stdout

    def stream(ev):   # print what was committed since the last event
        seq = ev["sequences"][0]
        new = seq[len(prompt) + shown[0]:]
        shown[0] += len(new)
        out.write(lm.decode(new) if as_text else "".join(f" {t}" for t in new))
        out.flush()

    if as_text:
        out.write(lm.decode(prompt))
    res = lm.generate(prompt, mode=a.mode, max_new_tokens=a.max_new_tokens, block_size=a.block_size,
                      steps_per_block=a.steps, threshold=a.threshold, temperature=a.temperature, seed=a.seed,
                      reference_compat=a.reference_compat, callback=stream)
    s = res.stats
    dev = torch.device(a.device)
    print(f"\n[{s['mode']}] {s['tokens']} tokens, {s['nfe']} NFE ({s['tokens_per_nfe']:.2f} tokens/NFE), "
          f"{s['seconds']:.2f} s, {s['tokens_per_s']:.1f} tokens/s on {dev}", file=sys.stderr)
    return 0


def _cmd_info(a) -> int:
    if a.roofline or a.real_config:
        from .costmodel import print_roofline
        return print_roofline(a)
    from .models import NemotronHConfig
    from .models.cache import cache_row_bytes

    path = a.model or _default_model()
    cfg = NemotronHConfig.from_json(path)
    kinds = cfg.layer_kinds
    print(f"checkpoint: {path}")
    rows = [("hidden_size", cfg.hidden_size), ("layers", f"{cfg.num_hidden_layers} ({cfg.hybrid_override_pattern})"),
            ("mamba / attention / moe layers", f"{kinds.count('mamba')} / {kinds.count('attention')} / {kinds.count('moe')}"),
            ("attention heads (q / kv) x dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} x {cfg.head_dim}"),
            ("mamba heads x dim, state, groups", f"{cfg.mamba_num_heads} x {cfg.mamba_head_dim}, {cfg.ssm_state_size}, {cfg.n_groups}"),
            ("experts (routed, top-k, shared)", f"{cfg.n_routed_experts}, {cfg.num_experts_per_tok}, 1"),
            ("vocab", cfg.vocab_size)]
    params = _param_counts(path)
    rows += [(f"parameters: {k}", f"{v / 1e6:.2f} M") for k, v in params.items()]
    for dtype, elt in (("bf16", 2), ("fp32", 4)):
        kv, mamba = cache_row_bytes(cfg, elt)
        rows.append((f"cache per row ({dtype})", f"{kv / 1024:.2f} KiB/token KV + {mamba / 2**20:.2f} MiB Mamba state"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    return 0


def _param_counts(path: str) -> dict:
    from .models.weights import checkpoint_index

    counts = {"context tower": 0, "denoiser tower": 0, "heads + time conditioning": 0}
    for name, (_, info) in checkpoint_index(path).items():
        n = 1
        for d in info.shape:
            n *= d
        key = ("context tower" if name.startswith("context_tower.") else
               "denoiser tower" if name.startswith("denoiser_tower.") else "heads + time conditioning")
        counts[key] += n
    counts["total"] = sum(counts.values())
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="twotower", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a continuation, streamed block by block")
    g.add_argument("--model", help="checkpoint directory (default: the model shipped with the package)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="def ", help="prompt text (needs the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--mode", default="diffusion", choices=["diffusion", "mock_ar", "ar"])
    g.add_argument("--threshold", type=float, default=0.8, help="confidence gamma (default 0.8)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--steps", type=int, default=16, help="denoiser steps per block at most")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: 1 for small models, else torch's default)")
    g.add_argument("--reference-compat", action="store_true", help="NVIDIA reference semantics")
    g.set_defaults(fn=_cmd_generate)
    i = sub.add_parser("info", help="print a checkpoint's config, parameter counts and cache sizes")
    i.add_argument("--model", help="checkpoint directory (default: the shipped model)")
    from .costmodel import add_info_arguments
    add_info_arguments(i)
    i.set_defaults(fn=_cmd_info)
    from .serve.cli import add_parser as add_serve_parser   # twotower serve (its options: serve/cli.py)
    add_serve_parser(sub)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError, MemoryError) as e:
        print(f"twotower: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
