"""One serving request: its validated parameters, its output so far and the events a client waits on.

Parameters are the engine's own (`engine.GenerateArgs`, validated by it); the serving names of the fields
(`max_tokens`, `steps`, ...) map onto them so an error names the field the client sent.
"""
from __future__ import annotations

import itertools
import queue
import re
import threading
import time

from ..engine import GenerateArgs

# serving field -> GenerateArgs field
FIELDS = {"mode": "mode", "max_tokens": "max_new_tokens", "block_size": "block_size", "steps": "steps_per_block",
          "threshold": "threshold", "temperature": "temperature", "seed": "seed", "eos_token_id": "eos_token_id"}
_ENGINE_TO_FIELD = {v: k for k, v in FIELDS.items()}


class RequestError(ValueError):
    """A bad request parameter; `field` names it as the client spelled it."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the request was refused at once."""


class ShuttingDown(RuntimeError):
    """The scheduler has stopped accepting requests."""


def make_args(vocab_size: int, **params) -> GenerateArgs:
    """GenerateArgs from serving fields (unknown fields and wrong types are RequestErrors naming the field)."""
    kw = {}
    for name, value in params.items():
        if name not in FIELDS:
            raise RequestError(name, f"{name}: unknown parameter (known: {', '.join(FIELDS)})")
        if isinstance(value, bool) and name != "mode":    # JSON true is not an int here
            raise RequestError(name, f"{name} must be a number, got {value!r}")
        if name in ("threshold", "temperature") and isinstance(value, int):
            value = float(value)
        kw[FIELDS[name]] = value
    try:
        args = GenerateArgs(**kw)
        args.validate(vocab_size)
    except ValueError as e:   # "generate: <engine field> must be ..." -> the serving field
        m = re.match(r"generate: (\w+) (.*)", str(e))
        field = _ENGINE_TO_FIELD.get(m.group(1), m.group(1)) if m else None
        raise RequestError(field, f"{field} {m.group(2)}" if m else str(e)) from None
    if not isinstance(args.seed, int) or not 0 <= args.seed < 2**63:
        raise RequestError("seed", f"seed must be an int in [0, 2**63), got {args.seed!r}")
    return args


_ids = itertools.count()


class Handle:
    """A submitted request. The scheduler thread appends tokens and posts events; clients read them with
    `result()` (blocking), `events()` (an iterator of ("tokens", new_ids) ... ("done", self)), or their own
    `sink` (called on the scheduler thread with each event; must not block)."""

    def __init__(self, prompt: list[int], args: GenerateArgs, sink=None, request_id: str | None = None):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt, self.args = prompt, args
        self.tokens: list[int] = []          # generated ids (EOS included when it stopped there)
        self.nfe = 0                         # forward passes this request took part in
        self.finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled", "error"
        self.error: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None    # first committed block / token
        self.t_done: float | None = None
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._q: queue.Queue | None = None if sink is not None else queue.Queue()
        self._sink = sink if sink is not None else self._q.put

    # client side -------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the scheduler to drop this request (its row is freed before the next pass)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> "Handle":
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id}: not finished after {timeout} s")
        if self.finish_reason == "error":
            raise RuntimeError(f"{self.id}: {self.error}")
        return self

    def events(self, timeout: float | None = None):
        if self._q is None:
            raise RuntimeError("this handle delivers its events to its own sink")
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev[0] == "done":
                return

    # scheduler side ----------------------------------------------------------------------------------
    def _emit(self, new: list[int]) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.tokens.extend(new)
        self._sink(("tokens", list(new)))

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error, self.t_done = reason, error, time.perf_counter()
        self._done.set()
        self._sink(("done", self))
