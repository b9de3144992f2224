"""The OpenAI-compatible HTTP front end (FastAPI; `pip install twotower_ext[serve]`) over a `Scheduler`.

POST /v1/completions, POST /v1/chat/completions (when the checkpoint has a chat template), GET /v1/models,
GET /v1/models/{id}, GET /health, GET /metrics. Every 4xx/5xx answer, FastAPI's own 404/405/422 and an
unhandled exception included, is OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`);
bodies are validated by `openai_schema` so that a bad field is a 400 naming it.

Limits before work: a body larger than `max_body_bytes` is refused while it is read (413), before it is
parsed; text is tokenised on a thread pool, never on the event loop, and a prompt that cannot fit in the
scheduler's max_len is refused before any pass (a text far too long for it before it is even tokenised), so
/health and every other client stay responsive whatever a request carries. A full queue is a 429 at once.
A client that disconnects cancels its request (its cache row is freed before the next pass).

Shutdown (`Lifecycle.drain`, driven by `twotower serve` on SIGTERM): new requests get a 503 at once; the
requests in flight may finish for the grace period; then every one left is cancelled and its client gets a
503 (or, on a stream, a final error event followed by `data: [DONE]`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from .chat_template import ChatTemplate, read_chat_template
from .metrics import CONTENT_TYPE
from .openai_schema import APIError, bad, error_body, parse_request
from .request import QueueFull, RequestError, ShuttingDown
from ..runtime.params import derive_seed

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("twotower serve needs the serve extra: pip install 'twotower_ext[serve]' "
                      f"(fastapi, uvicorn, jinja2, prometheus_client) ({e})") from None

log = logging.getLogger("twotower.serve")
DEFAULT_MAX_BODY_BYTES = 1 << 20     # 1 MiB (nginx's default client_max_body_size)
TOKENIZER_THREADS = 2
CUT_WAIT_S = 5.0                     # how long drain waits for cut requests' answers to be written


def error_response(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", None, "server_error", "shutting_down")


class Lifecycle:
    """What the app has in flight, and its shutdown. One per app (`app.state.lifecycle`)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.draining = False
        self.handles: set = set()   # requests submitted through this app and not finished
        self.active = 0             # /v1 exchanges in progress (a stream counts until its last byte)
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="twotower-text")   # tokenising, templates

    def cut(self) -> None:
        """Cancel every request in flight now (their clients get a 503 or an SSE error event)."""
        for h in list(self.handles):
            h.cancel()

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests (503), let those in flight finish for up to grace_s seconds, cancel the rest,
        stop the scheduler and wait (up to CUT_WAIT_S) until every cut request's answer is written."""
        self.draining = True
        self.scheduler.stop_accepting()
        await asyncio.get_running_loop().run_in_executor(None, self.scheduler.shutdown, grace_s)
        end = time.monotonic() + CUT_WAIT_S
        while self.active and time.monotonic() < end:
            await asyncio.sleep(0.02)
        self.pool.shutdown(wait=False)


class _Guard:
    """Outermost app middleware: a 503 for /v1 requests once draining; counts /v1 exchanges in flight; an
    exception no handler caught becomes a logged 500 with the error object (not a plain-text 500)."""

    def __init__(self, app, lifecycle: Lifecycle):
        self.app, self.life = app, lifecycle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = scope["path"].startswith("/v1/")
        if api and self.life.draining:
            return await _send_json(send, 503, _shutting_down().body())
        started = False

        async def tracked(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        self.life.active += api
        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001  (the one place an unexpected error is turned into an answer)
            log.error("twotower serve: %s %s failed: %s: %s", scope.get("method"), scope["path"], type(e).__name__, e,
                      exc_info=not isinstance(e, OSError))
            if not started:
                await _send_json(send, 500, error_body(f"internal server error ({type(e).__name__})", "server_error"))
        finally:
            self.life.active -= api


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class _EventStream(StreamingResponse):
    """Server-sent events whose request is released however the exchange ends, even when the client is gone
    before the first event (then the generator never starts, and its own `finally` never runs)."""

    def __init__(self, events, release):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _safe_sink(loop, queue: asyncio.Queue, index: int):
    """A Handle sink (called on the scheduler thread) that posts (index, event) into `queue` on `loop`; once
    the loop has closed (the server is gone) nobody waits for the event and it is dropped."""
    def sink(ev):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
        except RuntimeError:   # "Event loop is closed"
            pass
    return sink


def create_app(scheduler, model_name: str = "twotower", defaults: dict | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, chat_template: str | None = None) -> "FastAPI":
    """The FastAPI app serving `scheduler` (whose lifetime the caller owns; `app.state.lifecycle.drain`
    shuts both down). `defaults`: serving parameters used when a request omits them (max_tokens 16 and
    temperature 0 unless given). `chat_template`: a template source overriding the checkpoint's. Raises
    ChatTemplateError (a ValueError) for a template that does not compile or reaches Python internals."""
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"serve: max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    lm = scheduler.lm
    defaults = {"max_tokens": 16, "temperature": 0.0, "eos_token_id": scheduler.cfg.eos_token_id, **(defaults or {})}
    source, special = read_chat_template(lm.path)
    where = "the chat template" if chat_template is not None else f"the chat template of {lm.path}"
    template = ChatTemplate(chat_template or source, special, where) if (chat_template or source) else None
    # a text of more bytes than max_len tokens can cover is refused before it is tokenised
    max_token_bytes = (max((len(t.encode("utf-8")) for t in lm.tokenizer.get_vocab()), default=1)
                       if lm.tokenizer is not None else 1)
    life = Lifecycle(scheduler)
    pool = life.pool
    app = FastAPI(title="twotower_ext", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, lifecycle=life)
    app.state.scheduler, app.state.lifecycle = scheduler, life
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(e.status_code, msg, None, "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(v) for v in first.get("loc", ())[1:]) or None
        return error_response(422, f"{param or 'request'}: {first.get('msg', 'invalid')}", param)

    async def read_json(request: Request):
        """The body as JSON, refused (413) as soon as it passes max_body_bytes; text that is not UTF-8 is kept
        (as surrogates) so that the field holding it is named when it is validated."""
        length = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request body is larger than this server's limit of {max_body_bytes} bytes "
                                "(twotower serve --max-body-bytes)", None, "invalid_request_error", "body_too_large")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            try:
                return json.loads(raw, parse_constant=_reject_constant)
            except UnicodeDecodeError:   # not UTF-8: kept as surrogates, refused naming the field that holds it
                return json.loads(raw.decode("utf-8", "surrogateescape"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise bad(None, f"the body is not valid JSON ({e})") from None

    async def prompt_ids(prompt, param: str) -> list[int]:
        """Token ids of a prompt (text is tokenised on the pool), refused when it cannot fit in max_len."""
        max_len = scheduler.max_len
        if isinstance(prompt, str):
            if lm.tokenizer is None:
                raise bad(param, f"{param}: this model has no tokenizer; send token ids")
            nbytes = len(prompt.encode("utf-8"))
            if nbytes > max_len * max_token_bytes:
                raise bad(param, f"{param}: {nbytes} bytes of text are at least {-(-nbytes // max_token_bytes)} tokens, "
                                 f"more than this server's max_len={max_len}")
            n, ids = await asyncio.get_running_loop().run_in_executor(pool, tokenize, prompt)
        else:
            n, ids = len(prompt), prompt
        if n >= max_len:
            raise bad(param, f"{param}: {n} tokens leave no room to generate within this server's max_len={max_len}")
        return ids

    def tokenize(text: str) -> tuple[int, list[int] | None]:
        """(token count, ids; None when they cannot fit), on the pool. tokenizers' encode_batch lets go of the
        GIL while it works (encode holds it throughout); the _fast variant skips the character offsets (less to
        build, and to free with the GIL held); the ids of a text too long to serve are never turned into a
        Python list (for a long text, that alone holds the GIL for tens of milliseconds)."""
        enc = lm.tokenizer.encode_batch_fast([text])[0]
        return len(enc), (enc.ids if len(enc) < scheduler.max_len else None)

    def usage(hs) -> dict:
        done = sum(len(h.tokens) for h in hs)
        return {"prompt_tokens": len(hs[0].prompt), "completion_tokens": done,
                "total_tokens": len(hs[0].prompt) + done, "nfe": sum(h.nfe for h in hs)}

    def token_text(i: int) -> str:
        return lm.tokenizer.decode([i], skip_special_tokens=False) if lm.tokenizer is not None else str(i)

    def logprobs_of(h, start: int, n: int, chat: bool, k: int, offset: int = 0):
        """OpenAI's logprobs of h's tokens [start, start + n): chat's `content` list, or the completions'
        tokens / token_logprobs / top_logprobs / text_offset."""
        toks, lps = h.tokens[start:start + n], h.logprobs[start:start + n]
        tops = h.top_logprobs[start:start + n] if k else [[] for _ in toks]
        if chat:
            def entry(i, v):
                t = token_text(i)
                return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
            return {"content": [{**entry(t, v), "top_logprobs": [entry(i, w) for i, w in top]}
                                for t, v, top in zip(toks, lps, tops)]}
        texts = [token_text(t) for t in toks]
        offsets = [offset + sum(len(x) for x in texts[:j]) for j in range(len(texts))]
        return {"tokens": texts, "token_logprobs": lps, "text_offset": offsets,
                "top_logprobs": [{token_text(i): w for i, w in top} for top in tops] if k else None}

    async def run(request: Request, ids: list[int], req):
        """Submit the request's n choices (choice j > 0 seeded with derive_seed(seed, j)) and answer: a
        stream of chunks as blocks / tokens are committed, or one response once every choice is done."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        chat = req.chat
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        params = {**req.params, "detokenize": lm.tokenizer is not None}   # the core builds the text
        k = req.top_logprobs if chat else req.logprobs
        hs = []
        try:
            for j in range(req.n):
                p = params if j == 0 else {**params, "seed": derive_seed(params.get("seed", 0), j)}
                hs.append(scheduler.submit(ids, sink=_safe_sink(loop, events, j), request_id=f"{rid}-{j}", **p))
        except (RequestError, QueueFull, ShuttingDown) as e:
            for h in hs:
                h.cancel()
            if isinstance(e, RequestError):
                raise bad(e.field, str(e)) from None
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), None, "rate_limit_exceeded", "queue_full") from None
            raise _shutting_down() from None
        life.handles.update(hs)
        extra = {"seed": req.params["seed"]} if req.seed_drawn else {}
        sent = [0] * len(hs)        # tokens sent per choice (streaming), for their logprobs
        chars = [0] * len(hs)       # text sent per choice (completions' text_offset)

        def release():
            for h in hs:
                h.cancel()
                life.handles.discard(h)

        def choice(j, text, ids_, finish, delta: bool) -> dict:
            h, c = hs[j], {"index": j}
            if chat:
                c["delta" if delta else "message"] = {"content": text} if delta else {"role": "assistant", "content": text}
            else:
                c["text"] = text
            lp = None
            if req.logprobs is not None and ids_:
                start = sent[j] if delta else 0
                lp = logprobs_of(h, start, len(ids_), chat, k or 0, chars[j] if delta else 0)
            return {**c, "logprobs": lp, "finish_reason": finish, "token_ids": ids_}

        def chunk(choices: list, **more) -> str:
            obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": int(time.time()),
                   "model": model_name, "choices": choices, **extra, **more}
            if req.include_usage and "usage" not in obj:
                obj["usage"] = None
            return f"data: {json.dumps(obj)}\n\n"

        def error_of(h_) -> APIError:
            if h_.finish_reason == "cancelled":   # not by this client (its stream or wait would be gone)
                return APIError(503, "the server is shutting down: the request was cancelled", None, "server_error",
                                "shutting_down")
            return APIError(500, h_.error or "generation failed", None, "server_error")

        if req.stream:
            async def sse():
                try:
                    if chat:   # OpenAI's first chat chunk: the role, no text
                        yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None} for j in range(len(hs))])
                    left = len(hs)
                    while left:
                        j, ev = await events.get()
                        if ev[0] == "tokens":
                            ids_, text = ev[1], ev[2] or ""
                            yield chunk([choice(j, text, ids_, None, True)])
                            sent[j] += len(ids_)
                            chars[j] += len(text)
                            continue
                        h = ev[1]
                        if h.finish_reason not in ("stop", "length"):
                            yield f"data: {json.dumps(error_of(h).body())}\n\n"
                            break
                        yield chunk([choice(j, "", [], h.finish_reason, True)])
                        left -= 1
                    else:
                        if req.include_usage:
                            yield chunk([], usage=usage(hs))
                    yield "data: [DONE]\n\n"
                finally:   # a client that went away (the generator is closed or cancelled) frees its rows
                    release()

            return _EventStream(sse(), release)

        async def finished():
            left = len(hs)
            while left:
                left -= (await events.get())[1][0] == "done"

        async def disconnected():   # the body is read: the next message is http.disconnect (or the response end)
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waits = [asyncio.ensure_future(finished()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            if not all(h.done for h in hs):   # the client went away (or this task was cancelled): free the rows
                release()
            life.handles.difference_update(hs)
        if not all(h.done for h in hs):
            return error_response(499, "client disconnected", None, "invalid_request_error", "cancelled")
        failed = next((h for h in hs if h.finish_reason not in ("stop", "length")), None)
        if failed is not None:
            raise error_of(failed)
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                             "choices": [choice(j, h.output_text or "", list(h.tokens), h.finish_reason, False)
                                         for j, h in enumerate(hs)], "usage": usage(hs), **extra})

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(await read_json(request), False, defaults, model_name)
        return await run(request, await prompt_ids(req.prompt, "prompt"), req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        if template is None:
            raise bad("messages", f"model {model_name!r} has no chat template (its checkpoint has no "
                                  "tokenizer_config.json chat_template or chat_template.jinja): use /v1/completions")
        req = parse_request(body, True, defaults, model_name)
        try:
            text = await asyncio.get_running_loop().run_in_executor(pool, template.render, req.messages)
        except Exception as e:  # noqa: BLE001  (whatever the template raises for these messages)
            raise bad("messages", f"messages: the chat template refused them ({type(e).__name__}: {e})") from None
        return await run(request, await prompt_ids(text, "messages"), req)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "twotower_ext",
                "max_model_len": scheduler.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} does not exist here (this server serves {model_name!r})",
                           "model", "invalid_request_error", "model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        load = scheduler.load()
        if load["accepting"] and not life.draining:
            return {"status": "ok", **load}
        return JSONResponse({**_shutting_down().body(), "status": "shutting_down", **load}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        load = scheduler.load()
        scheduler.metrics.set_load(load["queue_depth"], load["live_rows"])
        return Response(scheduler.metrics.text(), media_type=CONTENT_TYPE)

    return app
