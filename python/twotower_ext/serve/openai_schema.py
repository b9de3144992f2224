"""OpenAI request bodies: parsing and validation, and the error object.

Every field a client may send is either used, accepted as metadata (`user`), accepted at its neutral value
only (`top_p: 1`, `tools: []`, ...), or refused with a 400 naming it: nothing is ignored silently. Bodies
are parsed by hand (not by pydantic) so that each message names the field as the client spelled it.

`stop` / `stop_token_ids` and `logprobs` / `top_logprobs` become the decode core's parameters (its decode
rules, docs/semantics.md); `n` is that many requests with seeds derived from the request's.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

# serving fields (the scheduler's, request.FIELDS) a body may carry besides OpenAI's
SERVE_FIELDS = ("mode", "max_tokens", "block_size", "steps", "threshold", "temperature", "seed", "eos_token_id")
MAX_STOP = 4                         # stop sequences per request (OpenAI's bound)
MAX_N = 128                          # choices per request (OpenAI's bound)
MAX_LOGPROBS = {False: 5, True: 20}  # completions `logprobs`, chat `top_logprobs` (OpenAI's bounds)
CHAT_ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """An HTTP error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type, code

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param)


# Fields OpenAI defines that this server does not implement: accepted only at these neutral values.
NEUTRAL = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "top_p": (None, 1),
           "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
           "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
           "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,), "modalities": (None, ["text"]),
           "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "store": (None, False),
           "metadata": (None, {}), "service_tier": (None, "auto", "default"), "web_search_options": (None,),
           "verbosity": (None,), "prompt_cache_key": (None,), "safety_identifier": (None,)}
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "seed", "n", "stop", "stop_token_ids",
          "logprobs", "user", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "ignore_eos",
          *SERVE_FIELDS}
FIELDS = {False: COMMON | {"prompt", "echo", "best_of", "suffix"},
          True: COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                          "function_call", "response_format", "parallel_tool_calls", "modalities", "audio",
                          "prediction", "reasoning_effort", "store", "metadata", "service_tier",
                          "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier"}}


@dataclass
class ParsedRequest:
    """A validated /v1/completions or /v1/chat/completions body."""
    chat: bool
    params: dict                        # the scheduler's serving fields (request.FIELDS), defaults applied
    prompt: str | list[int] | None = None          # completions
    messages: list[dict] | None = None             # chat: [{role, content: str}]
    stream: bool = False
    include_usage: bool = False
    seed_drawn: bool = False            # an unseeded sampling request: params["seed"] was drawn here
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None         # completions: top alternatives per token; chat: 0 when logprobs=true
    top_logprobs: int | None = None     # chat


def _utf8(param: str, s: str) -> str:
    """s itself, or a 400 naming param when s holds text that is not UTF-8 (lone surrogates: \\ud800 escapes,
    or raw bytes that were not UTF-8, kept as surrogates when the body was decoded)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, f"{param}: the text is not valid UTF-8 (lone surrogates or undecodable bytes)") from None
    return s


def _int(body: dict, k: str, lo: int, hi: int | None = None):
    v = body.get(k)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise bad(k, f"{k} must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
    return v


def _bool(body: dict, k: str, default: bool = False) -> bool:
    v = body.get(k)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(k, f"{k} must be true or false, got {v!r}")
    return v


def _prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]           # a batch of one prompt
    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str):
        return _utf8("prompt", prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(v, list) or isinstance(v, str) for v in prompt):
        raise bad("prompt", "prompt: one prompt per request (a string or a list of token ids), got a batch of "
                            f"{len(prompt)}")
    if isinstance(prompt, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in prompt):
        return prompt
    raise bad("prompt", f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad("messages", f"{where} must be an object with role and content")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad("messages", f"{where}: {', '.join(sorted(extra))} not supported (no tools here)")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise bad("messages", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if isinstance(content, list):   # content parts: text only
            texts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise bad("messages", f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                          "are supported")
                texts.append(p["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad("messages", f"{where}.content must be a string or a list of text parts, got {content!r}")
        msg = {"role": role, "content": _utf8("messages", content)}
        if isinstance(m.get("name"), str):
            msg["name"] = _utf8("messages", m["name"])
        out.append(msg)
    return out


def _stop(body: dict) -> tuple[list[str], list[int]]:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop] if stop else []
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > MAX_STOP:
        raise bad("stop", f"stop must be a string or a list of at most {MAX_STOP} strings, got {body.get('stop')!r}")
    stop = [_utf8("stop", s) for s in stop if s]
    ids = body.get("stop_token_ids")
    if ids is None:
        ids = []
    if not (isinstance(ids, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids)):
        raise bad("stop_token_ids", f"stop_token_ids must be a list of token ids, got {ids!r}")
    return stop, ids


def parse_request(body, chat: bool, defaults: dict, model_name: str) -> ParsedRequest:
    """A ParsedRequest from a decoded JSON body, or an APIError naming the first bad field."""
    if not isinstance(body, dict):
        raise bad(None, "the body must be a JSON object")
    for k in body:
        if k not in FIELDS[chat]:
            hint = " (it belongs to /v1/chat/completions)" if k in FIELDS[True] else (
                " (it belongs to /v1/completions)" if k in FIELDS[False] else "")
            raise bad(k, f"{k}: unknown field{hint}")
    if body.get("model") is not None and body["model"] != model_name:
        raise APIError(404, f"model {body['model']!r} does not exist here (this server serves {model_name!r})",
                       "model", "invalid_request_error", "model_not_found")
    for k, ok in NEUTRAL.items():
        if k in body and body[k] not in ok:
            shown = " or ".join(repr(v) for v in ok if v is not None)
            raise bad(k, f"{k}: not supported by this server" + (f" (only {shown} is accepted)" if shown else ""))
    stream = _bool(body, "stream")
    include_usage = False
    if body.get("stream_options") is not None:
        so = body["stream_options"]
        if not stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        if not isinstance(so, dict) or set(so) - {"include_usage"}:
            raise bad("stream_options", f"stream_options must be {{\"include_usage\": true|false}}, got {so!r}")
        include_usage = _bool(so, "include_usage")
    p = {k: body[k] for k in SERVE_FIELDS if body.get(k) is not None}
    if "eos_token_id" in body:          # explicit null: no EOS stop
        p["eos_token_id"] = body["eos_token_id"]
    if _bool(body, "ignore_eos"):       # vLLM's name for the same (load tools send it to get exact lengths)
        if "eos_token_id" in body:
            raise bad("ignore_eos", "ignore_eos: send either ignore_eos or eos_token_id, not both")
        p["eos_token_id"] = None
    if chat and body.get("max_completion_tokens") is not None:
        p["max_tokens"] = body["max_completion_tokens"]
    params = {**defaults, **p}
    t = params.get("temperature", 0)
    drawn = False
    if "seed" not in p and isinstance(t, (int, float)) and t > 0:   # sampling without a seed: a fresh one
        params["seed"], drawn = secrets.randbits(63), True
    stop, stop_ids = _stop(body)
    if chat:
        lp = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, MAX_LOGPROBS[True])
        if top is not None and not lp:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        logprobs, top_logprobs = (top or 0) if lp else None, top
    else:
        logprobs, top_logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS[False]), None
    if stop:
        params["stop"] = stop
    if stop_ids:
        params["stop_token_ids"] = stop_ids
    if logprobs is not None:
        params["logprobs"] = logprobs
    req = ParsedRequest(chat=chat, params=params, stream=stream, include_usage=include_usage, seed_drawn=drawn,
                        n=_int(body, "n", 1, MAX_N) or 1, stop=stop, stop_token_ids=stop_ids, logprobs=logprobs,
                        top_logprobs=top_logprobs)
    if chat:
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
    return req
