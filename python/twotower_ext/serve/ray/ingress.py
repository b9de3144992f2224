"""The ingress: takes every HTTP request, forwards it whole (scope + body) to a replica through a handle
(whose router is the prefix-affinity one), and relays the replica's answer as it streams. A replica that
dies before its answer has started (nothing of it sent yet) gets the request re-sent to another one; one
that dies mid-stream ends the stream with an OpenAI error event. GET /metrics is the fleet's: every
replica's series, labelled by replica."""
from __future__ import annotations

import json
import logging

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .asgi import is_last, portable_scope

log = logging.getLogger("twotower.serve.ray")


def openai_error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


class Relay(Response):
    """The rest of a replica's answer, sent as it arrives; `head` is what already came (its start and first
    body chunk). A client that goes away cancels the replica's request (its cache row is freed)."""

    def __init__(self, head: list[dict], rest):
        self.head, self.rest = head, rest
        self.status_code, self.background = head[0]["status"], None
        headers = dict(head[0].get("headers", []))
        self.sse = headers.get(b"content-type", b"").startswith(b"text/event-stream")

    async def __call__(self, scope, receive, send) -> None:
        finished = False
        try:
            for m in self.head:
                await send(m)
            finished = is_last(self.head[-1])
            while not finished:
                try:
                    m = await self.rest.__anext__()
                except StopAsyncIteration:       # ended without its last message: close the body
                    m = {"type": "http.response.body", "body": b"", "more_body": False}
                except (RayActorError, RayTaskError) as e:
                    log.warning("twotower ingress: a replica failed mid-stream: %s", e)
                    err = {"error": {"message": f"the replica serving this request failed: {type(e).__name__}",
                                     "type": "server_error", "param": None, "code": None}}
                    tail = f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode() if self.sse else b""
                    m = {"type": "http.response.body", "body": tail, "more_body": False}
                await send(m)
                finished = is_last(m)
        finally:
            if not finished:
                self.rest.cancel()


async def forward(replicas, scope: dict, body: bytes, retries: int) -> Response:
    """Send one request to a replica and return its answer once it has started (first body chunk in hand);
    re-sent up to `retries` times to another replica if its replica dies before that."""
    failure = None
    for attempt in range(retries + 1):
        gen = replicas.options(stream=True).http.remote(scope, body)
        head: list[dict] = []
        try:
            while True:
                head.append(await gen.__anext__())
                if head[-1]["type"] == "http.response.body" and (head[-1].get("body") or is_last(head[-1])):
                    return Relay(head, gen)
        except StopAsyncIteration:
            gen.cancel()
            failure = "the replica's answer ended before it started"
        except BackPressureError as e:
            return openai_error(429, f"every replica is busy and the ingress queue is full ({e})", "rate_limit_exceeded")
        except (RayActorError, RayTaskError) as e:
            gen.cancel()
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("twotower ingress: attempt %d: the replica failed before answering (%s)", attempt + 1, failure)
        except BaseException:
            gen.cancel()
            raise
    return openai_error(503, f"no replica could answer after {retries + 1} attempts ({failure})", "unavailable")


@serve.deployment(name="TwoTowerIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class TwoTowerIngress:
    def __init__(self, replicas, board, retries: int):
        self.replicas, self.board, self.retries = replicas, board, retries

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET" and request.url.path == "/metrics":
            return PlainTextResponse(await self.board.text.remote(), media_type="text/plain; version=0.0.4")
        return await forward(self.replicas, portable_scope(request.scope), await request.body(), self.retries)
