"""An HTTP request as plain data (scope + body) run through an ASGI app in another process: the ingress
forwards what a client sent, a replica runs `serve.http.create_app`'s app on it and streams back the ASGI
messages the app sent. No route is re-implemented here: the app answers exactly as under `twotower serve`."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

# the parts of an HTTP scope an app reads; the rest (state, extensions, the server's objects) stays behind
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers",
               "server", "client")


def portable_scope(scope: dict) -> dict:
    """The picklable part of an HTTP scope, with the path as the client sent it (root_path dropped)."""
    out = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    out["root_path"] = ""
    out.setdefault("asgi", {"version": "3.0"})
    return out


def with_header(message: dict, name: str, value: str) -> dict:
    """An http.response.start message with one more header."""
    return {**message, "headers": [*message.get("headers", []), (name.encode("latin-1"), value.encode("latin-1"))]}


def is_last(message: dict) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


async def run_asgi(app, scope: dict, body: bytes) -> AsyncIterator[dict]:
    """Run `app` on one request (`scope`, whole `body`) and yield every message it sends, up to the last body
    message. The app sees the client as connected until this generator is closed or cancelled (a client
    that went away): then the app's task is cancelled, which frees the request's cache row."""
    sent: asyncio.Queue = asyncio.Queue()
    delivered = False
    gone = asyncio.Event()

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(app(scope, receive, sent.put))
    try:
        while True:
            get = asyncio.ensure_future(sent.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():          # the app returned (or raised) without sending its last message
                get.cancel()
                while not sent.empty():
                    yield sent.get_nowait()
                task.result()
                return
            message = get.result()
            yield message
            if is_last(message):
                return
    finally:
        gone.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
