"""Serving: continuous batching at block granularity (`Scheduler`) behind an OpenAI-compatible HTTP server
(`serve.http`, needs the `serve` extra: fastapi + uvicorn). See the README's "Serving" section."""
from .metrics import Metrics
from .request import Handle, QueueFull, RequestError, ShuttingDown
from .scheduler import Scheduler

__all__ = ["Handle", "Metrics", "QueueFull", "RequestError", "Scheduler", "ShuttingDown"]
