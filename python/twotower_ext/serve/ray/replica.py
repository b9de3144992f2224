"""A replica: one model and one `Scheduler` on the replica's own device(s), serving `serve.http.create_app`'s
app to the ingress (forwarded requests in, ASGI messages out), and publishing its `/metrics` with a
`replica` label to the fleet's metrics board."""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from .asgi import run_asgi, with_header
from .exposition import label_samples, merge_expositions
from .options import FleetOptions

REPLICA_HEADER = "x-twotower-replica"   # on every response: the replica (Ray Serve replica id) that answered it
log = logging.getLogger("twotower.serve.ray")


def load_scheduler(opts: FleetOptions):
    """The model of `opts` on this replica's device(s) and a Scheduler over it, with the threads
    `twotower serve` would use."""
    import os

    import torch

    from ... import default_model_path
    from ...api import load
    from ...threads import cap_threads, recommended_threads
    from ..metrics import Metrics
    from ..scheduler import Scheduler

    path = opts.model or default_model_path()
    if path is None:
        raise ValueError("serve.ray: no model given and this installation ships no default model")
    device, denoiser_device = opts.devices()
    lm = load(path, device=device, dtype=opts.dtype, denoiser_device=denoiser_device, experts=opts.experts)
    threads = cap_threads(opts.threads) if opts.threads else recommended_threads(lm.config, device)
    if threads:
        torch.set_num_threads(threads)   # process-wide: the replica is its own process
    name = opts.name or os.path.basename(os.path.normpath(path))
    return Scheduler(lm, max_batch=opts.max_batch, max_queue=opts.max_queue, max_len=opts.max_len,
                     metrics=Metrics(name), prefix_cache_gb=opts.prefix_cache_gb), name


@serve.deployment(name="TwoTowerReplica")
class TwoTowerReplica:
    def __init__(self, options: dict, board):
        from ..http import create_app

        self.opts = FleetOptions.from_dict(options)
        self.scheduler, name = load_scheduler(self.opts)
        self.app = create_app(self.scheduler, name)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.board = board
        self.publisher: asyncio.Task | None = None

    async def http(self, scope: dict, body: bytes):
        """Run one forwarded request through the app; yields its ASGI messages (streamed to the ingress)."""
        self.start_publishing()
        async for message in run_asgi(self.app, scope, body):
            if message["type"] == "http.response.start":
                message = with_header(message, REPLICA_HEADER, self.replica)
            yield message

    async def metrics_text(self) -> str:
        """This replica's /metrics, every sample labelled replica="<id>"."""
        body = b"".join([m.get("body", b"") async for m in run_asgi(self.app, get_scope("/metrics"), b"")
                         if m["type"] == "http.response.body"])
        return label_samples(body.decode(), {"replica": self.replica})

    def start_publishing(self) -> None:
        if self.publisher is None or self.publisher.done():
            self.publisher = asyncio.get_running_loop().create_task(self.publish())

    async def publish(self) -> None:
        while True:
            try:
                await self.board.put.remote(self.replica, await self.metrics_text())
            except Exception as e:  # noqa: BLE001  (the board restarting: the next period publishes again)
                log.warning("twotower replica %s: publishing /metrics failed: %s", self.replica, e)
            await asyncio.sleep(self.opts.metrics_period_s)

    async def check_health(self) -> None:
        """Ray's periodic health check (the first comes right after the constructor): a scheduler that has
        stopped accepting outside a shutdown fails it, and Ray replaces the replica."""
        self.start_publishing()
        if not self.scheduler.load()["accepting"]:
            raise RuntimeError(f"replica {self.replica}: the scheduler no longer accepts requests")

    def __del__(self):   # Ray Serve's graceful shutdown, after ongoing requests finished or timed out
        if getattr(self, "publisher", None) is not None:
            self.publisher.cancel()
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.shutdown(grace_s=0.0)


def get_scope(path: str) -> dict:
    """The scope of a plain GET of `path` (what the replica asks its own app)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
            "server": ("127.0.0.1", 0), "client": ("127.0.0.1", 0)}


@serve.deployment(name="TwoTowerMetrics", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  logging_config={"enable_access_log": False})   # a put per replica per second: not worth a line
class MetricsBoard:
    """The fleet's /metrics: the last text each replica published, for `stale_s` seconds (a dead replica's
    series leave with it; its replacement publishes under its own id)."""

    def __init__(self, stale_s: float):
        self.stale_s = stale_s
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def text(self) -> str:
        now = time.monotonic()
        self.texts = {r: (t, s) for r, (t, s) in self.texts.items() if now - t <= self.stale_s}
        return merge_expositions([s for _, (_, s) in sorted(self.texts.items())])
