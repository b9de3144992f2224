"""`twotower serve`: the HTTP server (uvicorn) over one Scheduler, with a clean SIGTERM / Ctrl-C shutdown:
new requests get 503 at once (the server keeps listening so that they are answered), requests in flight may
finish for up to --shutdown-timeout seconds, then the rest are cancelled with a well-formed error answer
(503, or an SSE error event and `data: [DONE]`), the scheduler stops and the process exits 0. A second
signal cuts the grace period short; a third exits at once."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import socket
import sys
import threading

from ..cli import add_experts_argument, command, int_at_least
from .ray.cli import add_ray_arguments, run_ray

CLOSE_S = 2.0   # after the drain: how long uvicorn may take to close the (idle) connections
BACKLOG = 2048  # uvicorn's default


def _seconds(v: str) -> float:
    try:
        s = float(v)
    except ValueError:
        s = -1.0
    if not (math.isfinite(s) and s >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {v!r}")
    return s


PREFIX_CACHE_GB = 2.0


def _gib(v: str) -> float:
    try:
        g = float(v)
    except ValueError:
        g = -1.0
    if not 0 <= g < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of GiB >= 0, got {v!r}")
    return g


def _port(v: str) -> int:
    try:
        p = int(v)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 65535], got {v!r}")
    return p


def _arguments(s) -> None:
    from .http import DEFAULT_MAX_BODY_BYTES

    s.add_argument("--model", help="checkpoint directory (default: the model shipped with the package)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    s.add_argument("--max-batch", type=int, default=16, help="cache rows: requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those (then 429)")
    s.add_argument("--max-len", type=int, default=1024, help="context tokens per row: prompt + generated")
    s.add_argument("--max-body-bytes", type=int_at_least(1), default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body accepted; a larger one is refused (413) while it is read "
                        "(default %(default)s)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and cache (default fp32)")
    s.add_argument("--threads", type=int_at_least(0), default=0,
                   help="CPU threads, at most the cores this process may use (default 0: the per-model-size rule "
                        "of twotower_ext.threads, 1 for small models)")
    add_experts_argument(s)
    s.add_argument("--prefix-cache-gb", type=_gib, default=PREFIX_CACHE_GB,
                   help="GiB for the prefix cache: prompts that start like a cached one prefill only the rest "
                        "(default %(default)s)")
    s.add_argument("--no-prefix-cache", action="store_true", help="no prefix cache (the same as --prefix-cache-gb 0)")
    s.add_argument("--name", help="model id in the API (default: the checkpoint directory's name)")
    s.add_argument("--shutdown-timeout", type=_seconds, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM before they are cancelled "
                        "(default %(default)s)")
    add_ray_arguments(s)


def make_server(config, lifecycle, grace_s: float):
    """A uvicorn.Server whose exit signal drains the app (Lifecycle.drain) before uvicorn stops listening."""
    import uvicorn

    class Server(uvicorn.Server):
        loop = None
        signals = 0
        drain_task = None

        async def main_loop(self):
            self.loop = asyncio.get_running_loop()
            await super().main_loop()

        def handle_exit(self, sig, frame):
            self.signals += 1
            if self.loop is None or self.signals > 2:    # not serving yet, or a third signal: stop now
                self.force_exit = self.signals > 2
                self.should_exit = True
            elif self.signals == 1:
                self.loop.call_soon_threadsafe(self.start_drain)
            else:
                print("twotower: second signal: cancelling the requests in flight now", file=sys.stderr, flush=True)
                self.loop.call_soon_threadsafe(lifecycle.cut)

        def start_drain(self):
            print(f"twotower: shutting down: new requests get 503; {len(lifecycle.handles)} in flight may finish "
                  f"for up to {grace_s:g} s", file=sys.stderr, flush=True)
            self.drain_task = asyncio.ensure_future(self.drain())

        async def drain(self):
            await lifecycle.drain(grace_s)
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal once it has shut down (the process then dies by SIGTERM);
            # a server that shut down cleanly exits 0 instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server(config)


def serve(lm, host: str, port: int, max_batch: int, max_queue: int, max_len: int, name: str,
          shutdown_timeout: float = 30.0, ready=None, max_body_bytes: int | None = None,
          prefix_cache_gb: float = 0.0) -> int:
    """Run the server until SIGTERM / SIGINT. `ready(host, port)` is called once it listens."""
    import uvicorn

    from .http import DEFAULT_MAX_BODY_BYTES, create_app
    from .metrics import Metrics
    from .scheduler import Scheduler

    if not (isinstance(shutdown_timeout, (int, float)) and math.isfinite(shutdown_timeout) and shutdown_timeout >= 0):
        raise ValueError(f"serve: shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}")
    scheduler = Scheduler(lm, max_batch=max_batch, max_queue=max_queue, max_len=max_len, metrics=Metrics(name),
                          prefix_cache_gb=prefix_cache_gb)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        app = create_app(scheduler, name, max_body_bytes=max_body_bytes or DEFAULT_MAX_BODY_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)   # before "serving ... on" is printed: from then on a client is queued, not refused
    except OSError as e:
        scheduler.shutdown(0)
        sock.close()
        raise ValueError(f"serve: cannot listen on {host}:{port} ({e.strerror})") from None
    except BaseException:
        scheduler.shutdown(0)
        sock.close()
        raise
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=CLOSE_S, lifespan="off",
                            access_log=False, backlog=BACKLOG)
    server = make_server(config, app.state.lifecycle, shutdown_timeout)
    print(f"twotower: serving {name} on http://{host}:{bound} (max_batch={max_batch}, max_queue={max_queue}, "
          f"max_len={max_len})", file=sys.stderr, flush=True)
    if ready is not None:
        ready(host, bound)
    try:
        server.run(sockets=[sock])
    finally:   # after a drain this finds nothing left; after an early exit it cancels what is queued or live
        scheduler.shutdown(grace_s=0.0)
        sock.close()
    print("twotower: server stopped", file=sys.stderr, flush=True)
    return 0


@command("serve", "OpenAI-compatible HTTP server with continuous batching", _arguments)
def run(a) -> int:
    import os

    import torch

    from .. import default_model_path
    from ..api import load
    from ..threads import cap_threads, recommended_threads

    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"twotower: serve needs the serve extra: pip install 'twotower_ext[serve]' ({e})") from None
    if a.ray:
        return run_ray(a)
    path = a.model or default_model_path()
    if path is None:
        raise SystemExit("twotower: no --model given and this installation ships no default model")
    threads = cap_threads(a.threads) if a.threads else None
    lm = load(path, device=a.device, dtype=a.dtype, experts=a.experts)
    threads = threads or recommended_threads(lm.config, a.device)   # the rule `twotower generate` uses
    if threads:
        torch.set_num_threads(threads)   # process-wide: the scheduler thread's passes run with it
    name = a.name or os.path.basename(os.path.normpath(path))
    return serve(lm, a.host, a.port, a.max_batch, a.max_queue, a.max_len, name, a.shutdown_timeout,
                 max_body_bytes=a.max_body_bytes, prefix_cache_gb=0.0 if a.no_prefix_cache else a.prefix_cache_gb)
