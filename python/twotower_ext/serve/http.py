"""The OpenAI-compatible HTTP front end (FastAPI; `pip install twotower_ext[serve]`) over a `Scheduler`.

POST /v1/completions, POST /v1/chat/completions (when the checkpoint has a chat template), GET /v1/models,
GET /health, GET /metrics. Bodies are parsed by hand so that every bad field is a 400 with an OpenAI-style
error naming it (`{"error": {"message", "type", "param", "code"}}`); a full queue is a 429 at once, a
server that is shutting down answers 503. A client that disconnects cancels its request (its cache row is
freed before the next pass).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from .request import QueueFull, RequestError, ShuttingDown

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("twotower serve needs the serve extra: pip install 'twotower_ext[serve]' "
                      f"(fastapi, uvicorn) ({e})") from None

# fields accepted on /v1/completions besides the scheduler's (request.FIELDS) and what they must be
_OPENAI_FIELDS = {"model", "prompt", "stream", "stream_options", "stop", "n", "top_p", "user", "echo", "logprobs",
                  "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "suffix"}
_SERVE_FIELDS = ("mode", "max_tokens", "block_size", "steps", "threshold", "temperature", "seed", "eos_token_id")


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class _BadField(Exception):
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def _check_openai_fields(body: dict, allowed: set) -> None:
    """Unknown fields and OpenAI options this server does not implement are named, not ignored."""
    for k, v in body.items():
        if k not in allowed and k not in _SERVE_FIELDS:
            raise _BadField(k, f"{k}: unknown field")
    unsupported = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,),
                   "top_p": (None, 1, 1.0), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                   "logit_bias": (None, {}), "suffix": (None, "")}
    for k, ok in unsupported.items():
        if k in body and body[k] not in ok:
            raise _BadField(k, f"{k}: only {ok[-1]!r} is supported, got {body[k]!r}")
    if body.get("stop") not in (None, [], ""):
        raise _BadField("stop", "stop: only the model's EOS token stops generation (send eos_token_id)")
    if not isinstance(body.get("stream", False), bool):
        raise _BadField("stream", f"stream must be true or false, got {body['stream']!r}")


def _params(body: dict, defaults: dict) -> dict:
    p = {k: body[k] for k in _SERVE_FIELDS if k in body and body[k] is not None}
    if "eos_token_id" in body:          # explicit null: no EOS stop
        p["eos_token_id"] = body["eos_token_id"]
    return {**defaults, **p}


def chat_template(path: str | None) -> str | None:
    """The checkpoint's chat template (tokenizer_config.json "chat_template" or chat_template.jinja)."""
    if not path:
        return None
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg):
        with open(cfg) as f:
            t = json.load(f).get("chat_template")
        return t if isinstance(t, str) else None
    return None


class _Detokenizer:
    """Incremental text of a growing id list: a delta is emitted once the text so far is stable (a byte-level
    BPE token can end in the middle of a UTF-8 character)."""

    def __init__(self, lm):
        self.lm, self.ids, self.sent = lm, [], ""

    def add(self, new: list[int], final: bool = False) -> str:
        self.ids.extend(new)
        if self.lm.tokenizer is None:
            return ""
        text = self.lm.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[len(self.sent):] if text.startswith(self.sent) else text
        self.sent = text
        return delta


def create_app(scheduler, model_name: str = "twotower", defaults: dict | None = None) -> "FastAPI":
    """The FastAPI app serving `scheduler` (whose lifetime the caller owns). `defaults`: serving parameters
    used when a request omits them (max_tokens 16 and temperature 0 unless given)."""
    lm = scheduler.lm
    defaults = {"max_tokens": 16, "temperature": 0.0, "eos_token_id": scheduler.cfg.eos_token_id, **(defaults or {})}
    template = chat_template(lm.path)
    app = FastAPI(title="twotower_ext", docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    created = int(time.time())

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise _BadField(None, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise _BadField(None, "the body must be a JSON object")
        return body

    @app.exception_handler(_BadField)
    async def _bad(request, e: _BadField):
        return _error(404 if e.field == "model" else 400, str(e), e.field)

    def check_model(body: dict) -> None:
        if body.get("model") not in (None, model_name):
            raise _BadField("model", f"model {body['model']!r} does not exist here (this server serves {model_name!r})")

    def usage(h) -> dict:
        return {"prompt_tokens": len(h.prompt), "completion_tokens": len(h.tokens),
                "total_tokens": len(h.prompt) + len(h.tokens), "nfe": h.nfe}

    async def run(request: Request, prompt, params: dict, stream: bool, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev):   # on the scheduler thread
            loop.call_soon_threadsafe(events.put_nowait, ev)

        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            h = scheduler.submit(prompt, sink=sink, request_id=rid, **params)
        except RequestError as e:
            return _error(400, str(e), e.field)
        except QueueFull as e:
            return _error(429, str(e), None, "rate_limit_exceeded")
        except ShuttingDown as e:
            return _error(503, str(e), None, "unavailable")
        detok = _Detokenizer(lm)

        def choice(text, ids, finish, delta: bool):
            c = {"index": 0, "finish_reason": finish, "token_ids": ids}
            if chat:
                c["delta" if delta else "message"] = ({"content": text} if delta else
                                                      {"role": "assistant", "content": text})
            else:
                c.update(text=text, logprobs=None)
            return c

        if stream:
            async def sse():
                try:
                    while True:
                        kind_, val = await events.get()
                        if kind_ == "tokens":
                            chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": int(time.time()),
                                     "model": model_name, "choices": [choice(detok.add(val), val, None, True)]}
                        else:
                            if val.finish_reason == "error":
                                yield f"data: {json.dumps({'error': {'message': val.error, 'type': 'server_error'}})}\n\n"
                                break
                            chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": int(time.time()),
                                     "model": model_name, "choices": [choice(detok.add([], final=True), [], val.finish_reason, True)],
                                     "usage": usage(val)}
                        yield f"data: {json.dumps(chunk)}\n\n"
                        if kind_ == "done":
                            break
                    yield "data: [DONE]\n\n"
                finally:   # a client that went away (the generator is closed or cancelled) frees its row
                    h.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def finished():
            while (await events.get())[0] != "done":
                pass

        async def disconnected():   # the body is read: the next message is http.disconnect (or the response end)
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waits = [asyncio.ensure_future(finished()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            if not h.done:          # the client went away (or this task was cancelled): free the row
                h.cancel()
        if not h.done:
            return _error(499, "client disconnected", None, "cancelled")
        if h.finish_reason == "error":
            return _error(500, h.error or "generation failed", None, "server_error")
        if h.finish_reason == "cancelled":
            return _error(503, "the request was cancelled (server shutting down)", None, "unavailable")
        text = lm.decode(h.tokens) if lm.tokenizer is not None else ""
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                             "choices": [choice(text, list(h.tokens), h.finish_reason, False)], "usage": usage(h)})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        _check_openai_fields(body, _OPENAI_FIELDS)
        check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]           # a batch of one prompt
        if prompt is None:
            raise _BadField("prompt", "prompt is required")
        if isinstance(prompt, list) and prompt and not all(isinstance(v, int) for v in prompt):
            raise _BadField("prompt", "prompt: one prompt per request (a string or a list of token ids)")
        return await run(request, prompt, _params(body, defaults), body.get("stream", False), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        if template is None:
            return _error(400, f"model {model_name!r} has no chat template (its checkpoint has no tokenizer_config.json "
                               "chat_template or chat_template.jinja): use /v1/completions", "messages")
        _check_openai_fields(body, (_OPENAI_FIELDS | {"messages", "max_completion_tokens"}) - {"prompt"})
        check_model(body)
        msgs = body.get("messages")
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content"), str) for m in msgs)):
            raise _BadField("messages", "messages must be a non-empty list of {role, content} objects with string content")
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        try:
            import jinja2
        except ImportError:
            return _error(501, "rendering the chat template needs jinja2 (pip install jinja2)", "messages")
        prompt = jinja2.Environment().from_string(template).render(messages=msgs, add_generation_prompt=True)
        return await run(request, prompt, _params(body, defaults), body.get("stream", False), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "twotower_ext"}]}

    @app.get("/health")
    async def health():
        load = scheduler.load()
        return JSONResponse({"status": "ok" if load["accepting"] else "shutting_down", **load},
                            status_code=200 if load["accepting"] else 503)

    @app.get("/metrics")
    async def metrics():
        load = scheduler.load()
        scheduler.metrics.set_load(load["queue_depth"], load["live_rows"])
        return PlainTextResponse(scheduler.metrics.text(), media_type="text/plain; version=0.0.4")

    return app
