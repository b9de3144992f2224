"""Offline generation on the decode core (vLLM's LLM.generate): submit every prompt, step until done.

Every row may have its own decode parameters (a list with one value per prompt); each row's result is the
one it gets alone (docs/semantics.md: batch invariance). reference_compat=True makes the rows one lockstep
batch with NVIDIA's batch semantics; device_loop=True one lockstep batch that runs a whole block per graph.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from .core import DecodeCore
from .params import DecodeParams, ParamError, derive_seed, normalize_prompts, per_row_params
from .prefix_store import PrefixStore
from .request import Request


@dataclass
class GenerationResult:
    sequences: list[list[int]]                 # per row: prompt ids + generated ids
    nfe_per_block: list[list[int]]             # per row: denoiser passes of each block (diffusion)
    commits_per_step: list[list[list[int]]]    # per row, per block: tokens committed by each pass
    stats: dict = field(default_factory=dict)  # tokens, NFE, tokens/NFE, seconds per tower, tokens/s, ...
    logprobs: list[list[float]] | None = None  # logprobs=k: per row, each generated token's log-probability
    top_logprobs: list | None = None           # logprobs=k > 0: per row, per token, its k likeliest (id, logprob)
    finish_reasons: list[str] = field(default_factory=list)   # per row: "stop" (EOS / stop id / string) or "length"
    texts: list[str | None] = field(default_factory=list)     # per row: its text, where it was built (stop strings)

    @property
    def new_tokens(self) -> list[list[int]]:
        return [s[n:] for s, n in zip(self.sequences, self.stats["prompt_lens"])]


class Generator:
    """`generate` for one model, on a decode core it keeps between calls (its cache and CUDA graphs are reused
    while a call fits in them). prefix_cache_bytes > 0: a prefix cache of that budget, kept across calls and
    cores (a prompt that starts like an earlier one prefills only the rest). Not thread-safe: TwoTowerLM
    serialises calls."""

    def __init__(self, model, tokenizer=None, prefix_cache_bytes: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.core: DecodeCore | None = None
        self.prefix = PrefixStore(model, prefix_cache_bytes) if prefix_cache_bytes else None

    def _core_for(self, rows: int, max_len: int, snapshot: bool, cuda_graphs: bool) -> DecodeCore:
        c = self.core
        if c is not None and c.max_rows >= rows and c.max_len >= max_len and (c.runner.snapshot or not snapshot) \
                and c.cuda_graphs == cuda_graphs:
            return c
        self.core = None   # free the old cache before allocating the new one
        self.core = DecodeCore(self.model, rows, max_len, max_queue=0, snapshot=snapshot, cuda_graphs=cuda_graphs,
                               tokenizer=self.tokenizer, prefix_cache=self.prefix)
        return self.core

    def generate(self, input_ids, callback=None, reference_compat: bool = False, cuda_graphs: bool = True,
                 device_loop: bool = False, n: int = 1, **params) -> GenerationResult:
        V = self.model.config.vocab_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"generate: n must be an int >= 1, got {n!r}")
        try:
            prompts = normalize_prompts(input_ids, V)
            rows = per_row_params(len(prompts), V, **params)
            if n > 1:   # n samples of every prompt, next to each other, each with its own derived seed
                prompts = [p for p in prompts for _ in range(n)]
                rows = [replace(r, seed=derive_seed(r.seed, j)) for r in rows for j in range(n)]
        except ParamError as e:
            raise ValueError(f"generate: {e}") from None
        except (ValueError, TypeError) as e:
            raise type(e)(f"generate: {e}") from None
        for name, v in (("reference_compat", reference_compat), ("cuda_graphs", cuda_graphs),
                        ("device_loop", device_loop)):
            if not isinstance(v, bool):
                raise TypeError(f"generate: {name} must be True or False, got {v!r}")
        lockstep = None
        if reference_compat:
            _check_compat(prompts, params, rows)
            lockstep = {"compat": True, "device_loop": device_loop and rows[0].mode == "diffusion"}
        elif device_loop and len({(p.mode, p.block_size, p.mask_token_id) for p in rows}) == 1 \
                and rows[0].mode == "diffusion":
            lockstep = {"compat": False, "device_loop": True}
        need = max(p.context_tokens(len(q), lockstep is not None) for p, q in zip(rows, prompts))
        core = self._core_for(len(prompts), need, any(p.mode == "mock_ar" for p in rows), cuda_graphs)
        before = core.stats()
        out = [list(p) for p in prompts]
        errors: list[BaseException] = []

        def sink_for(i: int):
            def sink(ev):
                if ev[0] != "tokens":
                    return
                out[i].extend(ev[1])
                if callback is None or errors:
                    return
                r = reqs[i]
                where = ({"block": len(r.nfe_per_block) - 1} if r.params.mode == "diffusion"
                         else {"token_index": len(r.tokens) - 1})
                try:
                    callback({"row": i, **where, "tokens": list(ev[1]), "sequences": out})
                except BaseException as e:  # noqa: BLE001  (re-raised from generate, after the core is drained)
                    errors.append(e)
            return sink

        reqs = [Request(p, r, sink_for(i)) for i, (p, r) in enumerate(zip(prompts, rows))]
        t0 = time.perf_counter()
        try:
            core.submit(reqs, lockstep)
            while core.step() and not errors:
                pass
        except BaseException:
            core.drain("cancelled")
            self.core = None   # interrupted mid-iteration: start from a fresh core next time
            raise
        if errors:
            core.drain("cancelled")
            raise errors[0]
        failed = next((r for r in reqs if r.finish_reason == "error"), None)
        if failed is not None:
            if failed.exception is not None:
                raise failed.exception
            raise RuntimeError(f"generate: {failed.error}")
        wall = time.perf_counter() - t0
        return _result(reqs, prompts, rows, reference_compat, before, core.stats(), wall)


def _check_compat(prompts, params: dict, rows: list[DecodeParams]) -> None:
    """reference_compat reproduces NVIDIA's batch: one prompt length, one mode / block size / length."""
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("generate: reference_compat=True needs prompts of equal length (NVIDIA's reference "
                         "does not pad); use reference_compat=False for ragged batches")
    for name in ("mode", "block_size", "max_new_tokens", "steps_per_block", "mask_token_id", "eos_token_id"):
        if len({getattr(p, name) for p in rows}) > 1:
            raise ValueError(f"generate: {name} must be one value for every row with reference_compat=True")
    p = rows[0]
    if p.mode == "diffusion" and p.max_new_tokens % p.block_size:
        raise ValueError(f"generate: max_new_tokens must be a multiple of block_size={p.block_size} with "
                         f"reference_compat=True, got {p.max_new_tokens!r}")


def _result(reqs, prompts, rows, compat: bool, before: dict, after: dict, wall: float) -> GenerationResult:
    new = sum(len(r.tokens) for r in reqs)
    diffusion = [r.params.mode == "diffusion" for r in reqs]
    if compat:   # NVIDIA counts the batch's passes once
        nfe = sum(reqs[0].nfe_per_block) if diffusion[0] else max(len(r.tokens) for r in reqs)
    else:
        nfe = sum(r.nfe for r in reqs)
    modes = {p.mode for p in rows}
    stats = {"mode": modes.pop() if len(modes) == 1 else "mixed", "rows": len(reqs),
             "prompt_lens": [len(p) for p in prompts], "tokens": new, "nfe": nfe,
             "tokens_per_nfe": new / nfe if nfe else 0.0, "seconds": wall, "tokens_per_s": new / wall if wall > 0 else 0.0}
    for k in ("context_s", "denoiser_s", "executed_passes", "capture_s", "prefix_cache_queries", "prefix_cache_hits"):
        if k in after:
            stats[k] = after[k] - before[k]
    stats.update(cuda_graphs=after["cuda_graphs"], graphs_captured=after["graphs_captured"],
                 device_loop=after["device_loop"])
    lp = any(p.logprobs is not None for p in rows)
    return GenerationResult([list(p) + r.tokens for p, r in zip(prompts, reqs)],
                            [list(r.nfe_per_block) for r in reqs], [list(r.commits_per_step) for r in reqs], stats,
                            [list(r.logprobs) for r in reqs] if lp else None,
                            [list(r.top_logprobs) for r in reqs] if lp else None, [r.finish_reason for r in reqs],
                            [r.output_text for r in reqs])
