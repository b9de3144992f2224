"""`twotower serve --ray`: the same server as N replicas on Ray Serve (this machine, or a Ray cluster with
--ray-address), until SIGTERM / Ctrl-C; then the application is deleted (in-flight requests get up to
--shutdown-timeout seconds) and, where it was started here, Ray with it."""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading

APP_NAME = "twotower"


def _positive(v: str) -> int:
    import argparse

    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {v!r}")
    return n


def add_ray_arguments(s) -> None:
    g = s.add_argument_group("replicas on Ray Serve (needs the ray extra: pip install 'twotower_ext[ray]')")
    g.add_argument("--ray", action="store_true", help="serve with Ray Serve: --replicas replicas, each with its own "
                   "model and scheduler, requests that share a prompt prefix routed to the same replica")
    g.add_argument("--ray-address", help="the Ray cluster to join ('auto': the one `ray start` began on this "
                   "machine; HOST:PORT: its head); default: a Ray instance of this machine alone, on 127.0.0.1")
    g.add_argument("--replicas", type=_positive, default=1, help="replicas (with autoscaling: how many to start)")
    g.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (either bound turns it on)")
    g.add_argument("--max-replicas", type=_positive, help="autoscaling: most replicas")
    g.add_argument("--target-ongoing-requests", type=_positive,
                   help="autoscaling: ongoing requests per replica to scale towards (default: --max-batch)")
    g.add_argument("--gpus-per-replica", type=int, choices=[0, 1, 2], help="0: CPU replicas (--threads each); 1: both "
                   "towers on one GPU; 2: a tower on each of two GPUs (default: 0 for --device cpu, else 1)")
    g.add_argument("--prefix-chars", type=_positive, default=None,
                   help="routing: characters of a text prompt's head that key its replica (default 256)")
    g.add_argument("--prefix-tokens", type=_positive, default=None,
                   help="routing: token ids of a token-id prompt's head that key its replica (default 64)")
    g.add_argument("--max-imbalance", type=int, default=None, help="routing: how many more ongoing requests than the "
                   "least loaded replica a prompt's own replica may have; past that the least loaded one takes it "
                   "(default: --max-batch)")


def fleet_options(a) -> dict:
    """FleetOptions' fields from `twotower serve` arguments."""
    opts = {"model": a.model, "name": a.name, "dtype": a.dtype, "experts": a.experts, "threads": a.threads,
            "max_batch": a.max_batch, "max_queue": a.max_queue, "max_len": a.max_len, "replicas": a.replicas,
            "prefix_cache_gb": 0.0 if a.no_prefix_cache else a.prefix_cache_gb,
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests, "shutdown_timeout_s": a.shutdown_timeout,
            "gpus_per_replica": a.gpus_per_replica if a.gpus_per_replica is not None else int(a.device != "cpu")}
    for k in ("prefix_chars", "prefix_tokens", "max_imbalance"):
        if getattr(a, k) is not None:
            opts[k] = getattr(a, k)
    return opts


def run_ray(a) -> int:
    if importlib.util.find_spec("ray") is None:
        raise SystemExit("twotower: serve --ray needs the ray extra: pip install 'twotower_ext[ray]'")
    from .local import local_cluster
    from .options import FleetOptions

    opts = FleetOptions.from_dict(fleet_options(a))
    if a.model is not None and a.ray_address is None and not os.path.exists(os.path.join(a.model, "config.json")):
        raise ValueError(f"serve: --model {a.model!r} is not a checkpoint directory (no config.json)")
    if a.ray_address is None:
        # logical CPUs to place replicas by: at least what the replicas reserve (oversubscribing a small machine
        # rather than leaving replicas pending)
        need = (opts.max_replicas or opts.replicas) * (opts.threads or 1) if opts.gpus_per_replica == 0 else 1
        with local_cluster(max(os.cpu_count() or 1, need), a.host, a.port) as port:
            return _serve(opts, a.host, port)
    import ray
    from ray import serve

    ray.init(address=a.ray_address, log_to_driver=False, logging_level="warning")
    try:
        serve.start(http_options={"host": a.host, "port": a.port or 8000})
        return _serve(opts, a.host, a.port or 8000)
    finally:
        ray.shutdown()


def _serve(opts, host: str, port: int) -> int:
    from ray import serve

    from .app import build_app

    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.run(build_app(opts), name=APP_NAME, route_prefix="/")
        scale = opts.autoscaling_config()
        print(f"twotower: serving on http://{host}:{port} with Ray Serve ({opts.replicas} replicas"
              + (f", autoscaling {scale['min_replicas']}-{scale['max_replicas']}" if scale else "")
              + f", {opts.gpus_per_replica} GPU(s) each; max_batch={opts.max_batch}, max_queue={opts.max_queue}, "
              f"max_len={opts.max_len})", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:   # a second signal now interrupts the shutdown itself
        for s, h in old.items():
            signal.signal(s, h)
    # the replicas finish their in-flight requests (up to shutdown_timeout_s); bounded, should Ray be broken
    deleting = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
    deleting.start()
    deleting.join(opts.shutdown_timeout_s + 30)
    if deleting.is_alive():
        print("twotower: the application did not stop in time; leaving it to Ray", file=sys.stderr, flush=True)
    print("twotower: server stopped", file=sys.stderr, flush=True)
    return 0
