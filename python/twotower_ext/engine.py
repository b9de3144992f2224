"""The decode engine: mask diffusion, mock-AR and AR over a `TwoTowerModel`.

Semantics (docs/semantics.md). Default (`reference_compat=False`): per-row t, per-row stop at the first
EOS with the output cut after it, ragged prompts, a partial last block (it stops once its kept positions
are committed; the surplus positions still take part in attention and are discarded), no
context extension for a row's final block, finished rows cost nothing (they leave the batch: the cache is
compacted so the live rows stay a contiguous prefix, which keeps every pass copy-free and capturable).
`reference_compat=True` reproduces NVIDIA's reference: batch-mean t, every row rides every pass until all
rows finish the block, whole blocks kept after EOS, the EOS block still appended to the context, and the
run stops after a block in which any row produced EOS.

Randomness (temperature > 0): docs/semantics.md ("Randomness"); it never depends on a row's place in the batch,
so a row samples the same tokens alone or in any batch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from . import ops

MODES = ("diffusion", "mock_ar", "ar")


@dataclass
class GenerationResult:
    sequences: list[list[int]]                 # per row: prompt ids + generated ids
    nfe_per_block: list[list[int]]             # per row: denoiser passes of each block (diffusion)
    commits_per_step: list[list[list[int]]]    # per row, per block: tokens committed by each pass
    stats: dict = field(default_factory=dict)  # tokens, NFE, tokens/NFE, seconds per tower, tokens/s

    @property
    def new_tokens(self) -> list[list[int]]:
        return [s[n:] for s, n in zip(self.sequences, self.stats["prompt_lens"])]


@dataclass(frozen=True)
class GenerateArgs:
    mode: str = "diffusion"
    max_new_tokens: int = 256
    block_size: int = 16
    steps_per_block: int = 16
    threshold: float = 0.8
    temperature: float = 0.0
    seed: int = 0
    eos_token_id: int | None = 2
    mask_token_id: int = 3
    reference_compat: bool = False
    cuda_graphs: bool = True
    device_loop: bool = False

    def validate(self, vocab_size: int) -> None:
        def bad(name, want, got):
            raise ValueError(f"generate: {name} must be {want}, got {got!r}")

        if self.mode not in MODES:
            bad("mode", f"one of {MODES}", self.mode)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an int >= 1", self.max_new_tokens)
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 64:
            bad("block_size", "an int in [1, 64]", self.block_size)
        if not isinstance(self.steps_per_block, int) or self.steps_per_block < 1:
            bad("steps_per_block", "an int >= 1", self.steps_per_block)
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            bad("threshold", "a float in [0, 1]", self.threshold)
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0 and math.isfinite(self.temperature)):
            bad("temperature", "a finite float >= 0", self.temperature)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -2**63 <= self.seed < 2**63:
            bad("seed", "an int in [-2**63, 2**63)", self.seed)
        if not 0 <= self.mask_token_id < vocab_size:
            bad("mask_token_id", f"in [0, vocab_size={vocab_size})", self.mask_token_id)
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < vocab_size:
            bad("eos_token_id", f"None or in [0, vocab_size={vocab_size})", self.eos_token_id)
        if self.reference_compat and self.mode == "diffusion" and self.max_new_tokens % self.block_size:
            bad("max_new_tokens", f"a multiple of block_size={self.block_size} with reference_compat=True",
                self.max_new_tokens)


def normalize_prompts(input_ids, vocab_size: int) -> list[list[int]]:
    """A list of ints, a list of lists (ragged) or a LongTensor [B, L] / [L] -> list of lists of ints."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"generate: input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
            raise ValueError(f"generate: input_ids must be a non-empty [L] or [B, L] tensor, got shape "
                             f"{tuple(input_ids.shape)}")
        rows = input_ids.reshape(-1, input_ids.shape[-1]).tolist()
    elif isinstance(input_ids, (list, tuple)) and input_ids and not any(isinstance(v, (list, tuple, torch.Tensor))
                                                                        for v in input_ids):   # one flat prompt
        rows = [list(input_ids)]
    elif isinstance(input_ids, (list, tuple)) and input_ids:
        rows = [list(r.tolist() if isinstance(r, torch.Tensor) else r) for r in input_ids]
    else:
        raise ValueError("generate: input_ids must be a non-empty list of ints, list of lists, or a LongTensor")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"generate: prompt {i} is empty (every prompt needs at least one token)")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
            raise ValueError(f"generate: prompt {i} must hold int token ids, got {[v for v in r if not isinstance(v, int)][:5]}")
        bad = [v for v in r if not 0 <= v < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, vocab_size={vocab_size}): {bad[:5]}")
    return rows


def _host_available_bytes() -> int:
    """MemAvailable (what can be allocated without swapping: free + reclaimable page cache), not MemFree."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _block_time(x: torch.Tensor, args: GenerateArgs) -> torch.Tensor:
    """The denoiser's t per row: the fraction of its block still masked (reference_compat: the batch mean)."""
    masked = (x == args.mask_token_id).float().mean(1)
    return masked.mean().expand(x.shape[0]) if args.reference_compat else masked


class _Clock:
    """Wall time per phase; synchronises the device only when reading the clock at phase ends."""

    def __init__(self, device: torch.device):
        self.device, self.s = device, {"context_s": 0.0, "denoiser_s": 0.0, "sample_s": 0.0}

    def run(self, key, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.s[key] += time.perf_counter() - t0
        return out


def gumbel_argmax(logits: torch.Tensor, temperature: float, seed: int, stream: int, mask_id: int | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax (temperature 0) or a Gumbel-max sample whose noise
    depends only on (seed, stream), identical for every row, so a row samples alike in any batch."""
    logits = logits.float()
    if mask_id is not None:
        logits = logits.clone()
        logits[:, mask_id] = -math.inf
    if temperature == 0:
        return logits.argmax(-1)
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + stream) % (2**63))
    u = torch.rand(logits.shape[-1], generator=g, dtype=torch.float64).clamp_(1e-20, 1 - 1e-16)
    noise = (-torch.log(-torch.log(u))).float().to(logits.device)
    return (logits / temperature + noise).argmax(-1)


class Engine:
    """Runs `generate` over a TwoTowerModel (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.config
        self._steppers: dict = {}
        self._pool = None   # the last cache, reused when large enough (its addresses back captured graphs)
        self._graphs = None   # the CUDA graphs of that cache's steps (graphs.StepGraphs), one memory pool

    # ---------------------------------------------------------------------------------------------
    def generate(self, input_ids, callback=None, **kw) -> GenerationResult:
        with torch.inference_mode():   # no autograd bookkeeping: ~10% less per-op overhead on small models
            return self._generate(input_ids, callback, **kw)

    def _generate(self, input_ids, callback=None, **kw) -> GenerationResult:
        args = GenerateArgs(**kw)
        args.validate(self.cfg.vocab_size)
        prompts = normalize_prompts(input_ids, self.cfg.vocab_size)
        if args.reference_compat and len({len(p) for p in prompts}) > 1:
            raise ValueError("generate: reference_compat=True needs prompts of equal length (NVIDIA's reference "
                             "does not pad); use reference_compat=False for ragged batches")
        capacity = self._capacity(prompts, args)
        clock = _Clock(self.model.den_device)
        t0 = time.perf_counter()
        if args.mode == "diffusion":
            res = self._diffusion(prompts, args, capacity, clock, callback)
        else:
            res = self._autoregressive(prompts, args, capacity, clock, callback)
        wall = time.perf_counter() - t0
        new = sum(len(s) - len(p) for s, p in zip(res.sequences, prompts))
        nfe = res.stats.pop("nfe")
        res.stats.update(clock.s)
        res.stats.update({"mode": args.mode, "rows": len(prompts), "prompt_lens": [len(p) for p in prompts],
                          "tokens": new, "nfe": nfe, "tokens_per_nfe": new / nfe if nfe else 0.0,
                          "seconds": wall, "tokens_per_s": new / wall if wall > 0 else 0.0})
        return res

    def _capacity(self, prompts, args: GenerateArgs) -> int:
        """Cache capacity: longest prompt + every token that may be appended to the context."""
        if args.mode == "diffusion":
            n_blocks = math.ceil(args.max_new_tokens / args.block_size)
            appended = n_blocks * args.block_size if args.reference_compat else (n_blocks - 1) * args.block_size
        else:
            appended = args.max_new_tokens
        return max(len(p) for p in prompts) + max(appended, 1)

    def cache_bytes(self, rows: int, capacity: int, snapshot: bool = False) -> int:
        """Bytes of a context cache: KV of every attention layer, conv + fp32 SSM state of every Mamba layer."""
        from .models.cache import cache_row_bytes

        kv, state = cache_row_bytes(self.cfg, torch.finfo(self.model.dtype).bits // 8)
        return rows * (kv * capacity + state * (2 if snapshot else 1))

    def _new_cache(self, rows: int, capacity: int, snapshot: bool = False):
        """The context cache, allocated whole up front so a request that cannot fit fails before any work.
        The last cache is reused when it is large enough: captured CUDA graphs point into it."""
        pool = self._pool
        if pool is not None and pool.batch >= rows and pool.capacity >= capacity and pool.snapshots == snapshot:
            return pool
        self._pool, self._steppers, self._graphs = None, {}, None
        need, dev = self.cache_bytes(rows, capacity, snapshot), self.model.ctx_device
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0]
        else:
            free = _host_available_bytes()
        if need > free:
            raise MemoryError(f"generate: the context cache for {rows} rows x {capacity} tokens needs "
                              f"{need / 2**30:.2f} GiB but {dev} has {free / 2**30:.2f} GiB free; lower the batch, "
                              f"the prompt length or max_new_tokens")
        try:
            self._pool = self.model.new_cache(rows, capacity, snapshot=snapshot)
        except torch.OutOfMemoryError as e:
            raise MemoryError(f"generate: the context cache for {rows} rows x {capacity} tokens does not fit in "
                              f"memory; lower the batch, the prompt length or max_new_tokens ({e})") from None
        return self._pool

    # ---------------------------------------------------------------------------------------------
    def _diffusion(self, prompts, args: GenerateArgs, capacity: int, clock: _Clock, callback) -> GenerationResult:
        model, S, mask = self.model, args.block_size, args.mask_token_id
        B = len(prompts)
        dev = model.den_device
        cache = self._new_cache(B, capacity)
        clock.run("context_s", model.prefill, prompts, cache, slice(0, B), logits=False)
        n_blocks = math.ceil(args.max_new_tokens / S)
        out = [list(p) for p in prompts]
        nfe_blocks = [[] for _ in range(B)]
        commits = [[] for _ in range(B)]
        live = list(range(B))           # original row ids of the cache rows [0, len(live))
        nfe_total = executed = 0
        stepper = self._stepper(args, dev)
        steps = self._context_steps(args, cache)
        for blk in range(n_blocks):
            n = len(live)
            x = torch.full((n, S), mask, dtype=torch.long, device=dev)
            per_row = [[] for _ in range(n)]
            # A partial last block (default mode) ends once its kept positions are committed: the rows all hold
            # blk * S new tokens here. The surplus positions still take part in every pass. It runs step by step
            # (the device loop would run until every position is committed).
            kept = min(S, args.max_new_tokens - blk * S)
            partial = kept < S and not args.reference_compat
            block = (clock.run("denoiser_s", stepper.run_block, x, cache, n, blk)
                     if args.device_loop and not partial and hasattr(stepper, "run_block") else None)
            if block is not None:   # whole block on the device: one host read per block
                steps_counts = block[0].tolist()
                executed += block[2].tolist()[0]   # passes run: all steps unrolled, or until done (WHILE node)
                passes = max(sum(1 for c in col if c) for col in zip(*steps_counts)) if args.reference_compat else 0
                for i in range(n):
                    row = [sc[i] for sc in steps_counts]
                    used = passes or next((k for k in range(len(row), 0, -1) if row[k - 1]), 0)
                    per_row[i] = row[:used]
                nfe_total += max(len(r) for r in per_row)
            else:
                row_done, have = [False] * n, [0] * n
                for step in range(args.steps_per_block):
                    try:
                        counts, done = clock.run("denoiser_s", stepper, x, cache, n, blk, step)
                    except ValueError as e:
                        if "must not contain NaN" not in str(e):
                            raise
                        raise ValueError(f"{e}: {self._nonfinite_origin(x, cache, n, args)}") from None
                    nfe_total += 1
                    executed += 1
                    if partial:   # count commits of kept positions only
                        now = (x[:, :kept] != mask).sum(1).tolist()
                        counts, done, have = [a - b for a, b in zip(now, have)], [v == kept for v in now], now
                    else:
                        counts, done = counts.tolist(), done.tolist()   # the one small host read per step (copies)
                    for i in range(n):
                        if args.reference_compat or not row_done[i]:
                            per_row[i].append(counts[i])
                    row_done = done
                    if all(done):
                        break
            tokens = x.tolist()
            finished, any_eos = [], False
            for i, b in enumerate(live):
                nfe_blocks[b].append(len(per_row[i]))
                commits[b].append(per_row[i])
                keep = tokens[i][: args.max_new_tokens - (len(out[b]) - len(prompts[b]))]
                has_eos = args.eos_token_id is not None and args.eos_token_id in keep
                any_eos |= has_eos
                if has_eos and not args.reference_compat:
                    keep = keep[: keep.index(args.eos_token_id) + 1]
                out[b].extend(keep)
                if has_eos or len(out[b]) - len(prompts[b]) >= args.max_new_tokens:
                    finished.append(i)
            if callback is not None:
                callback({"block": blk, "rows": list(live), "tokens": tokens, "sequences": out})
            last = blk == n_blocks - 1
            if args.reference_compat:
                clock.run("context_s", steps.extend, x, cache, n)     # EOS block appended too
                if any_eos or last:
                    break
                continue
            keep_rows = [i for i in range(n) if i not in finished]
            if not keep_rows or last:
                break
            if len(keep_rows) < n:   # drop finished rows: live rows stay the contiguous prefix
                cache.compact(keep_rows)
                x = x[keep_rows]
                live = [live[i] for i in keep_rows]
            clock.run("context_s", steps.extend, x, cache, len(live))
        stats = {"nfe": nfe_total if args.reference_compat else sum(sum(v) for v in nfe_blocks),
                 "executed_passes": executed}
        return GenerationResult(out, nfe_blocks, commits, stats)

    def _nonfinite_origin(self, x, cache, n: int, args: GenerateArgs) -> str:
        from .diagnose import nonfinite_origin

        return nonfinite_origin(self.model, x, cache, n, _block_time(x, args))

    def _stepper(self, args: GenerateArgs, dev: torch.device):
        """One denoiser pass + threshold-unmask commit on the live prefix of the cache, x updated in place.
        Returns (counts int32 [n], done bool [n]) on the device. On CUDA with cuda_graphs, replays a graph
        captured once per live-row count."""
        model = self.model

        def eager(x, cache, n, blk, step):
            logits = model.denoise(x, cache, _block_time(x, args), slice(0, n), dense_moe=dev.type == "cuda")
            return self._unmask(logits, x, args, blk, step)

        if not self._use_graphs(args, dev):
            return eager
        from .graphs import GraphStepper

        key = (args.block_size, args.steps_per_block, args.threshold, args.temperature, args.seed,
               args.mask_token_id, args.reference_compat)
        if key not in self._steppers:      # graphs stay valid while the pooled cache does
            graphs = self._step_graphs(dev)
            graphs.forget("denoise", "denoise-block", "denoise-while")
            self._steppers = {key: GraphStepper(eager, args, dev, graphs)}
        return self._steppers[key]

    @staticmethod
    def _use_graphs(args: GenerateArgs, dev: torch.device) -> bool:
        return dev.type == "cuda" and args.cuda_graphs

    def _step_graphs(self, dev: torch.device):
        """The graphs of the current cache's steps (denoise, AR, mock-AR, extension): one memory pool."""
        from .graphs import StepGraphs

        if self._graphs is None:
            self._graphs = StepGraphs(dev)
        return self._graphs

    def _context_steps(self, args: GenerateArgs, cache):
        """The context tower's steps (block extension, AR step) and the mock-AR pass on the live prefix of
        the cache: from CUDA graphs (one per step and live-row count) when both towers share one device."""
        from .graphs import ContextSteps

        model = self.model
        one_device = cache.den is cache.ctx and model.ctx_device == model.den_device
        graphs = self._step_graphs(model.ctx_device) if one_device and self._use_graphs(args, model.ctx_device) else None
        return ContextSteps(model, graphs, dense_moe=model.ctx_device.type == "cuda")

    def _unmask(self, logits, x, args: GenerateArgs, blk, step):
        """The commit step of every row in one call (the random key never includes the row's place in the
        batch: docs/semantics.md)."""
        return ops.threshold_unmask(logits, x, args.mask_token_id, float(args.threshold), step, args.steps_per_block,
                                    float(args.temperature), args.seed, block=blk)

    # ---------------------------------------------------------------------------------------------
    def _autoregressive(self, prompts, args: GenerateArgs, capacity: int, clock: _Clock, callback) -> GenerationResult:
        """AR (context tower + context_lm_head) or mock-AR (the denoiser without time conditioning, one
        token per pass). One token per forward pass; rows leave the batch at EOS (reference_compat: the
        run stops when any row emits EOS)."""
        model = self.model
        B = len(prompts)
        mock = args.mode == "mock_ar"
        cache = self._new_cache(B, capacity, snapshot=mock)
        logits = clock.run("context_s", model.prefill, prompts, cache, slice(0, B), logits=not mock, snapshot=mock)
        steps = self._context_steps(args, cache)
        out = [list(p) for p in prompts]
        live = list(range(B))
        last = torch.tensor([p[-1] for p in prompts], device=model.den_device)
        passes = 0
        for i in range(args.max_new_tokens):
            n = len(live)
            if mock:
                logits = clock.run("denoiser_s", steps.mock_ar, last, cache, n)
            nxt = clock.run("sample_s", gumbel_argmax, logits, args.temperature, args.seed, i,
                            args.mask_token_id if mock else None)
            passes += 1
            toks = nxt.tolist()
            finished = []
            for j, b in enumerate(live):
                out[b].append(toks[j])
                if args.eos_token_id is not None and toks[j] == args.eos_token_id:
                    finished.append(j)
            if callback is not None:
                callback({"token_index": i, "rows": list(live), "tokens": toks, "sequences": out})
            if i == args.max_new_tokens - 1 or (finished and args.reference_compat) or len(finished) == n:
                break
            keep_rows = [j for j in range(n) if j not in finished]
            if len(keep_rows) < n:
                cache.compact(keep_rows)
                nxt = nxt[keep_rows]
                live = [live[j] for j in keep_rows]
            last = nxt.to(model.den_device)
            if mock:
                clock.run("context_s", steps.extend, nxt[:, None], cache, len(live), snapshot=True)
            else:
                logits = clock.run("context_s", steps.decode, nxt, cache, len(live))
        nfe = passes if args.reference_compat else sum(len(s) - len(p) for s, p in zip(out, prompts))
        return GenerationResult(out, [[] for _ in range(B)], [[] for _ in range(B)], {"nfe": nfe})
