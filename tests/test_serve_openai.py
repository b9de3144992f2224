"""The OpenAI surface of the HTTP server, driven with the official `openai` client where it applies: the
error object on every error, models by id, refused and neutral parameters, the chat stream's role chunk and
`stream_options.include_usage`, unseeded sampling, text that is not UTF-8, the sandboxed chat template,
incremental detokenization and the Prometheus metrics."""
import json
import random
import shutil

import pytest
import torch

import twotower_ext as tt
from twotower_ext.runtime.detokenize import TextStream
from twotower_ext.serve.chat_template import ChatTemplate, ChatTemplateError

from serving import HTTP, Server, http, post

if HTTP:
    import httpx
    import openai

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}# {{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}# assistant:{% endif %}")


def chat_checkpoint(tmp_path, template: str, name: str = "chat") -> str:
    """The shipped model with a chat template (and a bos_token) in its tokenizer_config.json."""
    ckpt = tmp_path / name
    shutil.copytree(tt.default_model_path(), ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    return str(ckpt)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(lm, server, openai client) of the shipped model with TEMPLATE."""
    lm = tt.load(chat_checkpoint(tmp_path_factory.mktemp("chat"), TEMPLATE), dtype=torch.float32)
    srv = Server(lm, "chat", max_batch=4, max_queue=8, max_len=256)
    yield lm, srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    srv.close()


def assert_error(resp, status: int, param=None, words=()):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body
    for w in words:
        assert w in body["error"]["message"], (w, body)
    return body["error"]


# ----------------------------------------------------------------------------------------------------
# errors and models


@http
def test_every_error_is_the_openai_error_object(chat, monkeypatch):
    lm, srv, client = chat
    assert_error(httpx.get(srv.url + "/nope"), 404, None, ["GET /nope"])
    assert_error(httpx.delete(srv.url + "/v1/completions"), 405, None, ["DELETE"])
    assert_error(httpx.post(srv.url + "/v1/completions", content=b"{not json"), 400, None, ["JSON"])
    assert_error(httpx.post(srv.url + "/v1/completions", content=b'{"prompt": NaN}'), 400, None, ["NaN"])
    assert_error(httpx.post(srv.url + "/v1/completions", content=b"[" * 100000), 400, None, ["JSON"])
    assert_error(post(srv, {"model": "gpt-4", "prompt": "x"}), 404, "model", ["gpt-4"])

    @srv.app.get("/typed")            # FastAPI's own request validation (422)
    async def typed(n: int):
        return {"n": n}

    assert_error(httpx.get(srv.url + "/typed", params={"n": "x"}), 422, "n")

    def broken(*a, **kw):
        raise KeyError("injected")

    monkeypatch.setattr(srv.sched, "submit", broken)   # an exception no handler expects: 500, not plain text
    err = assert_error(post(srv, {"prompt": "x"}), 500, None, ["KeyError"])
    assert err["type"] == "server_error"


@http
def test_models_by_id(chat):
    lm, srv, client = chat
    assert client.models.retrieve("chat").id == "chat"
    assert [m.id for m in client.models.list().data] == ["chat"]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found" and e.value.param == "model"


# ----------------------------------------------------------------------------------------------------
# parameters

REFUSED = [  # (endpoint, field, value): each a 400 naming the field
    ("completions", "echo", True),
    ("completions", "best_of", 2), ("completions", "suffix", "x"), ("completions", "top_p", 0.5),
    ("completions", "presence_penalty", 1.0), ("completions", "frequency_penalty", -1.0),
    ("completions", "logit_bias", {"5": 10}), ("completions", "tools", [{"type": "function"}]),
    ("chat", "top_logprobs", 2),   # without logprobs: true
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]), ("chat", "tool_choice", "auto"),
    ("chat", "functions", [{"name": "f"}]), ("chat", "function_call", "auto"),
    ("chat", "response_format", {"type": "json_object"}), ("chat", "parallel_tool_calls", True),
    ("chat", "modalities", ["text", "audio"]), ("chat", "audio", {"voice": "alloy"}), ("chat", "store", True),
    ("chat", "reasoning_effort", "high"), ("chat", "prompt", "x"), ("chat", "foo", 1),
    # validation before refusal: the message names the field and what it must be
    ("completions", "stop", ["a", "b", "c", "d", "e"]), ("completions", "logprobs", 6), ("chat", "top_logprobs", 21),
    ("completions", "n", 0), ("completions", "n", 129), ("completions", "stop_token_ids", [-1]), ("completions", "stream_options", {"include_usage": True}),
]


@http
@pytest.mark.parametrize("endpoint, field, value", REFUSED)
def test_unsupported_parameters_are_400_naming_them(chat, endpoint, field, value):
    lm, srv, client = chat
    kw = dict(model="chat", max_tokens=4, extra_body={field: value})
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)
        else:
            client.completions.create(prompt="def ", **kw)
    assert e.value.param == field and field in e.value.message, e.value.message


@http
def test_chat_logprobs_and_stop(chat):
    """Chat's logprobs shape (content entries: token, logprob, bytes, top_logprobs of top_logprobs entries)
    and a stop string (the text cut before it; tests/test_serve_decode_rules.py has the rules themselves)."""
    lm, srv, client = chat
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="chat", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=2,
                                       extra_body={"eos_token_id": None})
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 8
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
               for e in entries)
    text = r.choices[0].message.content
    stop = text[3:5]
    if stop.strip() and text.find(stop) == 3:
        s = client.chat.completions.create(model="chat", messages=msgs, max_tokens=8, stop=stop,
                                           extra_body={"eos_token_id": None})
        assert s.choices[0].message.content == text[:3] and s.choices[0].finish_reason == "stop"


@http
def test_neutral_values_and_metadata_are_accepted(chat):
    lm, srv, client = chat
    want = lm.decode(lm.generate("def ", max_new_tokens=8).new_tokens[0])
    r = client.completions.create(model="chat", prompt="def ", max_tokens=8, n=1, top_p=1, stop=None, echo=False,
                                  best_of=1, presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u1",
                                  extra_body={"stop_token_ids": [], "logprobs": None})
    assert r.choices[0].text == want
    r = client.completions.create(model="chat", prompt="def ", max_tokens=40, extra_body={"ignore_eos": True})
    assert r.choices[0].token_ids == lm.generate("def ", max_new_tokens=40, eos_token_id=None).new_tokens[0]
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        client.completions.create(model="chat", prompt="def ", extra_body={"ignore_eos": True, "eos_token_id": 2})
    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": [{"type": "text",
                                                                                            "text": "hi"}]}],
                                       max_completion_tokens=8, tools=[], tool_choice="none", logprobs=False,
                                       response_format={"type": "text"}, store=False, user="u1")
    assert r.choices[0].message.content == lm.decode(lm.generate("<s># user: hi\n# assistant:",
                                                                 max_new_tokens=8).new_tokens[0])


@http
def test_chat_stream_role_first_and_usage_only_when_asked(chat):
    lm, srv, client = chat
    msgs = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "print hello"}]
    want = lm.generate("<s># system: Write Python.\n# user: print hello\n# assistant:", max_new_tokens=20).new_tokens[0]
    chunks = list(client.chat.completions.create(model="chat", messages=msgs, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == lm.decode(want)
    plain = list(client.chat.completions.create(model="chat", messages=msgs, max_tokens=20, stream=True))
    assert all(c.usage is None for c in plain) and len(plain) == len(chunks) - 1


@http
def test_unseeded_sampling_draws_a_fresh_seed_and_a_seed_reproduces(chat):
    lm, srv, client = chat
    prompt = "import "
    outs = [client.completions.create(model="chat", prompt=prompt, max_tokens=24, temperature=1.0) for _ in range(3)]
    seeds = [o.model_extra["seed"] for o in outs]
    assert len(set(seeds)) == 3                     # each unseeded request drew its own seed, and says which
    for o, seed in zip(outs, seeds):                # that seed gives the same text again, here and offline
        again = client.completions.create(model="chat", prompt=prompt, max_tokens=24, temperature=1.0, seed=seed)
        assert again.choices[0].text == o.choices[0].text and "seed" not in again.model_extra
        want = lm.generate(prompt, max_new_tokens=24, temperature=1.0, seed=seed).new_tokens[0]
        assert o.choices[0].token_ids == want
    greedy = client.completions.create(model="chat", prompt=prompt, max_tokens=8)
    assert "seed" not in greedy.model_extra


@http
def test_text_that_is_not_utf8_or_not_a_prompt_is_400_naming_the_field(chat):
    lm, srv, client = chat
    url = srv.url + "/v1/completions"
    assert_error(httpx.post(url, content=b'{"prompt": "a\\ud800b"}'), 400, "prompt", ["UTF-8"])
    assert_error(httpx.post(url, content=b'{"prompt": "a\xff\xfeb"}'), 400, "prompt", ["UTF-8"])
    for bad in ({"a": 1}, 5, [1.5, 2], [True], ["a", "b"], [[1, 2], [3]], None):
        assert_error(post(srv, {"prompt": bad}), 400, "prompt", ["prompt"])
    msgs = b'{"messages": [{"role": "user", "content": "\\udfff"}]}'
    assert_error(httpx.post(srv.url + "/v1/chat/completions", content=msgs), 400, "messages", ["UTF-8"])
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": 5}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                [{"role": "assistant", "content": None, "tool_calls": []}]):
        assert_error(post(srv, {"messages": bad}, "/v1/chat/completions"), 400, "messages", ["messages"])


# ----------------------------------------------------------------------------------------------------
# chat templates


def test_chat_template_renders_as_transformers_does():
    t = ChatTemplate(
        "{%- for m in messages %}\n"                          # trim_blocks / lstrip_blocks: no stray newlines
        "    {%- if m.role == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}\n"
        "    {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.role }}={{ m.content | tojson }}{% endif %};\n"
        "    {% if loop.index == 3 %}{% break %}{% endif %}\n"
        "{% endfor %}{{ bos_token }}{{ strftime_now('%Y') | length }}",
        {"bos_token": "<s>"})
    msgs = [{"role": "user", "content": "é<b>&\"x\""}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "2"}, {"role": "user", "content": "never"}]
    # tojson: json.dumps without ASCII or HTML escaping; {% break %} (loopcontrols); strftime_now; the
    # newline after a block tag dropped and the indentation before one stripped (a plain Environment keeps both)
    assert t.render(msgs) == 'user="é<b>&\\"x\\"";\nok;\nuser="2";\n<s>4'
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="system must come first"):
        t.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}{{ x }}",   # no mutation either
])
def test_chat_template_reaching_python_internals_is_refused_at_startup(source):
    with pytest.raises(ChatTemplateError, match="reaches Python internals"):
        ChatTemplate(source, {})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", {})


@http
def test_serve_refuses_such_a_template_and_a_request_that_triggers_one(tmp_path, capsys):
    from twotower_ext.cli import main

    evil = chat_checkpoint(tmp_path, "{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil")
    assert main(["serve", "--model", evil, "--port", "0"]) == 2          # a one-line startup error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("twotower: ") and "reaches Python internals" in err[0]
    # internals reached only for some messages: that request is a 400 naming messages, the server goes on
    sly = ("{% for m in messages %}{% if m.content == 'open sesame' %}{{ m.__class__.__mro__ }}{% endif %}"
           "{{ m.content }}{% endfor %}")
    lm = tt.load(chat_checkpoint(tmp_path, sly, "sly"), dtype=torch.float32)
    srv = Server(lm, "sly", max_batch=1, max_queue=1, max_len=64)
    try:
        bad = post(srv, {"messages": [{"role": "user", "content": "open sesame"}]}, "/v1/chat/completions")
        assert_error(bad, 400, "messages", ["chat template", "SecurityError"])
        ok = post(srv, {"messages": [{"role": "user", "content": "def "}], "max_tokens": 4}, "/v1/chat/completions")
        assert ok.status_code == 200
    finally:
        srv.close()


# ----------------------------------------------------------------------------------------------------
# detokenization and metrics


def test_text_stream_is_the_whole_decode_whatever_the_chunks(gen):
    lm = tt.load(tt.default_model_path(), dtype=torch.float32)
    tok = lm.tokenizer
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    texts = ["héllo wörld ✓ 日本語 🙂 ok", "def f():\n    return 'ñ'\n"]
    cases = [tok.encode(t).ids for t in texts] + [[rng.randrange(tok.get_vocab_size()) for _ in range(60)]
                                                  for _ in range(20)]   # random ids: bytes that are not UTF-8
    for c, ids in enumerate(cases):
        for _ in range(5):
            s, out, i = TextStream(tok), [], 0
            while i < len(ids):
                k = rng.randint(1, 17)          # blocks of any size, so characters split across them
                out.append(s.add(ids[i:i + k]))
                i += k
            out.append(s.finish())
            assert "".join(out) == lm.decode(ids), ids
            if c < len(texts):                  # valid text: never half a character in a piece
                assert not any("\ufffd" in piece for piece in out), out


@http
def test_metrics_use_vllm_names_and_one_registry_per_server(chat):
    from prometheus_client.parser import text_string_to_metric_families

    lm, srv, client = chat
    other = Server(tt.load(tt.default_model_path(), dtype=torch.float32), "other", max_batch=1, max_queue=1,
                   max_len=64)   # a second server in this process
    try:
        rs = [client.completions.create(model="chat", prompt="def ", max_tokens=n) for n in (5, 20, 33)]
        assert post(other, {"prompt": "x", "max_tokens": 2}).status_code == 200
        text = httpx.get(srv.url + "/metrics").text
        fams = {f.name: f for f in text_string_to_metric_families(text)}   # a valid exposition
        label = {"model_name": "chat"}

        def value(name, **labels):
            return next(s.value for f in fams.values() for s in f.samples
                        if s.name == "twotower:" + name and s.labels == {**label, **labels})

        m = srv.sched.metrics
        gen_tokens = m.value("generation_tokens_total")
        assert value("generation_tokens_total") == gen_tokens >= sum(r.usage.completion_tokens for r in rs)
        for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total",
                     "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                     "e2e_request_latency_seconds_count", "request_time_per_output_token_seconds_count",
                     "request_prompt_tokens_count", "request_generation_tokens_count", "nfe_total", "passes_total",
                     "rows_per_pass_count", "denoiser_passes_per_block_count", "tokens_per_pass_count"):
            assert value(name) >= 0, name
        assert value("request_success_total", finished_reason="length") >= 3
        assert value("time_to_first_token_seconds_count") >= 3 and value("inter_token_latency_seconds_count") >= 1
        assert value("tokens_per_pass_sum") > 0 and value("denoiser_passes_per_block_sum") >= value(
            "denoiser_passes_per_block_count")
        assert 'model_name="other"' not in text and other.sched.metrics.value("generation_tokens_total") == 2
        assert value("num_requests_running") == 0
    finally:
        other.close()
