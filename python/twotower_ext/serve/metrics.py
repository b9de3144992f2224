"""Serving metrics in the Prometheus text exposition format (version 0.0.4), written by hand: counters,
gauges and cumulative histograms, updated from the scheduler thread and read from the HTTP thread."""
from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip((*self.buckets, "+Inf"), self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        return out + [f"{name}_sum {self.sum:.6g}", f"{name}_count {self.n}"]


class Metrics:
    PREFIX = "twotower"

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}     # by finish reason (stop, length, cancelled, error, rejected)
        self.prompt_tokens = self.generated_tokens = self.nfe = self.passes = 0
        self.queue_depth = self.live_rows = 0
        self.batch = Histogram(BATCH_BUCKETS)          # rows per forward pass
        self.ttfb = Histogram(LATENCY_BUCKETS)         # submit -> first committed block / token
        self.latency = Histogram(LATENCY_BUCKETS)      # submit -> finished
        self.prefix_stats = None   # the core's prefix-cache counters (DecodeCore.prefix_stats), set by the Scheduler

    def request_done(self, h) -> None:
        with self._lock:
            self.requests[h.finish_reason] = self.requests.get(h.finish_reason, 0) + 1
            self.prompt_tokens += len(h.prompt)
            self.generated_tokens += len(h.tokens)
            self.nfe += h.nfe
            if h.t_first is not None:
                self.ttfb.observe(h.t_first - h.t_submit)
            if h.finish_reason in ("stop", "length"):
                self.latency.observe(h.t_done - h.t_submit)

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def pass_done(self, rows: int) -> None:
        with self._lock:
            self.passes += 1
            self.batch.observe(rows)

    def set_load(self, queue_depth: int, live_rows: int) -> None:
        with self._lock:
            self.queue_depth, self.live_rows = queue_depth, live_rows

    def text(self) -> str:
        p = self.PREFIX
        with self._lock:
            out = [f"# HELP {p}_requests_total Finished requests by outcome.", f"# TYPE {p}_requests_total counter"]
            out += [f'{p}_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())]

            def scalar(name, kind, help_, v):
                out.extend([f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {v}"])

            scalar("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
            scalar("generated_tokens_total", "counter", "Generated tokens of finished requests.", self.generated_tokens)
            scalar("nfe_total", "counter", "Forward passes per request, summed over finished requests.", self.nfe)
            scalar("tokens_per_nfe", "gauge", "Generated tokens per forward pass over finished requests.",
                   f"{self.generated_tokens / self.nfe:.6g}" if self.nfe else 0)
            scalar("passes_total", "counter", "Batched forward passes (denoiser, AR or mock-AR) run.", self.passes)
            scalar("queue_depth", "gauge", "Requests waiting for a cache row.", self.queue_depth)
            scalar("live_rows", "gauge", "Requests holding a cache row.", self.live_rows)
            for name, h, help_ in (("batch_rows", self.batch, "Rows per batched forward pass."),
                                   ("time_to_first_block_seconds", self.ttfb,
                                    "Submit to first committed block (token in AR modes)."),
                                   ("request_latency_seconds", self.latency, "Submit to finish of completed requests.")):
                out += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} histogram", *h.lines(f"{p}_{name}")]
        pc = self.prefix_stats() if self.prefix_stats is not None else {}
        for name, kind, key, help_ in PREFIX_SERIES if pc else ():   # vLLM's names (prefix_cache_queries / hits)
            out.extend([f"# HELP {p}:{name} {help_}", f"# TYPE {p}:{name} {kind}", f"{p}:{name} {pc[key]}"])
        return "\n".join(out) + "\n"


PREFIX_SERIES = (
    ("prefix_cache_queries_total", "counter", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits_total", "counter", "prefix_cache_hits", "Prompt tokens whose context state came from the prefix cache."),
    ("prefix_cache_usage_bytes", "gauge", "prefix_cache_bytes", "Memory the prefix cache's entries hold."),
    ("prefix_cache_budget_bytes", "gauge", "prefix_cache_budget_bytes", "The prefix cache's memory budget."),
)
