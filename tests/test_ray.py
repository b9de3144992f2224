"""The Ray Serve fleet (twotower_ext.serve.ray) on a local Ray cluster on 127.0.0.1: 2 replicas of the shipped
model on the CPU, one thread each, behind the OpenAI routes of `twotower serve`. Greedy outputs equal
`generate`; requests land on the replica the routing policy names for their prompt's head; the fleet's
/metrics carries every replica's series; a replica killed during a burst leaves every request answered
(a result, or an OpenAI error where its stream had started) and the fleet whole again. One cluster for the
module, shut down by the fixture, which then checks that none of the processes Ray started is left."""
import importlib.util
import json
import os
import re
import threading
import time

import pytest
import torch

import twotower_ext as tt
from twotower_ext.serve.ray.policy import affinity_key, rendezvous_order

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("httpx") is None,
                       reason="ray (pip install 'twotower_ext[ray]'; CI installs it) or httpx is not installed: the "
                              "Ray Serve fleet is not tested here"),
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`"),   # Ray's own pydantic use
]

APP = "tt_test"
OPTS = {"replicas": 2, "threads": 1, "max_batch": 8, "max_queue": 16, "max_len": 1100, "metrics_period_s": 0.5}
TIMEOUT = 60        # seconds any one HTTP request may take


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def running(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(p)
        except OSError:
            pass
    return alive


class Fleet:
    def __init__(self, port: int):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT)

    def complete(self, body: dict):
        """(status, replica header, JSON body) of a non-streamed POST /v1/completions."""
        r = self.http.post("/v1/completions", json=body)
        return r.status_code, r.headers.get("x-twotower-replica"), r.json()

    def stream(self, body: dict, on_first=None):
        """(status, replica, data events, done) of a streamed completion; on_first() after the first event."""
        import httpx

        events = []
        with httpx.stream("POST", self.url + "/v1/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
            replica = r.headers.get("x-twotower-replica")
            done = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 1 and on_first is not None:
                    on_first(replica)
            return r.status_code, replica, events, done

    def replica_ids(self) -> set[str]:
        return set(re.findall(r'replica="([^"]+)"', self.http.get("/metrics").text))

    def gauge(self, name: str, replica: str, labels: str = "") -> float:
        """The value of series `name` of `replica` that has `labels` too (`a="x",b="y"`; others may be there
        as well, e.g. model_name) on the fleet's /metrics."""
        want = {f'replica="{replica}"', *(labels.split(",") if labels else ())}
        for m in re.finditer(rf'^{re.escape(name)}{{(.*)}} (\S+)$', self.http.get("/metrics").text, re.M):
            if want <= set(re.findall(r'\w+="(?:[^"\\]|\\.)*"', m.group(1))):
                return float(m.group(2))
        return 0.0

    def wait_for_replicas(self, n: int, exclude: set = frozenset(), timeout: float = 120) -> set[str]:
        end = time.monotonic() + timeout
        while True:
            ids = self.replica_ids() - set(exclude)
            if len(ids) >= n:
                return ids
            assert time.monotonic() < end, f"the fleet's /metrics shows replicas {ids}, not {n} after {timeout} s"
            time.sleep(0.25)


@pytest.fixture(scope="module")
def fleet(one_thread):
    from twotower_ext.serve.ray.local import local_cluster

    before = descendants(os.getpid())
    with local_cluster(num_cpus=4) as port:   # sets Ray's single-machine mode before importing it
        from ray import serve

        from twotower_ext.serve.ray import build_app

        deploying = threading.Thread(target=serve.run, args=(build_app(OPTS),), kwargs={"name": APP, "route_prefix": "/"},
                                     daemon=True)
        deploying.start()
        deploying.join(240)
        assert not deploying.is_alive(), "the application did not come up in 240 s"
        started = descendants(os.getpid()) - before
        f = Fleet(port)
        f.ids = f.wait_for_replicas(2)
        yield f
        f.http.close()
    end = time.monotonic() + 60
    while running(started) and time.monotonic() < end:
        time.sleep(0.2)
    assert not running(started), f"processes Ray started are still running: {sorted(running(started))}"


@pytest.fixture(scope="module")
def lm(one_thread):
    return tt.load(tt.default_model_path(), dtype=torch.float32)


def prompts_for(replicas, n: int, make) -> dict[str, list]:
    """n prompts make(i) whose affinity names each replica (the policy is deterministic given their ids)."""
    out = {r: [] for r in replicas}
    for i in range(10_000):
        p = make(i)
        r = rendezvous_order(affinity_key({"prompt": p}), replicas)[0]
        if len(out[r]) < n:
            out[r].append(p)
        if all(len(v) == n for v in out.values()):
            return out
    raise AssertionError("no prompts found for every replica")


def greedy(lm, prompt, mode: str, n: int) -> list[int]:
    ids = lm.encode(prompt) if isinstance(prompt, str) else prompt
    return lm.generate([ids], mode=mode, max_new_tokens=n, eos_token_id=None, temperature=0.0).new_tokens[0]


def test_greedy_outputs_equal_generate_on_every_replica(fleet, lm):
    by_replica = prompts_for(sorted(fleet.ids), 2, lambda i: f"def f{i}(x):\n    return x")
    for replica, prompts in by_replica.items():
        for prompt, mode in zip(prompts, ("diffusion", "ar")):
            body = {"prompt": prompt, "max_tokens": 24, "mode": mode, "eos_token_id": None}
            status, served_by, out = fleet.complete(body)
            assert (status, served_by) == (200, replica), out
            assert out["choices"][0]["token_ids"] == greedy(lm, prompt, mode, 24)
            status, served_by, events, done = fleet.stream(body)
            assert (status, served_by, done) == (200, replica, True)
            assert [t for e in events for t in e["choices"][0]["token_ids"]] == greedy(lm, prompt, mode, 24)
    ids = lm.encode("import numpy as np\n")           # a token-id prompt
    status, _, out = fleet.complete({"prompt": ids, "max_tokens": 16, "eos_token_id": None})
    assert status == 200 and out["choices"][0]["token_ids"] == greedy(lm, ids, "diffusion", 16)


def test_the_same_errors_as_twotower_serve(fleet):
    status, replica, out = fleet.complete({"prompt": "x", "max_tokens": 0})
    assert status == 400 and replica in fleet.ids
    assert out["error"]["param"] == "max_tokens" and out["error"]["type"] == "invalid_request_error"
    status, _, out = fleet.complete({"prompt": "x", "model": "nope"})
    assert status == 404 and out["error"]["param"] == "model"
    r = fleet.http.post("/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert fleet.http.get("/health").json()["status"] == "ok"
    assert fleet.http.get("/v1/models").json()["data"][0]["id"] == "default_model"


def test_requests_sharing_a_prefix_land_on_its_replica(fleet):
    # one shared system-prompt-like head per replica, each followed by distinct questions, 3 at a time
    heads = prompts_for(sorted(fleet.ids), 1, lambda i: f"# You are a careful assistant, rule {i}.\n" * 8)
    for replica, (head,) in heads.items():
        results = []

        def ask(k):
            results.append(fleet.complete({"prompt": head + f"def question_{k}():\n", "max_tokens": 8}))

        for wave in range(2):
            threads = [threading.Thread(target=ask, args=(wave * 3 + k,)) for k in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
        assert len(results) == 6 and {(s, r) for s, r, _ in results} == {(200, replica)}, results


def test_fleet_metrics_carry_every_replicas_series(fleet):
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client (installed with ray) is missing")

    def finished(replica):
        fams = {f.name: f for f in parser.text_string_to_metric_families(fleet.http.get("/metrics").text)}
        return sum(s.value for s in fams["twotower:request_success"].samples
                   if s.name == "twotower:request_success_total" and s.labels["replica"] == replica)

    heads = prompts_for(sorted(fleet.ids), 1, lambda i: f"x = {i}\n")
    for replica, (prompt,) in heads.items():
        n0 = finished(replica)
        for _ in range(3):
            assert fleet.complete({"prompt": prompt, "max_tokens": 4})[:2] == (200, replica)
        end = time.monotonic() + 10
        while finished(replica) < n0 + 3:   # each replica publishes every 0.5 s
            assert time.monotonic() < end, "a replica's finished requests did not reach the fleet's /metrics"
            time.sleep(0.1)


def test_a_client_that_goes_away_frees_its_row(fleet):
    import httpx

    prompt = prompts_for(sorted(fleet.ids), 1, lambda i: f"for i in range({i}):\n")
    replica, (p,) = sorted(prompt.items())[0]
    cancelled = lambda: fleet.gauge("twotower:request_success_total", replica, 'finished_reason="abort"')  # noqa: E731
    before = cancelled()
    with httpx.stream("POST", fleet.url + "/v1/completions", timeout=TIMEOUT,
                      json={"prompt": p, "max_tokens": 1000, "mode": "ar", "eos_token_id": None, "stream": True}) as r:
        assert r.headers["x-twotower-replica"] == replica
        next(line for line in r.iter_lines() if line.startswith("data: {"))   # decoding, then the client leaves
    end = time.monotonic() + 30
    while cancelled() < before + 1 or fleet.gauge("twotower:num_requests_running", replica) > 0:
        assert time.monotonic() < end, "a stream whose client went away kept its row"
        time.sleep(0.1)


def test_a_replica_killed_during_a_burst(fleet, lm):
    import ray
    from ray import serve

    ids = sorted(fleet.ids)
    target, other = ids
    long_prompts = prompts_for(ids, 2, lambda i: f"while True:  # {i}\n")[target]
    short_prompts = prompts_for(ids, 4, lambda i: f"class C{i}:\n    def __init__(self):\n")
    results, errors = [], []

    def run(kind, fn, body):
        try:
            results.append((kind, body, *fn(body)))
        except Exception as e:  # noqa: BLE001  (a request that got no answer at all fails the test below)
            errors.append(repr(e))

    def start(kind, body):
        t = threading.Thread(target=run, args=(kind, fleet.stream if kind.endswith("stream") else fleet.complete, body))
        t.start()
        return t

    # on the replica to be killed: a long stream and two long plain requests, all decoding when it dies; then
    # a burst of short requests to both replicas, streamed and not, in flight as it dies
    ar = {"mode": "ar", "eos_token_id": None}
    threads = [start("victim_stream", {"prompt": long_prompts[0], "max_tokens": 1000, **ar}),
               *(start("victim_plain", {"prompt": long_prompts[1], "max_tokens": 600, **ar}) for _ in range(2))]
    end = time.monotonic() + TIMEOUT
    while fleet.gauge("twotower:num_requests_running", target) < 3:   # published every 0.5 s
        assert time.monotonic() < end, "the long requests did not reach their replica"
        time.sleep(0.05)
    threads += [start("stream" if j % 2 else "plain", {"prompt": p, "max_tokens": 32, "eos_token_id": None})
                for prompts in short_prompts.values() for j, p in enumerate(prompts)]
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].endswith(f"#{target}") and "TwoTowerReplica" in a["name"])
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    # new requests flow to the live replica at once (those keyed to the dead one included)
    for p in short_prompts[target][:2]:
        status, replica, out = fleet.complete({"prompt": p, "max_tokens": 8})
        assert (status, replica) == (200, other), out
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and not any(t.is_alive() for t in threads), f"requests without an answer: {errors}"
    kinds = [r[0] for r in results]
    assert sorted(kinds) == sorted(["victim_stream"] + ["victim_plain"] * 2 + ["stream", "plain"] * 4)
    for kind, body, status, replica, *rest in results:
        if kind == "victim_stream":   # it had streamed: an OpenAI error event ends it, then [DONE]
            events, done = rest
            assert (status, replica, done) == (200, target, True)
            assert events[-1]["error"]["type"] == "server_error" and all("choices" in e for e in events[:-1])
        elif kind == "victim_plain":  # nothing of it was sent: re-sent to the live replica, a full answer
            assert (status, replica) == (200, other), rest
            assert rest[0]["choices"][0]["token_ids"] == greedy(lm, body["prompt"], "ar", 600)
        elif kind == "plain":
            assert status == 200 and rest[0]["choices"][0]["token_ids"] == greedy(lm, body["prompt"], "diffusion", 32)
        else:                         # the whole answer, or (started on the killed replica) an error event
            events, done = rest
            assert status == 200 and done
            if "error" in events[-1]:
                assert replica == target
            else:
                tokens = [t for e in events for t in e["choices"][0]["token_ids"]]
                assert tokens == greedy(lm, body["prompt"], "diffusion", 32)

    # Ray restarts the dead replica; the fleet is whole again
    end = time.monotonic() + 120
    while True:
        app = serve.status().applications[APP]
        if app.status == "RUNNING" and app.deployments["TwoTowerReplica"].replica_states == {"RUNNING": 2}:
            break
        assert time.monotonic() < end, f"the fleet did not recover in 120 s: {app}"
        time.sleep(0.5)
    fresh = fleet.wait_for_replicas(2, exclude={target})
    fleet.ids = fresh
    # every request is answered in full at once; affinity to the new replica follows once the router's view of
    # the replicas includes it (Ray pushes it to the router asynchronously: seconds, bounded here)
    for replica, (p,) in prompts_for(sorted(fresh), 1, lambda i: f"print({i})\n").items():
        end = time.monotonic() + 60
        while True:
            status, served_by, out = fleet.complete({"prompt": p, "max_tokens": 8, "eos_token_id": None})
            assert status == 200 and out["choices"][0]["token_ids"] == greedy(lm, p, "diffusion", 8), out
            if served_by == replica:
                break
            assert time.monotonic() < end, f"requests keyed to replica {replica} still go to {served_by} after 60 s"
            time.sleep(0.5)
