"""The server under hostile sizes, load and shutdown, as a user runs it: the body limit (refused while the
body is read), /health within 100 ms (beyond the machine's own stalls) while a 10 MB prompt is refused and
while a long text is tokenised, and SIGTERM under load with a short grace period (every client gets a
well-formed answer, no traceback in the log, exit 0). `twotower serve` runs as a subprocess on 127.0.0.1, so the timings are the server's own."""
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import twotower_ext as tt

from serving import HTTP, Server, http, post, serve_subprocess, wait_for

if HTTP:
    import httpx
    import openai

pytestmark = pytest.mark.usefixtures("one_thread")
HEALTH_S = 0.1        # /health must answer within this, whatever the other clients send


def stop(proc) -> str:
    """SIGTERM a server with nothing in flight; its log."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    return proc.stderr.read()


@http
def test_body_limit_refuses_while_reading():
    lm = tt.load(tt.default_model_path(), dtype=torch.float32)
    srv = Server(lm, "m", max_batch=1, max_queue=1, max_len=64, app_kw={"max_body_bytes": 4096})
    try:
        body = json.dumps({"prompt": "x" * 5000}).encode()
        sent = []

        def chunks():             # no Content-Length: the limit is met while reading
            for i in range(0, len(body), 1000):
                sent.append(i)
                yield body[i:i + 1000]

        for content in (body, chunks()):
            r = httpx.post(srv.url + "/v1/completions", content=content, timeout=30)
            err = r.json()["error"]
            assert r.status_code == 413 and err["code"] == "body_too_large" and "4096" in err["message"]
        ok = post(srv, {"prompt": "def ", "max_tokens": 2})
        assert ok.status_code == 200 and len(json.dumps({"prompt": "def ", "max_tokens": 2})) < 4096
    finally:
        srv.close()


@http
def test_health_within_100ms_while_huge_prompts_are_refused():
    # max_len 16384 with the shipped tokenizer (tokens of at most 66 bytes): a text over 1.08 MB is refused
    # before it is tokenised; a shorter one is tokenised on the pool, then refused by its token count
    proc, url = serve_subprocess("--max-batch", "1", "--max-len", "16384", "--max-body-bytes", str(2 << 20),
                                 model=tt.default_model_path(), name="m")
    cases = [("10 MB body", b"def f(x): return x\\n" * 500_000, 413, "--max-body-bytes"),
             ("1.9 MB text", b"def f(x): return x\\n" * 95_000, 400, "bytes of text are at least"),
             ("0.4 MB text", b"def f(x): return x\\n" * 20_000, 400, "tokens leave no room")]
    try:
        with httpx.Client(timeout=10) as health:
            health.get(url + "/health")
            for what, text, status, words in cases:
                # The largest /health latency while the request is refused, less the longest stall this machine
                # gave a thread of this process meanwhile (a 1 ms sleep loop: on the shared, often saturated
                # 2-core machine a runnable thread can wait 100+ ms for a core, server or not); best of 3 tries.
                # Work on the event loop (a text tokenised there took seconds) shows in every try.
                excess = []
                for _ in range(3):
                    out, lat, stall = {}, [], [0.0]

                    def send():
                        out["r"] = httpx.post(url + "/v1/completions", content=b'{"prompt": "' + text + b'"}',
                                              timeout=60)

                    def control():
                        while t.is_alive():
                            t0 = time.perf_counter()
                            time.sleep(0.001)
                            stall[0] = max(stall[0], time.perf_counter() - t0 - 0.001)

                    t = threading.Thread(target=send)
                    t.start()
                    c = threading.Thread(target=control)
                    c.start()
                    while t.is_alive():
                        t0 = time.perf_counter()
                        assert health.get(url + "/health").status_code == 200
                        lat.append(time.perf_counter() - t0)
                    t.join()
                    c.join()
                    r = out["r"]
                    assert r.status_code == status and words in r.json()["error"]["message"], (what, r.text)
                    assert r.json()["error"]["param"] == (None if status == 413 else "prompt")
                    excess.append((max(lat) - stall[0], max(lat), stall[0]))
                    if excess[-1][0] < HEALTH_S:
                        break
                assert min(excess)[0] < HEALTH_S, f"{what}: /health took up to " + ", ".join(
                    f"{h * 1e3:.0f} ms (machine stall {s * 1e3:.0f} ms)" for _, h, s in excess)
        assert "Traceback" not in stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_stream(url: str, body: dict) -> dict:
    """A raw SSE client: {"status", "events": [decoded data lines], "done": saw [DONE]} or the JSON answer."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        if r.headers["content-type"].startswith("application/json"):
            r.read()
            return {"status": r.status_code, "json": r.json()}
        events, done = [], False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, "data after [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[6:]))
        return {"status": r.status_code, "events": events, "done": done}


@http
def test_sigterm_under_load_every_client_gets_a_well_formed_answer():
    proc, url = serve_subprocess("--max-batch", "4", "--max-queue", "16", "--max-len", "2048", "--shutdown-timeout",
                                 "1", "--threads", "100000")
    # one token per pass (threshold 1): seconds per request, so the three streams are surely live together
    long = {"prompt": [1, 5, 6], "mode": "diffusion", "max_tokens": 2000, "threshold": 1.0, "eos_token_id": None}
    short = {"prompt": [1, 7], "mode": "ar", "max_tokens": 8, "eos_token_id": None}
    try:
        with ThreadPoolExecutor(16) as pool:
            streams = [pool.submit(read_stream, url, long) for _ in range(3)]
            wait_for(lambda: httpx.get(url + "/health").json()["live_rows"] == 3, timeout=30)
            plain = [pool.submit(httpx.post, url + "/v1/completions", json=long, timeout=60) for _ in range(6)]
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

            def openai_stream():
                got = []
                try:
                    for c in client.completions.create(model="parity", prompt=[1, 9], max_tokens=2000, stream=True,
                                                       extra_body={"threshold": 1.0, "eos_token_id": None}):
                        got.append(c)
                    return "finished", got
                except openai.APIError as e:          # the error event, raised by the client as an APIError
                    return "error: " + str(e.message), got

            official = pool.submit(openai_stream)
            wait_for(lambda: httpx.get(url + "/health").json()["queue_depth"] >= 3, timeout=30)
            shorts = [pool.submit(httpx.post, url + "/v1/completions", json=short, timeout=60) for _ in range(2)]
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(url + "/health").status_code == 503)
            late = httpx.post(url + "/v1/completions", json=short, timeout=10)    # during the grace period
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
            cut = 0
            for f in streams:
                s = f.result()
                assert s["status"] == 200 and s["done"], s
                last = s["events"][-1]
                if "error" in last:       # cut: a final error event, then [DONE]
                    assert last["error"]["code"] == "shutting_down" and set(last["error"]) == {
                        "message", "type", "param", "code"}
                    cut += 1
                else:
                    assert last["choices"][0]["finish_reason"] == "length"
            for f in plain + shorts:
                r = f.result()
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "shutting_down"
                    cut += 1
                else:
                    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
            outcome, got = official.result()
            assert outcome == "finished" or outcome.startswith("error: the server is shutting down"), outcome
            assert cut >= 3    # the queued ones at least: 2000 tokens at one per pass outlast a 1 s grace
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert "server stopped" in log and "--threads 100000 is more than" in proc.startup_log, proc.startup_log
        for bad in ("Traceback", "Event loop is closed", "ERROR", "Exception"):
            assert bad not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@http
def test_a_second_signal_cuts_the_grace_period_short():
    proc, url = serve_subprocess("--max-batch", "2", "--max-len", "2048", "--shutdown-timeout", "600")
    long = {"prompt": [1, 5, 6], "mode": "diffusion", "max_tokens": 2000, "threshold": 1.0, "eos_token_id": None}
    try:
        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(read_stream, url, long)
            wait_for(lambda: httpx.get(url + "/health").json()["live_rows"] == 1, timeout=30)
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(url + "/health").status_code == 503)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)         # not 600 s: the request is cut now, and answered
            s = stream.result(timeout=60)
            assert s["done"] and s["events"][-1]["error"]["code"] == "shutting_down", s
        assert proc.wait(timeout=30) == 0 and time.monotonic() - t0 < 30
        log = proc.stderr.read()
        assert "second signal" in log and "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
