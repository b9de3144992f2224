"""Continuous batching: one thread owns the model and a preallocated context cache of `max_batch` rows.

Every iteration of the loop
1. drops rows that finished or were cancelled (the cache is compacted so the live rows stay the contiguous
   prefix [0, n): passes over them read views of the cache, no copies);
2. admits waiting requests into the free rows [n, max_batch) (one prefill per group of equal-length prompts
   of one mode, so no prompt is padded: each row's prefill is the one `generate` runs for it alone);
3. runs one forward pass per group of rows that can share it: one denoiser pass per block size over every
   diffusion row, whatever its block index, step, threshold, temperature or seed (per-row t; the cache
   gives per-row context lengths), one context-tower step over every AR row, one mock-AR pass over every
   mock-AR row; then the commit of each row and one context extension per group over the rows whose block
   (token) was committed.

A row's result is therefore the one `Engine.generate` (reference_compat=False) gives that row alone:
per-row t, stop at its first EOS (output cut after it), a partial last block, no extension of its final
block. Commits reuse the engine's own step (`Engine._unmask`: rows sharing (threshold, steps) at temperature
0 commit in one call; a sampling row commits alone; the random key: docs/semantics.md) and AR sampling
reuses `engine.gumbel_argmax`. Rows of different modes or block sizes
share the cache but not a pass; when such groups interleave in the cache a pass gathers its rows (copies).
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import torch

from ..engine import gumbel_argmax, normalize_prompts
from .metrics import Metrics
from .request import Handle, QueueFull, RequestError, ShuttingDown, make_args

log = logging.getLogger("twotower.serve")



def _free_bytes(dev: torch.device) -> int:
    """Memory a cache may take on dev: free GPU memory, or the host's MemAvailable."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62   # unknown: the allocation itself will tell


class _Row:
    """A live request in a cache row: its block (diffusion) or next-token logits / last token (AR modes)."""

    def __init__(self, handle: Handle):
        self.h = handle
        self.args = handle.args
        self.kind = handle.args.mode
        self.blk = self.step = 0
        self.x = None         # diffusion: the block being denoised, [S] int64 on the denoiser's device
        self.logits = None    # ar: context_lm_head logits [V] of the last token
        self.last = None      # mock_ar: the last token, [1] int64
        self.finished = False

    @property
    def n_new(self) -> int:
        return len(self.h.tokens)

    def group(self):
        return (self.kind, self.args.block_size if self.kind == "diffusion" else 0)


class Scheduler:
    """Owns `lm` (a TwoTowerLM) on its own thread; `submit` from any thread.

    max_batch: cache rows (live requests at once); max_queue: waiting requests beyond them (a submit past it
    raises QueueFull at once); max_len: tokens of context a row may hold (prompt + every appended token)."""

    def __init__(self, lm, max_batch: int = 8, max_queue: int = 64, max_len: int = 1024, metrics: Metrics | None = None):
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("max_len", max_len, 2)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"serve: {name} must be an int >= {lo}, got {v!r}")
        self.lm, self.model, self.engine = lm, lm.model, lm.engine
        self.cfg = self.model.config
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.metrics = metrics or Metrics()
        need = self.engine.cache_bytes(max_batch, max_len, snapshot=True)
        free = _free_bytes(self.model.ctx_device)
        if need > free:
            raise MemoryError(f"serve: a cache of {max_batch} rows x {max_len} tokens needs {need / 2**30:.2f} GiB but "
                              f"{self.model.ctx_device} has {free / 2**30:.2f} GiB available; lower --max-batch or --max-len")
        try:   # snapshot=True: mock-AR rows need the pre-extension Mamba states; the others ignore them
            self.cache = self.model.new_cache(max_batch, max_len, snapshot=True)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            raise MemoryError(f"serve: a cache of {max_batch} rows x {max_len} tokens needs {need / 2**30:.2f} GiB "
                              f"and does not fit; lower --max-batch or --max-len ({e})") from None
        self.dense_moe = self.model.den_device.type == "cuda"   # as the engine's denoiser pass
        self.rows: list[_Row] = []                 # rows[i] lives in cache row i
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="twotower-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------------
    # client side

    def submit(self, prompt, sink=None, request_id: str | None = None, **params) -> Handle:
        """Queue a request: prompt token ids (or text, with a tokenizer) and serving parameters (see
        request.FIELDS). Raises RequestError (naming the field), QueueFull or ShuttingDown at once."""
        if not self._accepting:
            self.metrics.rejected("shutting_down")
            raise ShuttingDown("the server is shutting down")
        ids = self._prompt_ids(prompt)
        args = make_args(self.cfg.vocab_size, **params)
        need = self.engine._capacity([ids], args)
        if need > self.max_len:
            raise RequestError("max_tokens", f"max_tokens: the prompt ({len(ids)} tokens) plus max_tokens={args.max_new_tokens} "
                               f"need {need} tokens of context, more than this server's max_len={self.max_len}")
        h = Handle(ids, args, sink, request_id)
        with self._cv:
            if not self._accepting:
                self.metrics.rejected("shutting_down")
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self.rows)):
                self.metrics.rejected("queue_full")
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(h)
            self.metrics.set_load(len(self._waiting), len(self.rows))
            self._cv.notify()
        return h

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.lm.tokenizer is None:
                raise RequestError("prompt", "prompt: this model has no tokenizer; send token ids")
            ids = self.lm.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in prompt):
            ids = list(prompt)
        else:
            raise RequestError("prompt", "prompt must be a string or a list of token ids")
        try:   # the engine's checks: non-empty, ids in [0, vocab)
            return normalize_prompts([ids], self.cfg.vocab_size)[0]
        except ValueError as e:
            raise RequestError("prompt", str(e).replace("generate: prompt 0", "prompt")) from None

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let the queued and live requests finish for up to grace_s seconds, cancel the
        rest, and stop the thread."""
        self.stop_accepting()
        end = time.monotonic() + grace_s
        with self._cv:
            while (self.rows or self._waiting) and self._thread.is_alive():
                if not self._cv.wait(timeout=max(0.0, min(0.05, end - time.monotonic()))) and time.monotonic() >= end:
                    break
            self._stop = True
            self._cv.notify_all()
        self._thread.join()

    def load(self) -> dict:
        with self._cv:
            return {"live_rows": len(self.rows), "queue_depth": len(self._waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "max_len": self.max_len, "accepting": self._accepting}

    # ------------------------------------------------------------------------------------------------
    # the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self.rows and not self._waiting:
                        self._cv.wait()
                    if self._stop:
                        break
                try:
                    self._iteration()
                except Exception as e:  # noqa: BLE001  (a failed pass fails its rows, never the server)
                    log.exception("twotower serve: a batched pass failed")
                    for r in self.rows:
                        if not r.finished:
                            r.h._finish("error", f"{type(e).__name__}: {e}")
                            self.metrics.request_done(r.h)
                    self.rows = []
                with self._cv:
                    self.metrics.set_load(len(self._waiting), len(self.rows))
                    self._cv.notify_all()
            for h in [r.h for r in self.rows] + list(self._waiting):   # stopped: cancel what is left
                h._finish("cancelled")
                self.metrics.request_done(h)
            self.rows, self._waiting = [], collections.deque()

    def _iteration(self) -> None:
        self._drop()
        self._admit()
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.rows):
            groups.setdefault(r.group(), []).append(i)
        for (kind, _), idx in groups.items():
            {"diffusion": self._diffusion_pass, "ar": self._ar_step, "mock_ar": self._mock_step}[kind](idx)
        self._drop()   # a finished row leaves at once

    def _drop(self) -> None:
        """Free the rows of finished and cancelled requests; live rows move to the front, in order."""
        for r in self.rows:
            if r.h.cancelled and not r.finished:
                r.finished = True
                self._finish(r, "cancelled")
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        if keep:
            self.cache.compact(keep)
        self.rows = [self.rows[i] for i in keep]

    def _admit(self) -> None:
        new: list[Handle] = []
        with self._cv:
            while self._waiting and len(self.rows) + len(new) < self.max_batch:
                h = self._waiting.popleft()
                if h.cancelled:
                    h._finish("cancelled")
                    self.metrics.request_done(h)
                else:
                    new.append(h)
        groups: dict[tuple, list[Handle]] = {}
        for h in new:
            groups.setdefault((h.args.mode, len(h.prompt)), []).append(h)
        for (mode, _), hs in groups.items():
            n = len(self.rows)
            rows = slice(n, n + len(hs))
            try:
                logits = self.model.prefill([h.prompt for h in hs], self.cache, rows, logits=mode == "ar",
                                            snapshot=mode == "mock_ar")
            except Exception as e:  # noqa: BLE001  (only these requests fail; the live rows are untouched)
                log.exception("twotower serve: prefill failed")
                for h in hs:
                    h._finish("error", f"prefill: {type(e).__name__}: {e}")
                    self.metrics.request_done(h)
                continue
            for j, h in enumerate(hs):
                r = _Row(h)
                if mode == "diffusion":
                    r.x = self._masked_block(r.args)
                elif mode == "ar":
                    r.logits = logits[j]
                else:
                    r.last = torch.tensor(h.prompt[-1:], device=self.model.den_device)
                self.rows.append(r)

    def _masked_block(self, args) -> torch.Tensor:
        return torch.full((args.block_size,), args.mask_token_id, dtype=torch.long, device=self.model.den_device)

    # ------------------------------------------------------------------------------------------------
    # passes

    def _diffusion_pass(self, idx: list[int]) -> None:
        """One denoiser pass over the diffusion rows idx (one block size), then each row's commit step."""
        rows = [self.rows[i] for i in idx]
        x = torch.stack([r.x for r in rows])
        t = (x == rows[0].args.mask_token_id).float().mean(1)
        logits = self.model.denoise(x, self.cache, t, idx, dense_moe=self.dense_moe)
        self.metrics.pass_done(len(rows))
        # rows commit together where the step is the same call: temperature 0 and equal (threshold, steps, step)
        calls: dict[tuple, list[int]] = {}
        for j, r in enumerate(rows):
            a = r.args
            key = (a.threshold, a.steps_per_block, r.step, a.mask_token_id) if a.temperature == 0 else ("row", j)
            calls.setdefault(key, []).append(j)
        done = torch.empty(len(rows), dtype=torch.bool, device=x.device)
        for js in calls.values():
            r = rows[js[0]]
            if len(js) == len(rows):
                done.copy_(self.engine._unmask(logits, x, r.args, r.blk, r.step)[1])
                continue
            sel = torch.tensor(js, device=x.device)
            xs = x[sel]
            done[sel] = self.engine._unmask(logits[sel], xs, r.args, r.blk, r.step)[1]
            x[sel] = xs
        # A row's partial last block ends once its kept positions are committed, as in `Engine.generate` (so
        # every row's tokens and NFE are the ones `generate` gives it alone).
        kept = [r.args.max_new_tokens - r.n_new for r in rows]
        if min(kept) < x.shape[1]:
            kept_t = torch.tensor(kept, device=x.device)
            pending = (x == rows[0].args.mask_token_id) & (torch.arange(x.shape[1], device=x.device) < kept_t[:, None])
            done |= ~pending.any(1)
        done_h = done.tolist()   # the one host read per pass
        extend: list[int] = []
        for j, r in enumerate(rows):
            r.x = x[j]
            r.h.nfe += 1
            r.step += 1
            if not done_h[j]:
                continue
            a = r.args
            block = r.x.tolist()
            keep = block[: a.max_new_tokens - r.n_new]
            eos = a.eos_token_id is not None and a.eos_token_id in keep
            if eos:
                keep = keep[: keep.index(a.eos_token_id) + 1]
            r.h._emit(keep)
            if eos or r.n_new >= a.max_new_tokens:
                self._finish(r, "stop" if eos else "length")
            else:
                extend.append(j)
        if extend:   # committed blocks join their rows' context; the next block starts fully masked
            self.model.extend(torch.stack([rows[j].x for j in extend]), self.cache, [idx[j] for j in extend])
            for j in extend:
                r = rows[j]
                r.blk, r.step, r.x = r.blk + 1, 0, self._masked_block(r.args)

    def _sample(self, rows: list[_Row], logits: torch.Tensor, mask_id) -> list[int]:
        """Next token of each row: greedy rows in one argmax, each sampling row alone keyed by (seed, token
        index) as in `Engine.generate`."""
        out = [0] * len(rows)
        greedy = [j for j, r in enumerate(rows) if r.args.temperature == 0]
        if greedy:
            sel = logits if len(greedy) == len(rows) else logits[greedy]
            for j, v in zip(greedy, gumbel_argmax(sel, 0.0, 0, 0, mask_id).tolist()):
                out[j] = v
        for j, r in enumerate(rows):
            if r.args.temperature > 0:
                out[j] = gumbel_argmax(logits[j:j + 1], r.args.temperature, r.args.seed, r.n_new, mask_id).item()
        return out

    def _commit_tokens(self, rows: list[_Row], toks: list[int]) -> list[int]:
        """Append one token per row; returns the positions (in rows) that go on."""
        going = []
        for j, (r, tok) in enumerate(zip(rows, toks)):
            r.h.nfe += 1
            r.h._emit([tok])
            a = r.args
            if a.eos_token_id is not None and tok == a.eos_token_id:
                self._finish(r, "stop")
            elif r.n_new >= a.max_new_tokens:
                self._finish(r, "length")
            else:
                going.append(j)
        return going

    def _ar_step(self, idx: list[int]) -> None:
        rows = [self.rows[i] for i in idx]
        toks = self._sample(rows, torch.stack([r.logits for r in rows]), None)
        self.metrics.pass_done(len(rows))
        going = self._commit_tokens(rows, toks)
        if going:
            nxt = torch.tensor([toks[j] for j in going], device=self.model.ctx_device)
            logits = self.model.decode(nxt, self.cache, [idx[j] for j in going])
            for k, j in enumerate(going):
                rows[j].logits = logits[k]

    def _mock_step(self, idx: list[int]) -> None:
        rows = [self.rows[i] for i in idx]
        logits = self.model.mock_ar(torch.cat([r.last for r in rows]), self.cache, idx)
        self.metrics.pass_done(len(rows))
        toks = self._sample(rows, logits, rows[0].args.mask_token_id)
        going = self._commit_tokens(rows, toks)
        if going:
            nxt = torch.tensor([toks[j] for j in going], device=self.model.ctx_device)
            self.model.extend(nxt[:, None], self.cache, [idx[j] for j in going], snapshot=True)
            for k, j in enumerate(going):
                rows[j].last = nxt[k:k + 1].to(self.model.den_device)

    def _finish(self, r: _Row, reason: str) -> None:
        r.finished = True
        r.h._finish(reason)
        self.metrics.request_done(r.h)
