"""Serving: continuous batching at block granularity (`Scheduler`) behind an OpenAI-compatible HTTP server
(`serve.http`). Both need the `serve` extra (the Scheduler: prometheus_client for its metrics; the server:
fastapi, uvicorn, jinja2 as well). See the README's "Serving" section. Names are imported on first use, so
that `twotower` (whose `serve` subcommand lives in serve.cli) runs without the extra."""
import importlib

_NAMES = {"Metrics": ".metrics", "Handle": ".request", "QueueFull": ".request", "RequestError": ".request",
          "ShuttingDown": ".request", "Scheduler": ".scheduler"}
__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name], __name__), name)
