"""Helpers shared by the serving tests: an in-process server on 127.0.0.1, a `twotower serve` subprocess,
polling, the marker that skips HTTP tests without the serve extra."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import twotower_ext as tt

try:   # the serve extra + test clients (tools/bootstrap.sh installs them)
    import httpx
    import openai  # noqa: F401
    import uvicorn
    HTTP = True
except ImportError:
    HTTP = False
http = pytest.mark.skipif(not HTTP, reason="the serve extra (fastapi, uvicorn) or httpx / openai is not installed")

PARITY = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")


def wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


class Server:
    """The app on 127.0.0.1 at an ephemeral port, uvicorn in a thread (the server `twotower serve` runs,
    without its signal handling)."""

    def __init__(self, lm, name, app_kw: dict | None = None, **kw):
        from twotower_ext.serve import Metrics, Scheduler
        from twotower_ext.serve.cli import make_server
        from twotower_ext.serve.http import create_app

        self.sched = Scheduler(lm, metrics=Metrics(name), **kw)
        try:
            self.app = create_app(self.sched, name, **(app_kw or {}))
        except BaseException:
            self.sched.shutdown(0)
            raise
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = make_server(config, self.app.state.lifecycle, 0.0)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sched.shutdown(grace_s=0)


def post(srv, body, path="/v1/completions", timeout=60):
    return httpx.post(srv.url + path, json=body, timeout=timeout)


def serve_subprocess(*args, model=PARITY, name="parity"):
    """`twotower serve` on a free port (the twotower_ext this test runs: an installed wheel or a development
    tree); returns (process, base url) once it listens."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(tt.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "twotower_ext.cli", "serve", "--model", model, "--port", "0",
                             "--name", name, *args], stderr=subprocess.PIPE, text=True, env=env)
    proc.startup_log = ""       # what it printed before it listened (warnings)
    while True:
        line = proc.stderr.readline()
        if f"serving {name}" in line:
            return proc, line.split(" on ")[1].split()[0]
        proc.startup_log += line
        if not line:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.startup_log}")
