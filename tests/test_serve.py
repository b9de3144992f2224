"""Serving: the continuous-batching scheduler (results equal `generate` per row alone, cancellation, bounds,
shutdown) and the OpenAI-compatible HTTP server on 127.0.0.1 (official `openai` client and plain HTTP).
More of the OpenAI surface: test_serve_openai.py; limits, faults and shutdown: test_serve_limits.py."""
import json
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import twotower_ext as tt
from twotower_ext.serve import QueueFull, RequestError, Scheduler, ShuttingDown
from twotower_ext.threads import using_threads

from serving import HTTP, PARITY, Server, http, post, serve_subprocess, wait_for

if HTTP:
    import httpx
    import openai


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like `twotower serve` on these small models: one intra-op thread (on a loaded 2-core machine two
    OpenMP threads per op make every pass many times slower, and the server and the test share the cores)."""
    with using_threads(1):
        yield


@pytest.fixture(scope="module")
def lm():
    return tt.load(PARITY, dtype=torch.float32)


def mixed_requests(n: int, seed: int, vocab: int = 512, max_tokens: int = 40):
    """n requests mixing modes, lengths, block sizes, steps, thresholds, temperatures, seeds and EOS ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mode = rng.choice(["diffusion", "diffusion", "diffusion", "ar", "mock_ar"])
        p = dict(mode=mode, max_tokens=rng.randint(1, max_tokens), seed=rng.randint(0, 9),
                 temperature=rng.choice([0.0, 0.0, 0.0, 0.8]), eos_token_id=rng.choice([None, 2, rng.randint(4, vocab - 1)]))
        if mode == "diffusion":
            p.update(block_size=rng.choice([4, 8, 16]), steps=rng.choice([4, 8, 16]),
                     threshold=rng.choice([0.5, 0.8, 0.95]))
        out.append(([1] + [rng.randint(4, vocab - 1) for _ in range(rng.randint(1, 30))], p))
    return out


def offline(lm, prompt, p):
    kw = dict(mode=p["mode"], max_new_tokens=p["max_tokens"], seed=p["seed"], temperature=p["temperature"],
              eos_token_id=p["eos_token_id"])
    if p["mode"] == "diffusion":
        kw.update(block_size=p["block_size"], steps_per_block=p["steps"], threshold=p["threshold"])
    res = lm.generate([prompt], **kw)
    return res.new_tokens[0], res.stats["nfe"]


# ----------------------------------------------------------------------------------------------------
# scheduler


def test_scheduler_rows_equal_generate_alone(lm):
    reqs = mixed_requests(24, seed=1)
    s = Scheduler(lm, max_batch=6, max_queue=64, max_len=128)
    try:
        hs = [s.submit(prompt, **p) for prompt, p in reqs]
        for h in hs:
            h.result(timeout=60)
        wait_for(lambda: s.load()["live_rows"] == 0 and s.load()["queue_depth"] == 0)   # rows freed
        for (prompt, p), h in zip(reqs, hs):
            want, nfe = offline(lm, prompt, p)
            assert h.tokens == want, p
            assert h.nfe == nfe, p
            assert h.finish_reason == ("stop" if p["eos_token_id"] in want else "length")
        m = s.metrics
        assert m.value("generation_tokens_total") == sum(len(h.tokens) for h in hs)
        assert m.value("nfe_total") == sum(h.nfe for h in hs)
        assert m.value("passes_total") < m.value("nfe_total")                    # rows shared passes
    finally:
        s.shutdown()


def test_rows_at_different_blocks_and_parameters_share_passes(lm):
    s = Scheduler(lm, max_batch=4, max_queue=4, max_len=128)
    base = dict(mode="diffusion", block_size=8, eos_token_id=None, seed=0, temperature=0.0)
    reqs = [([1, 5, 6, 7], dict(base, max_tokens=40, steps=8, threshold=1.0)),
            ([1, 40], dict(base, max_tokens=30, steps=8, threshold=0.5, temperature=0.9, seed=3)),
            ([1, 41, 42, 43, 44, 45], dict(base, max_tokens=21, steps=4, threshold=0.8)),
            ([1, 46, 47], dict(base, max_tokens=33, steps=8, threshold=1.0, temperature=0.5, seed=4))]
    try:
        first = s.submit(reqs[0][0], **reqs[0][1])
        wait_for(lambda: len(first.tokens) >= 8)      # it is in its second block (or later) when the others join
        hs = [first] + [s.submit(prompt, **p) for prompt, p in reqs[1:]]
        for (prompt, p), h in zip(reqs, hs):
            assert (h.result(30).tokens, h.nfe) == offline(lm, prompt, p), p
        m = s.metrics
        assert m.value("passes_total") < sum(h.nfe for h in hs)
        assert m.value("rows_per_pass_count") == m.value("passes_total")
        assert m.value("rows_per_pass_bucket", le="2.0") < m.value("passes_total")   # some passes carried 3-4 rows
    finally:
        s.shutdown()


def test_scheduler_streams_blocks_in_order(lm):
    s = Scheduler(lm, max_batch=2, max_queue=4, max_len=64)
    try:
        h = s.submit([1, 501, 95], mode="diffusion", max_tokens=20, block_size=8, eos_token_id=None)
        evs = list(h.events(timeout=30))
        assert [e[0] for e in evs] == ["tokens", "tokens", "tokens", "done"]
        assert [len(e[1]) for e in evs[:3]] == [8, 8, 4]                 # per block, partial last block
        assert sum((e[1] for e in evs[:3]), []) == h.tokens == offline(
            lm, [1, 501, 95], dict(mode="diffusion", max_tokens=20, block_size=8, steps=16, threshold=0.8, seed=0,
                                   temperature=0.0, eos_token_id=None))[0]
    finally:
        s.shutdown()


def test_scheduler_cancel_frees_the_row(lm):
    s = Scheduler(lm, max_batch=1, max_queue=2, max_len=512)
    try:
        long = s.submit([1, 5, 6], mode="diffusion", max_tokens=400, threshold=1.0, eos_token_id=None)
        queued = s.submit([1, 7], mode="ar", max_tokens=4, eos_token_id=None)
        wait_for(lambda: long.tokens)                 # it holds the only row and has committed a block
        queued.cancel()
        long.cancel()
        assert long.result(10).finish_reason == "cancelled" and 0 < len(long.tokens) < 400
        assert queued.result(10).finish_reason == "cancelled" and queued.tokens == []
        after = s.submit([1, 7], mode="ar", max_tokens=4, eos_token_id=None).result(10)
        assert after.tokens == offline(lm, [1, 7], dict(mode="ar", max_tokens=4, seed=0, temperature=0.0,
                                                        eos_token_id=None))[0]
        wait_for(lambda: s.load()["live_rows"] == 0)
    finally:
        s.shutdown()


def test_scheduler_bounds_and_bad_fields(lm):
    s = Scheduler(lm, max_batch=1, max_queue=1, max_len=64)
    try:
        for kw, field in [(dict(max_tokens=0), "max_tokens"), (dict(threshold=1.5), "threshold"),
                          (dict(mode="beam"), "mode"), (dict(block_size=0), "block_size"), (dict(steps=0), "steps"),
                          (dict(temperature=-1.0), "temperature"), (dict(seed=-1), "seed"),
                          (dict(eos_token_id=9999), "eos_token_id"), (dict(max_tokens=True), "max_tokens"),
                          (dict(max_tokens=100), "max_tokens"), (dict(top_k=5), "top_k")]:
            with pytest.raises(RequestError, match=field) as e:
                s.submit([1, 2], **kw)
            assert e.value.field == field
        for prompt in ([], [1, 512], "text", [1.5]):
            with pytest.raises(RequestError) as e:
                s.submit(prompt)
            assert e.value.field == "prompt"
        hs = [s.submit([1, 5], mode="diffusion", max_tokens=48, threshold=1.0, eos_token_id=None)]
        with pytest.raises(QueueFull):     # one live row + one waiting, then full (whichever has started)
            for _ in range(3):
                hs.append(s.submit([1, 5], mode="ar", max_tokens=2))
        assert len(hs) in (2, 3)
        for h in hs:
            h.result(30)
    finally:
        s.shutdown()
    with pytest.raises(ShuttingDown):
        s.submit([1, 2])


def test_scheduler_shutdown_finishes_in_flight(lm):
    s = Scheduler(lm, max_batch=2, max_queue=4, max_len=64)
    hs = [s.submit([1, 9, 10], mode=m, max_tokens=24, eos_token_id=None) for m in ("diffusion", "ar", "mock_ar")]
    s.shutdown(grace_s=30)
    assert [h.finish_reason for h in hs] == ["length"] * 3 and all(len(h.tokens) == 24 for h in hs)
    s = Scheduler(lm, max_batch=1, max_queue=4, max_len=512)
    hs = [s.submit([1, 9], mode="diffusion", max_tokens=400, threshold=1.0, eos_token_id=None) for _ in range(2)]
    wait_for(lambda: hs[0].tokens)
    s.shutdown(grace_s=0)                        # no grace: the live and the queued request are cancelled
    assert [h.finish_reason for h in hs] == ["cancelled", "cancelled"]


def test_a_failed_pass_fails_its_rows_and_the_server_goes_on(lm, monkeypatch):
    s = Scheduler(lm, max_batch=2, max_queue=2, max_len=64)
    real, calls = lm.model.denoise_commit, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    monkeypatch.setattr(lm.model, "denoise_commit", flaky)
    try:
        h = s.submit([1, 5], mode="diffusion", max_tokens=8)
        with pytest.raises(RuntimeError, match="injected failure"):
            h.result(10)
        assert h.finish_reason == "error" and s.metrics.requests == {"error": 1}
        ok = s.submit([1, 5], mode="diffusion", max_tokens=8, eos_token_id=None).result(10)
        monkeypatch.undo()
        assert ok.tokens == offline(lm, [1, 5], dict(mode="diffusion", max_tokens=8, block_size=16, steps=16,
                                                     threshold=0.8, seed=0, temperature=0.0, eos_token_id=None))[0]
    finally:
        s.shutdown()


def test_generate_is_thread_safe(lm):
    reqs = mixed_requests(8, seed=2)
    want = [offline(lm, prompt, p) for prompt, p in reqs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: offline(lm, *r), reqs))
    assert got == want


# ----------------------------------------------------------------------------------------------------
# HTTP



@pytest.fixture(scope="module")
def parity_server(lm):
    srv = Server(lm, "parity", max_batch=8, max_queue=16, max_len=2048)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def shipped():
    lm = tt.load(tt.default_model_path(), dtype=torch.float32)
    srv = Server(lm, "default_model", max_batch=4, max_queue=8, max_len=256)
    yield lm, srv
    srv.close()


@http
def test_http_64_requests_at_concurrency_16_equal_generate(lm, parity_server):
    reqs = mixed_requests(64, seed=3, max_tokens=28)

    def one(r):
        prompt, p = r
        body = {"model": "parity", "prompt": prompt, **p}
        if p["eos_token_id"] is None:
            body["eos_token_id"] = None
        for _ in range(50):    # a 429 (queue full) is an answer too: retry after a moment
            resp = post(parity_server, body)
            if resp.status_code != 429:
                return resp
            time.sleep(0.05)
        return resp

    with ThreadPoolExecutor(16) as pool:
        resps = list(pool.map(one, reqs))
    ids = set()
    for (prompt, p), resp in zip(reqs, resps):
        assert resp.status_code == 200, resp.text
        out = resp.json()
        ids.add(out["id"])
        want, nfe = offline(lm, prompt, p)
        assert out["choices"][0]["token_ids"] == want, p
        assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(want),
                                "total_tokens": len(prompt) + len(want), "nfe": nfe}
        assert out["choices"][0]["finish_reason"] == ("stop" if p["eos_token_id"] in want else "length")
    assert len(ids) == 64
    wait_for(lambda: parity_server.sched.load()["live_rows"] == 0)
    metrics = httpx.get(parity_server.url + "/metrics").text
    label = '{model_name="parity"}'
    assert f"twotower:num_requests_running{label} 0.0" in metrics
    assert parity_server.sched.metrics.value("generation_tokens_total") >= sum(
        r.json()["usage"]["completion_tokens"] for r in resps)


@http
@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"threshold": 2}, "threshold"), ({"mode": "beam"}, "mode"),
    ({"block_size": 0}, "block_size"), ({"steps": 0}, "steps"), ({"temperature": -1}, "temperature"),
    ({"seed": "x"}, "seed"), ({"prompt": []}, "prompt"), ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "text"}, "prompt"), ({"prompt": None}, "prompt"), ({"n": 0}, "n"), ({"stop": ["\n"]}, "stop"),
    ({"foo": 1}, "foo"), ({"max_tokens": 5000}, "max_tokens"), ({"stream": "yes"}, "stream")])
def test_http_bad_fields_are_400_naming_the_field(parity_server, body, field):
    resp = post(parity_server, {"prompt": [1, 2, 3], **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == field and field in err["message"]


@http
def test_http_bad_json_and_no_chat_template(parity_server):
    resp = httpx.post(parity_server.url + "/v1/completions", content=b"{not json", timeout=10)
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    resp = post(parity_server, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert resp.status_code == 400 and "no chat template" in resp.json()["error"]["message"]
    resp = post(parity_server, {"model": "gpt-4", "prompt": [1, 2]})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"


@http
def test_http_queue_full_is_429_at_once(lm):
    srv = Server(lm, "parity", max_batch=1, max_queue=1, max_len=512)
    try:
        # one token per pass (threshold 1): ~0.5 s of passes on the 2-core VM, so it is surely still live below
        slow = {"prompt": [1, 5, 6], "mode": "diffusion", "max_tokens": 480, "threshold": 1.0, "eos_token_id": None}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, srv, slow)
            wait_for(lambda: srv.sched.load()["live_rows"] == 1)
            second = pool.submit(post, srv, {**slow, "max_tokens": 4})
            wait_for(lambda: srv.sched.load()["queue_depth"] == 1)
            t0 = time.perf_counter()
            third = post(srv, {**slow, "max_tokens": 4})
            assert third.status_code == 429 and time.perf_counter() - t0 < 5
            assert third.json()["error"]["type"] == "rate_limit_exceeded"
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        srv.close()


@http
def test_http_client_disconnect_cancels_and_frees_the_row(parity_server):
    sched = parity_server.sched
    before = sched.metrics.requests.get("cancelled", 0)
    # one token per pass (threshold 1): 2000 passes, seconds of work (400 took ~0.5 s on the 2-core VM once the CPU
    # passes got faster, as long as the non-streaming client's timeout, and the request sometimes finished first)
    body = {"prompt": [1, 5, 6], "mode": "diffusion", "max_tokens": 2000, "threshold": 1.0, "eos_token_id": None}
    with httpx.stream("POST", parity_server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break                                  # one block arrived; now hang up
    with pytest.raises(httpx.ReadTimeout):             # a non-streaming client that gives up
        post(parity_server, body, timeout=0.5)
    wait_for(lambda: sched.metrics.requests.get("cancelled", 0) == before + 2)
    wait_for(lambda: sched.load()["live_rows"] == 0)


@http
def test_http_openai_client_text_and_streaming(shipped):
    lm, srv = shipped
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["default_model"]
    prompt = "def add(a, b):\n"
    r = client.completions.create(model="default_model", prompt=prompt, max_tokens=24)
    want = lm.generate(prompt, max_new_tokens=24).new_tokens[0]
    assert r.choices[0].text == lm.decode(want) and r.usage.completion_tokens == len(want)
    assert r.usage.model_extra["nfe"] >= 1
    chunks = list(client.completions.create(model="default_model", prompt=prompt, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"mode": "diffusion", "block_size": 8, "threshold": 0.9}))
    want = lm.generate(prompt, max_new_tokens=40, block_size=8, threshold=0.9).new_tokens[0]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == lm.decode(want)
    assert len(chunks) == len(range(0, len(want), 8)) + 2           # one event per committed block, the end, usage
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)   # OpenAI's usage chunk
    ar = list(client.completions.create(model="default_model", prompt=prompt, max_tokens=5, stream=True,
                                        extra_body={"mode": "ar", "eos_token_id": None}))
    assert len(ar) == 6                                              # one event per token in the AR modes
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="default_model", messages=[{"role": "user", "content": "hi"}])
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["live_rows"] == 0


@http
def test_http_chat_with_a_template(tmp_path):
    pytest.importorskip("jinja2")
    import shutil

    ckpt = tmp_path / "chat"
    shutil.copytree(tt.default_model_path(), ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}# {{ m.role }}: {{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}# assistant:{% endif %}"}))
    lm = tt.load(str(ckpt), dtype=torch.float32)
    srv = Server(lm, "chat", max_batch=2, max_queue=2, max_len=128)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "print hello"}],
                                           max_tokens=16)
        want = lm.generate("# user: print hello\n# assistant:", max_new_tokens=16).new_tokens[0]
        assert r.choices[0].message.content == lm.decode(want) and r.choices[0].message.role == "assistant"
        chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "print hello"}],
                                                     max_tokens=16, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == lm.decode(want)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
        assert all(c.choices[0].delta.role is None for c in chunks[1:]) and chunks[-1].usage is None
    finally:
        srv.close()


@http
def test_cli_serve_sigterm_finishes_in_flight_and_exits_cleanly():
    proc, url = serve_subprocess("--max-batch", "2", "--max-queue", "4", "--max-len", "2048", "--shutdown-timeout", "120")
    try:   # one token per pass (threshold 1): long enough that both are surely live together
        body = {"prompt": [1, 5, 6], "mode": "diffusion", "max_tokens": 2000, "threshold": 1.0, "eos_token_id": None}
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
            wait_for(lambda: httpx.get(url + "/health").json()["live_rows"] == 2, timeout=30)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(url + "/health").status_code == 503)
            late = httpx.post(url + "/v1/completions", json=body, timeout=10)   # still listening: a 503 answer
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            for f in futs:                         # in-flight requests still complete, whole
                resp = f.result()
                assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2000
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert "server stopped" in log and "Traceback" not in log, log
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
