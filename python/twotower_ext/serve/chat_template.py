"""A checkpoint's chat template, rendered as transformers renders it and no more powerfully.

A template is code that comes with the checkpoint. transformers (`apply_chat_template`) compiles it in
jinja2's ImmutableSandboxedEnvironment (no attribute starting with `_`, no method that mutates a list or a
dict: a template cannot reach Python internals), with trim_blocks and lstrip_blocks, the loopcontrols
extension, its own `tojson` filter (no HTML escaping, json.dumps' options), and the globals
`raise_exception(message)` and `strftime_now(format)`; it renders with `messages`, `add_generation_prompt`
and the tokenizer's special tokens (`bos_token`, `eos_token`, ...). The same here, plus the
`{% generation %}` block transformers uses to mark assistant text (rendered as its body).

A template that reaches Python internals for a plain conversation is refused when the server starts
(ChatTemplateError, a ValueError); one that does so only for some messages fails that request (a 400
naming `messages`).
"""
from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
PROBE = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Print 1."}]


class ChatTemplateError(ValueError):
    """A template that does not compile, or that reaches Python internals."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant tokens with it; rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def read_chat_template(path: str | None) -> tuple[str | None, dict]:
    """(template source or None, special tokens) of a checkpoint directory: chat_template.jinja, else
    tokenizer_config.json's "chat_template" (a string, or a list of named templates: "default"); special
    tokens from tokenizer_config.json (a string or {"content": ...})."""
    if not path:
        return None, {}
    cfg = {}
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    special = {}
    for k in SPECIAL_TOKENS:
        v = cfg.get(k)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            special[k] = v
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read(), special
    t = cfg.get("chat_template")
    if isinstance(t, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        t = next((d.get("template") for d in t if isinstance(d, dict) and d.get("name") == "default"), None)
    return (t if isinstance(t, str) else None), special


class ChatTemplate:
    """A compiled, sandboxed chat template. Raises ChatTemplateError when it does not compile or reaches
    Python internals while rendering a plain conversation."""

    def __init__(self, source: str, special_tokens: dict | None = None, where: str = "the chat template"):
        self.special_tokens = dict(special_tokens or {})
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{where} does not compile (line {e.lineno}: {e.message})") from None
        try:
            self.render(PROBE)
        except SecurityError as e:
            raise ChatTemplateError(f"{where} reaches Python internals, which the sandbox refuses ({e}); "
                                    "fix the template or serve without it") from None
        except Exception:  # noqa: BLE001  (a template may refuse this conversation, e.g. no system role)
            pass

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text. Raises jinja2's errors (TemplateError, SecurityError) and whatever the template
        raises: the caller reports them for the request."""
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    tools=None, documents=None, **self.special_tokens)
