"""The Ray Serve application: ingress -> replicas (prefix-affinity router) + the fleet's metrics board."""
from __future__ import annotations

import dataclasses

from ray.serve.config import RequestRouterConfig

from .ingress import TwoTowerIngress
from .options import FleetOptions
from .replica import MetricsBoard, TwoTowerReplica

ROUTER = "twotower_ext.serve.ray.router.PrefixAffinityRouter"


def build_app(args: dict | None = None):
    """The application for `serve.run` / a Ray Serve config file (`import_path:
    twotower_ext.serve.ray:build_app`, `args:` the fields of FleetOptions)."""
    opts = args if isinstance(args, FleetOptions) else FleetOptions.from_dict(args)
    threads = opts.threads or 1
    board = MetricsBoard.bind(3 * opts.metrics_period_s)
    scaling = ({"autoscaling_config": opts.autoscaling_config()} if opts.autoscaling
               else {"num_replicas": opts.replicas})
    replicas = TwoTowerReplica.options(
        ray_actor_options={"num_cpus": threads if opts.gpus_per_replica == 0 else 1, "num_gpus": opts.gpus_per_replica},
        # a replica takes what its scheduler holds (rows + queue); beyond that requests wait at the ingress,
        # max_queue of them per ingress replica, then 429
        max_ongoing_requests=opts.max_batch + opts.max_queue, max_queued_requests=opts.max_queue,
        graceful_shutdown_timeout_s=opts.shutdown_timeout_s,
        request_router_config=RequestRouterConfig(
            request_router_class=opts.request_router or ROUTER,
            request_router_kwargs={} if opts.request_router else {
                "prefix_chars": opts.prefix_chars, "prefix_tokens": opts.prefix_tokens,
                "max_imbalance": opts.imbalance_bound}),
        **scaling,
    ).bind(dataclasses.asdict(opts), board)
    return TwoTowerIngress.options(num_replicas=opts.ingress_replicas).bind(replicas, board, opts.retries)
