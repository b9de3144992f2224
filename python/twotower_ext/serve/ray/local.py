"""A Ray instance of this machine alone, with Serve's HTTP proxy on host:port: what `twotower serve --ray`
starts when given no cluster address, and what the tests and `bench scale` run the fleet on."""
from __future__ import annotations

import contextlib
import os
import socket

# Ray's single-machine mode: every Ray process listens and connects on 127.0.0.1 (by default Ray uses the
# machine's network address even for a local instance). Read when ray is imported and by the processes it
# starts, so it is set before the first `import ray`.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(num_cpus: int, host: str = "127.0.0.1", port: int = 0, num_gpus: int | None = None):
    """Start Ray (this machine only, `num_cpus` logical CPUs to place replicas by) and Serve's HTTP proxy on
    host:port (0: a free port); yields the port. On exit Ray stops, every process it started with it (Serve's
    included: its own shutdown, several seconds more, would only stop them one by one first)."""
    os.environ[SINGLE_MACHINE_ENV] = "0"
    import ray
    from ray import serve

    port = port or free_port(host)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        yield port
    finally:
        ray.shutdown()
