"""The fleet's settings: one dict for the application builder (`build_app(args)`, the `args:` of a Ray Serve
config file) and for `twotower serve --ray`, checked here so that a bad one is a one-line error naming it."""
from __future__ import annotations

import dataclasses

from .policy import DEFAULT_PREFIX_CHARS, DEFAULT_PREFIX_TOKENS


@dataclasses.dataclass(frozen=True)
class FleetOptions:
    model: str | None = None          # checkpoint directory (None: the model shipped with the package)
    name: str | None = None           # model id in the API (None: the checkpoint directory's name)
    dtype: str = "fp32"
    experts: str = "bf16"
    gpus_per_replica: int = 0         # 0: CPU; 1: both towers on one GPU; 2: a tower on each
    threads: int = 0                  # CPU threads per replica (0: twotower_ext.threads' rule for the model)
    max_batch: int = 16               # per replica, as `twotower serve`
    max_queue: int = 64
    max_len: int = 1024
    prefix_cache_gb: float = 2.0      # per replica, as `twotower serve` (0: no prefix cache)
    replicas: int = 1                 # fixed count, or the initial count when autoscaling
    min_replicas: int | None = None   # autoscaling bounds (either one turns autoscaling on)
    max_replicas: int | None = None
    target_ongoing_requests: int | None = None   # autoscaling target per replica (None: max_batch)
    ingress_replicas: int = 1
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    prefix_tokens: int = DEFAULT_PREFIX_TOKENS
    max_imbalance: int | None = None  # routing bound, ongoing requests (None: max_batch)
    # the replicas' RequestRouter (import path; None: prefix affinity, router.PrefixAffinityRouter, with the
    # three settings above); e.g. ray.serve.experimental.round_robin_router.RoundRobinRouter to compare
    request_router: str | None = None
    retries: int = 2                  # re-sends of a request whose replica died before it answered anything
    metrics_period_s: float = 1.0     # how often each replica publishes its /metrics to the fleet's
    shutdown_timeout_s: float = 30.0  # a stopping replica's in-flight requests get this long to finish

    @classmethod
    def from_dict(cls, args: dict | None) -> "FleetOptions":
        args = dict(args or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        for k in args:
            if k not in known:
                raise ValueError(f"serve.ray: unknown argument {k!r} (known: {', '.join(known)})")
        opts = cls(**args)
        opts.check()
        return opts

    def check(self) -> None:
        def need(name, ok, what):
            if not ok:
                raise ValueError(f"serve.ray: {name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("model", "name", "request_router"):
            need(name, getattr(self, name) is None or isinstance(getattr(self, name), str), "a string")
        need("dtype", self.dtype in ("fp32", "bf16"), "fp32 or bf16")
        need("experts", self.experts in ("bf16", "fp8", "int4"), "bf16, fp8 or int4")
        need("gpus_per_replica", self.gpus_per_replica in (0, 1, 2) and is_int(self.gpus_per_replica), "0, 1 or 2")
        for name, lo in (("threads", 0), ("max_batch", 1), ("max_queue", 0), ("max_len", 2), ("replicas", 1),
                         ("ingress_replicas", 1), ("prefix_chars", 1), ("prefix_tokens", 1),
                         ("retries", 0)):
            need(name, is_int(getattr(self, name)) and getattr(self, name) >= lo, f"an int >= {lo}")
        for name in ("min_replicas", "max_replicas", "target_ongoing_requests", "max_imbalance"):
            v, lo = getattr(self, name), 0 if name in ("min_replicas", "max_imbalance") else 1
            need(name, v is None or (is_int(v) and v >= lo), f"None or an int >= {lo}")
        need("prefix_cache_gb", isinstance(self.prefix_cache_gb, (int, float)) and not isinstance(self.prefix_cache_gb, bool)
             and 0 <= self.prefix_cache_gb < float("inf"), "a number of GiB >= 0")
        for name in ("metrics_period_s", "shutdown_timeout_s"):
            v = getattr(self, name)
            need(name, isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0")
        if self.autoscaling:
            lo, hi = self.min_replicas or 0, self.max_replicas or max(self.replicas, self.min_replicas or 1)
            need("max_replicas", hi >= max(1, lo), f"an int >= min_replicas ({lo}) and >= 1")
            need("replicas", lo <= self.replicas <= hi, f"within [min_replicas, max_replicas] = [{lo}, {hi}]")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def autoscaling_config(self) -> dict | None:
        """Ray Serve's autoscaling_config for the replicas (None: a fixed count)."""
        if not self.autoscaling:
            return None
        return {"min_replicas": self.min_replicas or 0,
                "max_replicas": self.max_replicas or max(self.replicas, self.min_replicas or 1),
                "initial_replicas": self.replicas,
                "target_ongoing_requests": self.target_ongoing_requests or self.max_batch}

    @property
    def imbalance_bound(self) -> int:
        """How many more ongoing requests than the least loaded replica a prompt's replica may have."""
        return self.max_batch if self.max_imbalance is None else self.max_imbalance

    def devices(self) -> tuple[str, str | None]:
        """(device, denoiser_device) inside a replica (Ray shows it only its own GPUs, from cuda:0)."""
        return {0: ("cpu", None), 1: ("cuda:0", None), 2: ("cuda:0", "cuda:1")}[self.gpus_per_replica]
