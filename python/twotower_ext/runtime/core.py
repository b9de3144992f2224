"""The decode core: the one decode loop that `TwoTowerLM.generate` and the server both drive (vLLM's
EngineCore). `submit` queues requests from any thread; `step` runs one iteration on the thread that owns the
core: the policy's plan (policy.py), the model runner's passes and its one readback (runner.py), the
policy's update (the decode rules on the host). `generate` submits its rows and steps until they are done
(llm.py); the server's thread steps forever (serve/loop.py).

Host work per iteration does not grow with the rows: one pass and one commit call per group, one small
device-to-host copy, and per-row Python only for rows that emit a block or token."""
from __future__ import annotations

import threading

from .params import DecodeParams, ParamError
from .policy import Policy
from .request import Request
from .runner import ModelRunner
from .text import RequestText


class DecodeCore:
    """max_rows: cache rows (requests decoded at once); max_len: context tokens a row may hold (prompt and
    every token appended to the context); max_queue: requests waiting beyond the free rows (QueueFull past
    it); snapshot: keep the Mamba states mock-AR reads (needed for mock-AR requests); metrics: an object with
    pass_done(rows), tokens_emitted(request, n) and request_done(request) (serve/metrics.py), or None;
    tokenizer: for requests that build their text (DecodeParams.detokenize, stop strings); prefix_cache: a
    prefix_store.PrefixStore of this model (prompts that start like a cached one prefill only the rest), or
    None."""

    def __init__(self, model, max_rows: int, max_len: int, max_queue: int = 0, snapshot: bool = True,
                 cuda_graphs: bool = True, metrics=None, tokenizer=None, prefix_cache=None):
        for name, v, lo in (("max_rows", max_rows, 1), ("max_queue", max_queue, 0), ("max_len", max_len, 2)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        self.model, self.vocab = model, model.config.vocab_size
        self.policy = Policy(max_rows, max_queue)
        self.runner = ModelRunner(model, max_rows, max_len, snapshot, cuda_graphs, prefix_cache)
        self.metrics = metrics
        self.cuda_graphs = cuda_graphs
        self.tokenizer = tokenizer               # for requests that build their text (stop strings)
        self._lock = threading.Lock()          # submit (any thread) against schedule (the stepping thread)
        self._stepping = threading.Lock()      # one step at a time

    @property
    def max_rows(self) -> int:
        return self.policy.max_rows

    @property
    def max_len(self) -> int:
        return self.runner.max_len

    def check(self, prompt: list[int], params: DecodeParams, lockstep: bool = False) -> None:
        """Raise ParamError when this core cannot take the request (context too long, mock-AR without the
        snapshot states)."""
        need = params.context_tokens(len(prompt), lockstep)
        if need > self.max_len:
            raise ParamError("max_new_tokens", f"max_new_tokens: the prompt ({len(prompt)} tokens) plus "
                             f"max_new_tokens={params.max_new_tokens} need {need} tokens of context, more than "
                             f"this decoder's max_len={self.max_len}")
        if params.mode == "mock_ar" and not self.runner.snapshot:
            raise ParamError("mode", "mode: mock_ar needs a core whose cache keeps snapshot states")
        if params.wants_text and self.tokenizer is None:
            raise ParamError("stop" if params.stop else "detokenize", f"{'stop' if params.stop else 'detokenize'}: "
                             "text needs the checkpoint's tokenizer (this model has none; use stop_token_ids)")

    def submit(self, requests: list[Request], lockstep: dict | None = None) -> None:
        """Queue requests (checked with `check`); lockstep = {"compat": bool, "device_loop": bool} makes them
        one lockstep batch (they must share mode, block size and mask id). Raises ParamError or QueueFull."""
        for r in requests:
            self.check(r.prompt, r.params, lockstep is not None)
        if lockstep is not None and len({Policy.group_of(r) for r in requests}) > 1:
            raise ParamError("mode", "a lockstep batch (reference_compat / device_loop) needs one mode, block "
                                     "size and mask id for every row")
        for r in requests:
            if r.params.wants_text:
                r.text = RequestText(self.tokenizer, r.params.stop)
        with self._lock:
            self.policy.enqueue(requests, lockstep)

    def has_work(self) -> bool:
        with self._lock:
            return self.policy.has_work()

    def load(self) -> dict:
        with self._lock:
            return {"live_rows": self.policy.live, "queue_depth": self.policy.queued}

    def step(self) -> bool:
        """One iteration. Returns whether work remains. A failed prefill or pass fails its requests (with the
        error), never the other rows."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError("DecodeCore.step is already running on another thread (one thread steps a core)")
        try:
            with self._lock:
                plan = self.policy.schedule()
            for reqs, e in self.runner.apply(plan):
                for r in reqs:
                    self.policy.end(r, "error", e)
            groups = [g for g in plan.groups if any(r.state != "finished" for r in g.requests)]
            outs, failures = self.runner.execute(groups)
            for g, out in outs:
                self.policy.update(g, out)
                if self.metrics is not None:
                    self.metrics.pass_done(len(g.requests))
            for g, e in failures:
                for r in g.requests:
                    self.policy.end(r, "error", e)
            emitted, finished = self.policy.take_emitted(), self.policy.take_finished()
            if self.metrics is not None:
                for r, n in emitted:
                    self.metrics.tokens_emitted(r, n)
                for r in finished:
                    self.metrics.request_done(r)
            with self._lock:
                return self.policy.has_work()
        finally:
            self._stepping.release()

    def drain(self, reason: str = "cancelled") -> None:
        """Finish every queued and running request (with `reason`); the core is left empty."""
        with self._lock:
            self.policy.drain(reason)
            finished = self.policy.take_finished()
        if self.metrics is not None:
            for r in finished:
                self.metrics.request_done(r)

    def stats(self) -> dict:
        """Counters of the runner: passes executed, graphs captured and the time capturing took; with a prefix
        cache its counters (prefix_cache.PrefixCache.stats: prompt tokens looked up and found, entries, bytes)."""
        g = self.runner.graphs
        return {"executed_passes": self.runner.executed_passes, "cuda_graphs": g is not None,
                "graphs_captured": 0 if g is None else len(g.graphs), "capture_s": 0.0 if g is None else g.capture_s,
                "device_loop": self.runner.device_loop_kind, **self.runner.clock.s, **self.prefix_stats()}

    def prefix_stats(self) -> dict:
        """The prefix cache's counters ({} without one); read from any thread (the metrics endpoint)."""
        p = self.runner.prefix
        return {} if p is None else p.stats()
