"""Serving metrics through prometheus_client, one registry per server (never the process-wide default, so
several servers or tests in one process do not collide). The scheduler thread calls the update methods,
the HTTP thread renders `text()`.

Names follow vLLM's (`vllm:` -> `twotower:`) where the meaning is the same, with a `model_name` label:
num_requests_running / num_requests_waiting (gauges), prompt_tokens_total / generation_tokens_total,
request_success_total{finished_reason="stop"|"length"|"abort"}, time_to_first_token_seconds,
inter_token_latency_seconds, e2e_request_latency_seconds, request_time_per_output_token_seconds,
request_prompt_tokens / request_generation_tokens (histograms). As in vLLM, a "token" event of ITL is one
engine output of a request: in diffusion mode a committed block, so ITL is the time between blocks there.
This server's own series: requests_rejected_total{reason}, request_errors_total, nfe_total (forward passes
per request, summed), passes_total and rows_per_pass (batched forward passes), and for diffusion
denoiser_passes_per_block and tokens_per_pass (per committed block). With a prefix cache, vLLM's
prefix_cache_queries_total / prefix_cache_hits_total (prompt tokens looked up / found) and the memory it
holds, prefix_cache_usage_bytes of prefix_cache_budget_bytes, read from the decode core at each scrape.
"""
from __future__ import annotations

import threading
import time

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"serving needs the serve extra: pip install 'twotower_ext[serve]' (prometheus_client) ({e})") from None

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
PREFIX = "twotower:"
# vLLM's buckets for the latency series
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PASS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
TOKENS_PER_PASS_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
SUCCESS_REASON = {"stop": "stop", "length": "length", "cancelled": "abort"}   # ours -> vLLM's finished_reason
# the prefix cache's series: (name, kind, DecodeCore.prefix_stats key, help)
PREFIX_CACHE_SERIES = (
    ("prefix_cache_queries", "counter", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "counter", "prefix_cache_hits", "Prompt tokens whose context state came from the prefix cache."),
    ("prefix_cache_usage_bytes", "gauge", "prefix_cache_bytes", "Memory the prefix cache's entries hold."),
    ("prefix_cache_budget_bytes", "gauge", "prefix_cache_budget_bytes", "The prefix cache's memory budget."),
)


class Metrics:
    """Metrics of one server. `model_name` labels every series."""

    def __init__(self, model_name: str = "twotower"):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        L = ["model_name"]

        def counter(name, help_, labels=()):
            return Counter(PREFIX + name, help_, [*L, *labels], registry=r)

        def hist(name, help_, buckets):
            return Histogram(PREFIX + name, help_, L, buckets=buckets, registry=r).labels(model_name)

        def gauge(name, help_):
            return Gauge(PREFIX + name, help_, L, registry=r).labels(model_name)

        self._running = gauge("num_requests_running", "Requests holding a cache row.")
        self._waiting = gauge("num_requests_waiting", "Requests waiting for a cache row.")
        self._prompt = counter("prompt_tokens", "Prompt tokens prefilled (of requests that reached a pass).").labels(model_name)
        self._generation = counter("generation_tokens", "Generated tokens.").labels(model_name)
        self._success = counter("request_success", "Finished requests by finished_reason (abort: cancelled).",
                                ["finished_reason"])
        self._errors = counter("request_errors", "Requests whose pass failed.").labels(model_name)
        self._rejected = counter("requests_rejected", "Requests refused at submit (queue_full, shutting_down).",
                                 ["reason"])
        self._nfe = counter("nfe", "Forward passes per request, summed over finished requests.").labels(model_name)
        self._passes = counter("passes", "Batched forward passes (denoiser, AR step or mock-AR) run.").labels(model_name)
        self._rows = hist("rows_per_pass", "Rows per batched forward pass.", ROW_BUCKETS)
        self._ttft = hist("time_to_first_token_seconds", "Submit to the first committed block (token in AR modes).",
                          TTFT_BUCKETS)
        self._itl = hist("inter_token_latency_seconds", "Time between a request's outputs (committed blocks in "
                         "diffusion, tokens in AR modes).", ITL_BUCKETS)
        self._e2e = hist("e2e_request_latency_seconds", "Submit to finish of requests that stopped or hit max_tokens.",
                         E2E_BUCKETS)
        self._tpot = hist("request_time_per_output_token_seconds", "First to last output of a request over its "
                          "generated tokens after the first output.", ITL_BUCKETS)
        self._req_prompt = hist("request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_BUCKETS)
        self._req_gen = hist("request_generation_tokens", "Generated tokens per finished request.", TOKEN_BUCKETS)
        self._block_passes = hist("denoiser_passes_per_block", "Denoiser passes a committed block took (diffusion).",
                                  PASS_BUCKETS)
        self._tokens_per_pass = hist("tokens_per_pass", "Tokens a committed block kept over its denoiser passes "
                                     "(diffusion).", TOKENS_PER_PASS_BUCKETS)
        self._lock = threading.Lock()
        self._last: dict[int, tuple[float, int, int]] = {}   # id(handle) -> (time, nfe, tokens) at its last output
        self.prefix_stats = None   # the core's prefix-cache counters (DecodeCore.prefix_stats), set by the Scheduler
        r.register(_PrefixCacheCollector(self))

    # called by the scheduler ----------------------------------------------------------------------------
    def tokens_emitted(self, h, n: int) -> None:
        """Handle h has just output n more tokens (its nfe already counts the pass that committed them)."""
        now = time.perf_counter()
        self._generation.inc(n)
        with self._lock:
            last = self._last.get(id(h))
            self._last[id(h)] = (now, h.nfe, len(h.tokens))
        if last is None:
            self._ttft.observe(now - h.t_submit)
            passes = h.nfe
        else:
            self._itl.observe(now - last[0])
            passes = h.nfe - last[1]
        if h.args.mode == "diffusion" and passes > 0:
            self._block_passes.observe(passes)
            self._tokens_per_pass.observe(n / passes)

    def request_done(self, h) -> None:
        with self._lock:
            last = self._last.pop(id(h), None)
        reason = h.finish_reason
        if reason in SUCCESS_REASON:
            self._success.labels(self.model_name, SUCCESS_REASON[reason]).inc()
        else:
            self._errors.inc()
        if h.nfe:   # it was prefilled
            self._prompt.inc(len(h.prompt))
            self._nfe.inc(h.nfe)
        if reason in ("stop", "length"):
            self._e2e.observe(h.t_done - h.t_submit)
            self._req_prompt.observe(len(h.prompt))
            self._req_gen.observe(len(h.tokens))
            if last is not None and h.t_first is not None and len(h.tokens) > 1:
                self._tpot.observe((last[0] - h.t_first) / (len(h.tokens) - 1))

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def pass_done(self, rows: int) -> None:
        self._passes.inc()
        self._rows.observe(rows)

    def set_load(self, queue_depth: int, live_rows: int) -> None:
        self._waiting.set(queue_depth)
        self._running.set(live_rows)

    # read -------------------------------------------------------------------------------------------------
    def text(self) -> str:
        """The Prometheus text exposition (format 0.0.4, CONTENT_TYPE)."""
        return generate_latest(self.registry).decode()

    def value(self, name: str, **labels) -> float:
        """One sample's current value (name without the prefix, e.g. "passes_total"; 0 when absent)."""
        v = self.registry.get_sample_value(PREFIX + name, {"model_name": self.model_name, **labels})
        return 0.0 if v is None else v

    @property
    def requests(self) -> dict[str, int]:
        """Finished and refused requests by outcome: stop, length, cancelled, error, queue_full, shutting_down
        (outcomes with none left out)."""
        out = {ours: self.value("request_success_total", finished_reason=theirs)
               for ours, theirs in SUCCESS_REASON.items()}
        out["error"] = self.value("request_errors_total")
        for reason in ("queue_full", "shutting_down"):
            out[reason] = self.value("requests_rejected_total", reason=reason)
        return {k: int(v) for k, v in out.items() if v}


class _PrefixCacheCollector:
    """The prefix cache's series, read from the decode core when scraped (nothing without a cache)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        stats = m.prefix_stats() if m.prefix_stats is not None else {}
        for name, kind, key, help_ in PREFIX_CACHE_SERIES if stats else ():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(PREFIX + name, help_,
                                                                                       labels=["model_name"])
            family.add_metric([m.model_name], stats[key])
            yield family
