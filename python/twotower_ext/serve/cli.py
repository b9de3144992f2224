"""`twotower serve`: the HTTP server (uvicorn) over one Scheduler, with a clean SIGTERM / Ctrl-C shutdown:
stop accepting (new requests get 503), let in-flight requests finish for up to --shutdown-timeout seconds,
cancel the rest, exit 0."""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading


from ..cli import add_experts_argument, command


def _arguments(s) -> None:
    s.add_argument("--model", help="checkpoint directory (default: the model shipped with the package)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    s.add_argument("--max-batch", type=int, default=16, help="cache rows: requests decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those (then 429)")
    s.add_argument("--max-len", type=int, default=1024, help="context tokens per row: prompt + generated")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and cache (default fp32)")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: the per-model-size rule of twotower_ext.threads, 1 for small models)")
    add_experts_argument(s)
    s.add_argument("--prefix-cache-gb", type=_gib, default=PREFIX_CACHE_GB,
                   help=f"GiB for the prefix cache: prompts that start like a cached one prefill only the rest "
                        f"(default {PREFIX_CACHE_GB})")
    s.add_argument("--no-prefix-cache", action="store_true", help="no prefix cache (the same as --prefix-cache-gb 0)")
    s.add_argument("--name", help="model id in the API (default: the checkpoint directory's name)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM before they are cancelled")


PREFIX_CACHE_GB = 2.0


def _gib(v: str) -> float:
    import argparse
    import math

    try:
        g = float(v)
    except ValueError:
        g = -1.0
    if not 0 <= g < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of GiB >= 0, got {v!r}")
    return g


def _port(v: str) -> int:
    import argparse

    try:
        p = int(v)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 65535], got {v!r}")
    return p


def _server(config, scheduler):
    """A uvicorn.Server whose exit signal (SIGTERM / SIGINT) also closes the scheduler's door at once."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.stop_accepting()
            super().handle_exit(sig, frame)

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
          shutdown_timeout: float = 30.0, ready=None, prefix_cache_gb: float = 0.0) -> int:
    """Run the server until SIGTERM / SIGINT. `ready(host, port)` is called once it listens."""
    import uvicorn

    from .http import create_app
    from .scheduler import Scheduler

    scheduler = Scheduler(lm, max_batch=max_batch, max_queue=max_queue, max_len=max_len,
                          prefix_cache_gb=prefix_cache_gb)
    app = create_app(scheduler, name)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        scheduler.shutdown(0)
        raise ValueError(f"serve: cannot listen on {host}:{port} ({e.strerror})") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="off", access_log=False)
    server = _server(config, scheduler)
    print(f"twotower: serving {name} on http://{host}:{bound} (max_batch={max_batch}, max_queue={max_queue}, "
          f"max_len={max_len})", file=sys.stderr, flush=True)
    if ready is not None:
        ready(host, bound)
    try:
        server.run(sockets=[sock])
    finally:   # connections are closed by now; whatever is still queued or live is cancelled
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
    from ..threads import recommended_threads

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"twotower: serve needs the serve extra: pip install 'twotower_ext[serve]' ({e})") from None
    if a.threads < 0:
        raise ValueError(f"serve: --threads must be >= 0 (0: the default), got {a.threads}")
    path = a.model or default_model_path()
    if path is None:
        raise SystemExit("twotower: no --model given and this installation ships no default model")
    lm = load(path, device=a.device, dtype=a.dtype, experts=a.experts)
    threads = a.threads or recommended_threads(lm.config, a.device)   # the rule `twotower generate` uses
    if threads:
        torch.set_num_threads(threads)   # process-wide: the scheduler thread's passes run with it
    name = a.name or os.path.basename(os.path.normpath(path))
    return serve(lm, a.host, a.port, a.max_batch, a.max_queue, a.max_len, name, a.shutdown_timeout,
                 prefix_cache_gb=0.0 if a.no_prefix_cache else a.prefix_cache_gb)
