"""Serving names of the decode parameters and the errors a submit raises.

Parameters are the decode core's own (`runtime.DecodeParams`, validated there); the serving names of the
fields (`max_tokens`, `steps`, ...) map onto them so an error names the field the client sent. A submitted
request is a `runtime.Request` (`Handle` here, the name the serving layer has always used)."""
from __future__ import annotations

from ..runtime import DecodeParams, ParamError, QueueFull, Request

Handle = Request

# serving field -> DecodeParams field
FIELDS = {"mode": "mode", "max_tokens": "max_new_tokens", "block_size": "block_size", "steps": "steps_per_block",
          "threshold": "threshold", "temperature": "temperature", "seed": "seed", "eos_token_id": "eos_token_id",
          "logprobs": "logprobs", "stop": "stop", "stop_token_ids": "stop_token_ids", "detokenize": "detokenize"}
_PARAM_TO_FIELD = {v: k for k, v in FIELDS.items()}

__all__ = ["FIELDS", "Handle", "QueueFull", "RequestError", "ShuttingDown", "make_args", "request_error"]


class RequestError(ValueError):
    """A bad request parameter; `field` names it as the client spelled it."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


class ShuttingDown(RuntimeError):
    """The scheduler has stopped accepting requests."""


def request_error(e: ParamError) -> RequestError:
    """The core's ParamError in the client's names: the field and the message's leading field name."""
    field = _PARAM_TO_FIELD.get(e.field, e.field)
    msg = str(e)
    if e.field and msg.startswith(e.field):
        msg = field + msg[len(e.field):]
    return RequestError(field, msg.replace("max_new_tokens", "max_tokens"))


def make_args(vocab_size: int, **params) -> DecodeParams:
    """DecodeParams from serving fields (unknown fields and wrong types are RequestErrors naming the field)."""
    kw = {}
    for name, value in params.items():
        if name not in FIELDS:
            raise RequestError(name, f"{name}: unknown parameter (known: {', '.join(FIELDS)})")
        if isinstance(value, bool) and name not in ("mode", "detokenize"):    # JSON true is not an int here
            raise RequestError(name, f"{name} must be a number, got {value!r}")
        if name in ("threshold", "temperature") and isinstance(value, int):
            value = float(value)
        if name in ("stop", "stop_token_ids") and isinstance(value, list):
            value = tuple(value)
        kw[FIELDS[name]] = value
    try:
        args = DecodeParams(**kw).validate(vocab_size)
    except ParamError as e:
        raise request_error(e) from None
    if not 0 <= args.seed < 2**63:
        raise RequestError("seed", f"seed must be an int in [0, 2**63), got {args.seed!r}")
    return args
