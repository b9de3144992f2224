"""`twotower` command line: generate text (streamed block by block) or describe a checkpoint.

  twotower generate [--model DIR] [--prompt TEXT | --prompt-ids 1,2,3] [--mode ...] [options]
  twotower info [--model DIR | --real-config] [--roofline [--device h100|h200|cpu] [--experts bf16|fp8|int4]]
  twotower serve [--model DIR] [--host 127.0.0.1 --port 8000 --max-batch 16 --max-queue 64]

Without --model both use the small model shipped with the package (twotower_ext.default_model_path()).
The generate defaults are the API's (runtime.DecodeParams); run `twotower generate
--help` for each option. A bad argument prints one line `twotower: ...` and exits 2; Ctrl-C prints
`twotower: interrupted` and exits 130; a closed output pipe (`| head`) prints one line and exits 141.

Adding a subcommand: decorate its `run(args) -> int` with `@command(name, help, add_arguments)` here, or in
a module listed in COMMAND_MODULES (imported before the arguments are parsed).
"""
from __future__ import annotations

import argparse
import os
import sys

COMMAND_MODULES: list[str] = ["twotower_ext.serve.cli"]   # modules whose import registers more subcommands
COMMANDS: dict = {}               # name -> (help, add_arguments(parser), run(args) -> exit status)


def command(name: str, help: str, add_arguments):
    """Register subcommand `name`: add_arguments(parser) declares its options, the decorated function runs it."""
    def register(run):
        COMMANDS[name] = (help, add_arguments, run)
        return run
    return register


class CliError(Exception):
    """A bad argument found after parsing (e.g. against the loaded model); printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line instead of argparse's usage block + error
        self.exit(2, f"twotower: {message} (see `{self.prog} --help`)\n")


def int_at_least(lo: int, hi: int | None = None, shown: str | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo or (hi is not None and v >= hi):
            want = shown or (f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi})")
            raise argparse.ArgumentTypeError(f"expected {want}, got {s}")
        return v
    parse.__name__ = "int"
    return parse


def _token_ids(s: str) -> list[int]:
    try:
        ids = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer token ids, got {s!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {[v for v in ids if v < 0]}")
    return ids


def _model_path(a) -> str:
    from . import default_model_path

    if a.model is not None:
        return a.model
    path = default_model_path()
    if path is None:
        raise CliError("no --model given and this installation ships no default model")
    return path


def add_experts_argument(p: argparse.ArgumentParser) -> None:
    """--experts for every command that loads a model (the `experts=` of twotower_ext.load)."""
    p.add_argument("--experts", default="bf16", choices=["bf16", "fp8", "int4"], help="routed-expert storage: "
                   "bf16 = unquantised, in --dtype; fp8 (e4m3, per-channel scale) or int4 (groups of 128), "
                   "quantised while loading; `twotower info` shows the memory of each (default: %(default)s)")


# ------------------------------------------------------------------------------------------------- generate
def _generate_args(g: argparse.ArgumentParser) -> None:
    from .runtime import MODES, DecodeParams as D

    g.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the small model shipped with "
                   "the package, twotower_ext.default_model_path())")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="def ", help="prompt text, encoded with the checkpoint's tokenizer.json "
                     "(default: %(default)r)")
    src.add_argument("--prompt-ids", type=_token_ids, metavar="1,2,3", help="prompt as comma-separated token ids")
    g.add_argument("--mode", default=D.mode, choices=MODES, help="block mask diffusion, the denoiser one token per "
                   "pass, or the context tower alone (default: %(default)s)")
    g.add_argument("--threshold", type=float, default=D.threshold, help="confidence gamma in [0, 1]: a pass commits "
                   "every masked position above it, at least one (default: %(default)s)")
    g.add_argument("--block-size", type=int, default=D.block_size, help="tokens per diffusion block, 1-64 "
                   "(default: %(default)s, what the model was trained at)")
    g.add_argument("--steps", type=int, default=D.steps_per_block, help="denoiser passes per block at most; the "
                   "last one commits what is left (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=D.temperature, help="0: greedy; > 0: Gumbel-max sampling, "
                   "reproducible per seed (the random key: docs/semantics.md) (default: %(default)s)")
    g.add_argument("--seed", type=int_at_least(-2**63, 2**63, "a 64-bit integer, in [-2**63, 2**63)"), default=D.seed, help="sampling seed, a 64-bit "
                   "integer (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens, help="tokens to generate at most; "
                   "a partial last block is allowed (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="weights and activations; "
                   "auto: fp32 on the CPU, bf16 on CUDA, as the API's load (default: %(default)s)")
    g.add_argument("--threads", type=int_at_least(0), default=0, help="CPU threads; 0: the API's per-model-size "
                   "choice (twotower_ext.threads; 1 for small models) (default: %(default)s)")
    add_experts_argument(g)
    g.add_argument("--reference-compat", action="store_true", help="reproduce NVIDIA's reference decode exactly "
                   "(batch-mean t, whole blocks, EOS block appended; see docs/semantics.md)")


@command("generate", "generate a continuation, streamed block by block", _generate_args)
def _cmd_generate(a) -> int:
    import torch

    from .api import check_device, load
    from .runtime.detokenize import TextStream
    from .threads import cap_threads

    check_device(a.device, "--device")
    lm = load(_model_path(a), device=a.device, dtype=None if a.dtype == "auto" else a.dtype,
              threads=cap_threads(a.threads) if a.threads else None, experts=a.experts)
    if a.prompt_ids is not None:
        prompt, vocab = a.prompt_ids, lm.config.vocab_size
        if max(prompt) >= vocab:
            raise CliError(f"argument --prompt-ids: token ids must be < vocab_size = {vocab}, got "
                           f"{[v for v in prompt if v >= vocab]}")
        as_text = lm.tokenizer is not None
    else:
        if lm.tokenizer is None:
            raise CliError("this checkpoint has no tokenizer.json (or `tokenizers` is not installed); use --prompt-ids")
        prompt, as_text = lm.encode(a.prompt), True
    shown = [-1]   # generated tokens printed so far; -1: not even the prompt (an argument error prints nothing)
    out = sys.stdout
    text = TextStream(lm.tokenizer) if as_text else None   # a character split across blocks prints whole

    def stream(ev):   # print what was committed since the last event
        if shown[0] < 0:
            out.write(lm.decode(prompt) if as_text else ",".join(map(str, prompt)))
            shown[0] = 0
        seq = ev["sequences"][0]
        new = seq[len(prompt) + shown[0]:]
        shown[0] += len(new)
        out.write(text.add(new) if as_text else "".join(f" {t}" for t in new))
        out.flush()

    res = lm.generate(prompt, mode=a.mode, max_new_tokens=a.max_new_tokens, block_size=a.block_size,
                      steps_per_block=a.steps, threshold=a.threshold, temperature=a.temperature, seed=a.seed,
                      reference_compat=a.reference_compat, callback=stream)
    if as_text:
        out.write(text.finish())
    s = res.stats
    print(f"\n[{s['mode']}] {s['tokens']} tokens, {s['nfe']} NFE ({s['tokens_per_nfe']:.2f} tokens/NFE), "
          f"{s['seconds']:.2f} s, {s['tokens_per_s']:.1f} tokens/s on {torch.device(a.device)}, "
          f"{lm.model.dtype}, {a.experts} experts, {lm.threads or torch.get_num_threads()} thread(s)", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------- info
def _info_args(i: argparse.ArgumentParser) -> None:
    from .quant import CHOICES

    i.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the small model shipped with "
                   "the package, twotower_ext.default_model_path())")
    g = i.add_argument_group("roofline (predicted cost of each pass; see twotower_ext.analysis.costmodel)")
    g.add_argument("--roofline", action="store_true", help="print the roofline table for batch 1..64")
    g.add_argument("--real-config", action="store_true",
                   help="use Nemotron-TwoTower-30B-A3B's config (no weights needed) instead of --model")
    g.add_argument("--device", default="h200",
                   help="h100 | h200 (datasheet numbers) | cpu (this machine, measured now); default h200")
    g.add_argument("--dtype", default="bf16", help="weight dtype: bf16 | fp32 (default bf16)")
    g.add_argument("--ctx-len", type=int, default=4096, help="context tokens before each pass (default 4096)")
    g.add_argument("--block-size", type=int, default=16, help="diffusion block size (default 16)")
    g.add_argument("--experts", default="bf16", choices=CHOICES, help="routed-expert storage the bytes "
                   "per pass count: bf16 (= --dtype, unquantised) | fp8 | int4 (default bf16)")


@command("info", "print a checkpoint's config, parameter counts, cache sizes and memory per expert format "
         "(checks its tensors against the config, as loading does)", _info_args)
def _cmd_info(a) -> int:
    if a.real_config and a.model:
        raise CliError("--real-config and --model are exclusive")
    if a.roofline:
        return _print_roofline(a)
    if a.real_config:
        from .models import NemotronHConfig
        from .models.config import REAL_CONFIG

        print("model: Nemotron-TwoTower-30B-A3B (real config, no weights)")
        _print_memory(NemotronHConfig.from_dict(REAL_CONFIG), a.dtype)
        return 0
    from .models import NemotronHConfig
    from .models.cache import cache_row_bytes
    from .models.weights import check_checkpoint, checkpoint_index, expected_tensors

    path = _model_path(a)
    cfg = NemotronHConfig.from_json(path)
    index = checkpoint_index(path)
    check_checkpoint(index, expected_tensors(cfg), path)   # what load checks before allocating anything
    kinds = cfg.layer_kinds
    print(f"checkpoint: {path}")
    rows = [("hidden_size", cfg.hidden_size), ("layers", f"{cfg.num_hidden_layers} ({cfg.hybrid_override_pattern})"),
            ("mamba / attention / moe layers", f"{kinds.count('mamba')} / {kinds.count('attention')} / {kinds.count('moe')}"),
            ("attention heads (q / kv) x dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} x {cfg.head_dim}"),
            ("mamba heads x dim, state, groups", f"{cfg.mamba_num_heads} x {cfg.mamba_head_dim}, {cfg.ssm_state_size}, {cfg.n_groups}"),
            ("experts (routed, top-k, shared)", f"{cfg.n_routed_experts}, {cfg.num_experts_per_tok}, 1"),
            ("vocab", cfg.vocab_size)]
    rows += [(f"parameters: {k}", f"{v / 1e6:.2f} M") for k, v in _param_counts(index).items()]
    for dtype, elt in (("bf16", 2), ("fp32", 4)):
        kv, mamba = cache_row_bytes(cfg, elt)
        rows.append((f"cache per row ({dtype})", f"{kv / 1024:.2f} KiB/token KV + {mamba / 2**20:.2f} MiB Mamba state"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    _print_memory(cfg, a.dtype)
    return 0


def _print_roofline(a) -> int:
    """`twotower info --roofline`: the cost model's table for --model's config (or --real-config) on --device."""
    import torch

    from .analysis import costmodel
    from .models import NemotronHConfig

    weight_bytes = _dtype_bytes(a.dtype)
    if a.ctx_len < 0:
        raise CliError(f"argument --ctx-len: expected an integer >= 0, got {a.ctx_len}")
    if a.block_size < 1:
        raise CliError(f"argument --block-size: expected an integer >= 1, got {a.block_size}")
    if a.device not in costmodel.DEVICE_NAMES:  # before measuring or reading anything
        raise CliError(f"argument --device: expected one of {', '.join(costmodel.DEVICE_NAMES)}, got {a.device!r}")
    if a.real_config:
        from .models.config import REAL_CONFIG

        cfg, what = NemotronHConfig.from_dict(REAL_CONFIG), "Nemotron-TwoTower-30B-A3B (real config, no weights)"
    else:
        path = _model_path(a)
        cfg, what = NemotronHConfig.from_json(path), path
    dev = costmodel.device_preset(a.device, {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype])
    p = costmodel.param_counts(cfg)
    print(f"model: {what}: {p['tower'] / 1e9:.3g}B parameters per tower, {p['active_per_token'] / 1e9:.3g}B "
          f"active per AR token")
    print(f"device: {dev.name}: {dev.bandwidth / 1e9:.1f} GB/s, {dev.flops / 1e12:.3g} TFLOP/s ({dev.source})")
    print(f"{a.dtype} weights, {a.experts} routed experts, context {a.ctx_len} tokens, block {a.block_size}; roofline = "
          f"max(bytes / bandwidth, FLOPs / rate) per pass, a lower bound; bound: m = bandwidth, c = compute")
    print(costmodel.format_table(costmodel.roofline_rows(cfg, dev, weight_bytes, a.ctx_len, a.block_size,
                                                         experts=a.experts)))
    return 0


def _dtype_bytes(dtype: str) -> int:
    """Bytes per weight of `twotower info --dtype` (the cost model's and the memory table's)."""
    from .analysis.costmodel import DTYPE_BYTES

    if dtype not in DTYPE_BYTES:
        raise CliError(f"argument --dtype: expected one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def _print_memory(cfg, dtype: str) -> None:
    """The memory table of twotower_ext.analysis.memory (weights per expert format, cache per 4K row, GPUs that fit)."""
    from .analysis.memory import format_memory_table, memory_rows, reserve_note

    weight_bytes = _dtype_bytes(dtype)
    print(f"\nmemory on one device, both towers ({dtype} model; --experts at load time):\n")
    print(format_memory_table(memory_rows(cfg, weight_bytes)))
    print(f"\n{reserve_note()}")


def _param_counts(index: dict) -> dict:
    counts = {"context tower": 0, "denoiser tower": 0, "heads + time conditioning": 0}
    for name, (_, info) in index.items():
        n = 1
        for d in info.shape:
            n *= d
        key = ("context tower" if name.startswith("context_tower.") else
               "denoiser tower" if name.startswith("denoiser_tower.") else "heads + time conditioning")
        counts[key] += n
    counts["total"] = sum(counts.values())
    return counts


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    import importlib

    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    ap = _Parser(prog="twotower", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name, (help, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(run=run)
    return ap


def _one_line(e: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text.removeprefix("twotower: ")   # the ops' own messages already start with it


def main(argv=None) -> int:
    from ._loader import ExtensionBuildError

    try:
        a = build_parser().parse_args(argv)
        return a.run(a)
    except KeyboardInterrupt:
        print("\ntwotower: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # the reader went away (`| head`): one line on stderr, exit 141 like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        print("twotower: stopped: the output pipe was closed by its reader", file=sys.stderr)
        return 141
    except (CliError, ValueError, TypeError, OSError, MemoryError, ExtensionBuildError) as e:
        print(f"twotower: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m twotower_ext.cli` runs this file as __main__: use the package's module, whose COMMANDS the
    # plug-in command modules (COMMAND_MODULES) register into.
    from twotower_ext.cli import main as package_main

    sys.exit(package_main())
