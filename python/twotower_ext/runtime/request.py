"""A request's state in the decode core: its parameters, its output so far, its progress through blocks and
the events its client waits on. No torch: the policy (policy.py) moves requests through their states; the
model runner (runner.py) never sees this class.

Life: WAITING (queued) -> RUNNING (holds a cache row) -> FINISHED (finish_reason "stop" (EOS), "length",
"cancelled" or "error"). A client reads it with `result()` (blocking), `events()` (("tokens", new_ids) ...
("done", request)), or its own `sink` (called on the decoding thread with each event; must not block).
A tokens event is ("tokens", new_ids, new_text): new_text is None unless the request asked for its text
(DecodeParams.detokenize or stop strings); then the text of every event, joined, is `output_text`."""
from __future__ import annotations

import itertools
import queue
import threading
import time

from .params import DecodeParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
_ids = itertools.count()


class Request:
    def __init__(self, prompt: list[int], params: DecodeParams, sink=None, request_id: str | None = None,
                 lockstep: bool = False):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt, self.params = prompt, params
        self.lockstep = lockstep            # reference_compat: NVIDIA's batch semantics with its group
        self.state = WAITING
        self.tokens: list[int] = []          # generated ids (EOS included when it stopped there)
        self.nfe = 0                         # forward passes this request took part in
        self.nfe_per_block: list[int] = []   # diffusion: passes of each block
        self.commits_per_step: list[list[int]] = []   # diffusion: per block, tokens committed by each pass
        self.logprobs: list[float] = []      # params.logprobs set: each token's log-probability (written before
        self.top_logprobs: list[list[tuple[int, float]]] = []   # its tokens event), its k likeliest alternatives
        self.finish_reason: str | None = None
        self.error: str | None = None        # the message of a failure
        self.exception: BaseException | None = None
        self.row = -1                        # its cache row while RUNNING (the policy's)
        self.group_key: tuple | None = None
        self.on_cancel = None                # the policy's note that a cancel arrived
        self.text = None                     # params.wants_text: its RequestText (runtime/text.py), from the core
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None    # first committed block / token
        self.t_done: float | None = None
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._q: queue.Queue | None = None if sink is not None else queue.Queue()
        self._sink = sink if sink is not None else self._q.put

    @property
    def args(self) -> DecodeParams:   # the name the serving layer has always used
        return self.params

    # client side -------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the core to drop this request (its row is freed before the next pass)."""
        self._cancel.set()
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> "Request":
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.id}: not finished after {timeout} s")
        if self.finish_reason == "error":
            raise RuntimeError(f"{self.id}: {self.error}")
        return self

    def events(self, timeout: float | None = None):
        if self._q is None:
            raise RuntimeError("this request delivers its events to its own sink")
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev[0] == "done":
                return

    # core side -----------------------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)

    @property
    def output_text(self) -> str | None:
        return None if self.text is None else self.text.text

    def emit(self, new: list[int], text: str | None = None) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.tokens.extend(new)
        self._post(("tokens", list(new), text))

    def finish(self, reason: str, error: BaseException | str | None = None) -> None:
        if self._done.is_set():
            return
        self.state = FINISHED
        if self.text is not None and reason in ("stop", "length"):   # the text held back for stop strings
            tail = self.text.finish()
            if tail:
                self._post(("tokens", [], tail))
        if isinstance(error, BaseException):
            self.exception, error = error, f"{type(error).__name__}: {error}"
        self.finish_reason, self.error, self.t_done = reason, error, time.perf_counter()
        self._done.set()
        self._post(("done", self))

    def _post(self, ev) -> None:
        try:
            self._sink(ev)
        except Exception:  # noqa: BLE001  (a client that cannot take events any more: it has gone)
            self.cancel()
