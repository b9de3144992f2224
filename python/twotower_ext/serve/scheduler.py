"""The serving scheduler: one thread steps a decode core (runtime/core.py) for as long as the server runs;
`submit` queues requests from any thread (HTTP handlers, benches, tests).

Everything about batching lives in the core, the same code `generate` runs: per-row parameters as tensors,
groups of rows as contiguous slices of the cache, CUDA graphs per padded batch bucket, one readback per
iteration. A row's result is the one `generate` gives that row alone."""
from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref

import torch

from ..runtime import DecodeCore, ParamError, QueueFull, Request
from ..runtime.params import normalize_prompts
from ..runtime.prefix_store import PrefixStore, budget_bytes
from .metrics import Metrics
from .request import RequestError, ShuttingDown, make_args, request_error

log = logging.getLogger("twotower.serve")
_live: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


class Scheduler:
    """Owns `lm` (a TwoTowerLM)'s decode core on its own thread; `submit` from any thread.

    max_batch: cache rows (live requests at once); max_queue: waiting requests beyond them (a submit past it
    raises QueueFull at once); max_len: tokens of context a row may hold (prompt + every appended token);
    prefix_cache_gb: GiB for a prefix cache (0: none; `twotower serve` turns one on by default).
    A process that ends without calling `shutdown()` stops the thread at exit (its requests are cancelled)."""

    def __init__(self, lm, max_batch: int = 8, max_queue: int = 64, max_len: int = 1024, metrics: Metrics | None = None,
                 cuda_graphs: bool = True, prefix_cache_gb: float = 0.0):
        for name, v, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("max_len", max_len, 2)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"serve: {name} must be an int >= {lo}, got {v!r}")
        self.lm, self.model = lm, lm.model
        self.cfg = self.model.config
        self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
        self.metrics = metrics or Metrics()
        budget = budget_bytes(prefix_cache_gb, "serve: prefix_cache_gb")
        try:   # snapshot=True: mock-AR rows need the pre-extension Mamba states; the others ignore them
            self.core = DecodeCore(self.model, max_batch, max_len, max_queue, snapshot=True, cuda_graphs=cuda_graphs,
                                   metrics=self.metrics, tokenizer=lm.tokenizer,
                                   prefix_cache=PrefixStore(self.model, budget) if budget else None)
        except MemoryError as e:
            raise MemoryError(f"serve: {e} (lower --max-batch, --max-len or --prefix-cache-gb)") from None
        self.metrics.prefix_stats = self.core.prefix_stats
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="twotower-scheduler", daemon=True)
        self._thread.start()
        _live.add(self)

    # ------------------------------------------------------------------------------------------------
    # client side

    def submit(self, prompt, sink=None, request_id: str | None = None, **params) -> Request:
        """Queue a request: prompt token ids (or text, with a tokenizer) and serving parameters (see
        request.FIELDS). Raises RequestError (naming the field), QueueFull or ShuttingDown at once."""
        if not self._accepting:
            self.metrics.rejected("shutting_down")
            raise ShuttingDown("the server is shutting down")
        ids = self._prompt_ids(prompt)
        req = Request(ids, make_args(self.cfg.vocab_size, **params), sink, request_id)
        with self._cv:
            if not self._accepting:
                self.metrics.rejected("shutting_down")
                raise ShuttingDown("the server is shutting down")
            try:
                self.core.submit([req])
            except ParamError as e:
                raise request_error(e) from None
            except QueueFull:
                self.metrics.rejected("queue_full")
                raise
            self.metrics.set_load(**self._load())
            self._cv.notify()
        return req

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.lm.tokenizer is None:
                raise RequestError("prompt", "prompt: this model has no tokenizer; send token ids")
            ids = self.lm.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in prompt):
            ids = list(prompt)
        else:
            raise RequestError("prompt", "prompt must be a string or a list of token ids")
        try:   # the core's checks: non-empty, ids in [0, vocab)
            return normalize_prompts([ids], self.cfg.vocab_size)[0]
        except ValueError as e:
            raise RequestError("prompt", str(e).replace("prompt 0", "prompt")) from None

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let the queued and live requests finish for up to grace_s seconds, cancel the
        rest, and stop the thread."""
        self.stop_accepting()
        end = time.monotonic() + grace_s
        with self._cv:
            while self.core.has_work() and self._thread.is_alive():
                if not self._cv.wait(timeout=max(0.0, min(0.05, end - time.monotonic()))) and time.monotonic() >= end:
                    break
            self._stop = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _load(self) -> dict:
        c = self.core.load()
        return {"queue_depth": c["queue_depth"], "live_rows": c["live_rows"]}

    def load(self) -> dict:
        with self._cv:
            return {**self._load(), "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "max_len": self.max_len, "accepting": self._accepting}

    # ------------------------------------------------------------------------------------------------
    # the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self.core.has_work():
                        self._cv.wait()
                    if self._stop:
                        break
                try:
                    self.core.step()
                except Exception as e:  # noqa: BLE001  (a bug in the core: fail what is live, keep serving)
                    log.error("twotower serve: an iteration failed (%s: %s); its requests are failed",
                              type(e).__name__, e)
                    self.core.drain("error")
                with self._cv:
                    self.metrics.set_load(**self._load())
                    self._cv.notify_all()
            self.core.drain("cancelled")
            with self._cv:
                self.metrics.set_load(**self._load())


@atexit.register
def _stop_at_exit() -> None:
    """A script that never called shutdown(): stop every scheduler thread before the interpreter tears down
    (a daemon thread killed inside a torch op aborts the process)."""
    for s in list(_live):
        s.shutdown(grace_s=0.0)
