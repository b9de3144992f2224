"""The Ray Serve fleet's parts that need no Ray (twotower_ext.serve.ray): the prefix-affinity routing policy,
the fleet's /metrics (labels and merge), the fleet options, and the ASGI bridge a replica serves
`create_app` through. The fleet itself on a local Ray cluster: tests/test_ray.py."""
import asyncio
import json
import random

import pytest
import torch

import twotower_ext as tt

pytest.importorskip("prometheus_client", reason="the serve extra (prometheus_client) is not installed")
from twotower_ext.serve.metrics import Metrics  # noqa: E402
from twotower_ext.serve.ray.exposition import label_samples, merge_expositions
from twotower_ext.serve.ray.options import FleetOptions
from twotower_ext.serve.ray.policy import affinity_key, prompt_head, rank_replicas, rendezvous_order


def rng_of(gen) -> random.Random:
    return random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))


def random_text(rng, n):
    return "".join(rng.choice("abcdefgh ijk\n(){}:=_ é€") for _ in range(n))


# ----------------------------------------------------------------------------------------------------
# affinity keys


def test_requests_sharing_a_head_share_a_key_and_others_do_not(gen):
    rng = rng_of(gen)
    head = random_text(rng, 300)
    keys = {affinity_key({"prompt": head + random_text(rng, rng.randint(0, 50))}, chars=256) for _ in range(8)}
    assert len(keys) == 1
    # a difference inside the head changes the key; one past it does not
    i = rng.randrange(256)
    other = head[:i] + ("x" if head[i] != "x" else "y") + head[i + 1:]
    assert affinity_key({"prompt": other}, chars=256) != keys.pop()
    assert affinity_key({"prompt": head[:256] + "zzz"}, chars=256) == affinity_key({"prompt": head}, chars=256)
    # token-id prompts: the first `tokens` ids
    ids = [rng.randrange(50000) for _ in range(100)]
    assert affinity_key({"prompt": ids}, tokens=64) == affinity_key({"prompt": ids[:64] + [7]}, tokens=64)
    assert affinity_key({"prompt": ids}, tokens=64) != affinity_key({"prompt": [ids[0] + 1] + ids[1:]}, tokens=64)
    assert affinity_key({"prompt": ids[:3]}) != affinity_key({"prompt": ",".join(map(str, ids[:3]))})


def test_affinity_key_of_bodies_as_the_server_reads_them():
    body = {"prompt": "def f(x):\n", "max_tokens": 8}
    assert affinity_key(json.dumps(body).encode()) == affinity_key(body) is not None
    assert affinity_key({"prompt": ["def f(x):\n"]}) == affinity_key(body)           # a batch of one prompt
    assert affinity_key({"prompt": [[1, 2, 3]]}) == affinity_key({"prompt": [1, 2, 3]})
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    assert prompt_head(chat) == "system: be brief\nuser: hi\n"
    grown = {"messages": chat["messages"] + [{"role": "assistant", "content": "ok"}]}
    assert affinity_key(grown, chars=len("system: be brief\n")) == affinity_key(chat, chars=len("system: be brief\n"))
    # nothing the server would take as a prompt: no key (the replica answers the error)
    for bad in (b"", b"not json", b"[1, 2]", {"prompt": None}, {"prompt": [1, "a"]}, {"prompt": [True]}, {},
                {"messages": "hi"}, {"prompt": []}):
        assert affinity_key(bad) is None, bad


# ----------------------------------------------------------------------------------------------------
# replica ranking


def oracle_rank(key, loads, max_imbalance):
    """The policy written out: the key's replica is the one whose hash(key, id) is largest."""
    if key is None:
        return sorted(loads, key=lambda r: (loads[r], rendezvous_order(0, loads).index(r)))
    mine = rendezvous_order(key, loads)[0]
    by_load = sorted(loads, key=lambda r: (loads[r], rendezvous_order(key, loads).index(r)))
    if loads[mine] - loads[by_load[0]] <= max_imbalance:
        return [mine] + [r for r in by_load if r != mine]
    return by_load


def test_rank_replicas_takes_the_keys_replica_within_the_imbalance_else_the_least_loaded(gen):
    rng = rng_of(gen)
    for _ in range(300):
        ids = [f"r{rng.randrange(10**6)}" for _ in range(rng.randint(1, 7))]
        loads = {r: rng.randint(0, 12) for r in ids}
        key = rng.choice([None, rng.getrandbits(64)])
        imb = rng.randint(0, 6)
        got = rank_replicas(key, loads, imb)
        assert sorted(got) == sorted(loads)                      # every replica once
        assert got == oracle_rank(key, loads, imb)
        least = min(loads.values())
        if key is not None:
            mine = rendezvous_order(key, loads)[0]
            if loads[mine] <= least + imb:
                assert got[0] == mine
            else:                                                 # never past the bound
                assert loads[got[0]] == least
        else:
            assert loads[got[0]] == least
    assert rank_replicas(5, {}) == []


def test_the_imbalance_bound_is_inclusive():
    key = 12345
    a, b = rendezvous_order(key, ["a", "b"])
    assert rank_replicas(key, {a: 3, b: 0}, max_imbalance=3) == [a, b]
    assert rank_replicas(key, {a: 4, b: 0}, max_imbalance=3) == [b, a]
    assert rank_replicas(key, {a: 0, b: 0}, max_imbalance=0) == [a, b]
    with pytest.raises(ValueError, match="max_imbalance must be an int >= 0"):
        rank_replicas(key, {a: 0}, max_imbalance=-1)


def test_keys_spread_evenly_and_move_only_with_their_replica(gen):
    rng = rng_of(gen)
    ids = [f"replica-{rng.randrange(10**9)}" for _ in range(4)]
    keys = [rng.getrandbits(64) for _ in range(4000)]
    owner = {k: rendezvous_order(k, ids)[0] for k in keys}
    counts = {r: sum(o == r for o in owner.values()) for r in ids}
    assert all(700 < c < 1300 for c in counts.values()), counts    # binomial(4000, 1/4): sd 27
    gone, new = ids[0], f"replica-{rng.randrange(10**9)}"
    for k in keys:   # a replica leaving moves only its keys; one joining takes keys only for itself
        assert owner[k] == gone or rendezvous_order(k, ids[1:])[0] == owner[k]
        assert rendezvous_order(k, ids + [new])[0] in (owner[k], new)


# ----------------------------------------------------------------------------------------------------
# the fleet's /metrics


def test_label_samples_adds_the_label_to_every_sample_line():
    text = ('# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\ny{a="1",b="q\\"}"} 2.5\n'
            'z{} 1\nh_bucket{le="+Inf"} 4 1700000000\n')
    got = label_samples(text, {"replica": 'r"1\\'})
    lab = 'replica="r\\"1\\\\"'
    assert got.splitlines() == ["# HELP x_total Things.", "# TYPE x_total counter", f"x_total{{{lab}}} 3",
                                f'y{{{lab},a="1",b="q\\"}}"}} 2.5', f"z{{{lab}}} 1",
                                f'h_bucket{{{lab},le="+Inf"}} 4 1700000000']
    assert label_samples(text, {}) == text


def scheduler_metrics(rng) -> str:
    """The exposition of the server's own Metrics after some random requests."""
    class H:   # what Metrics.request_done reads of a finished handle
        def __init__(self):
            self.finish_reason = rng.choice(["stop", "length", "cancelled"])
            self.prompt, self.tokens, self.nfe = [1] * rng.randint(1, 9), [2] * rng.randint(0, 9), rng.randint(1, 9)
            self.t_submit, self.t_first, self.t_done = 0.0, rng.random(), 1 + rng.random()

    m = Metrics()
    for _ in range(rng.randint(1, 6)):
        m.request_done(H())
        m.pass_done(rng.randint(1, 16))
    m.set_load(rng.randint(0, 5), rng.randint(0, 5))
    return m.text()


def test_merged_fleet_metrics_parse_with_every_replicas_series(gen):
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client (the oracle parser) is not installed")
    rng = rng_of(gen)
    texts = {f"rep{i}": scheduler_metrics(rng) for i in range(3)}
    merged = merge_expositions([label_samples(t, {"replica": r}) for r, t in texts.items()])
    fams = {f.name: f for f in parser.text_string_to_metric_families(merged)}
    for r, t in texts.items():
        alone = {f.name: f for f in parser.text_string_to_metric_families(t)}
        assert set(alone) <= set(fams)
        for name, f in alone.items():
            mine = [(s.name, {k: v for k, v in s.labels.items() if k != "replica"}, s.value)
                    for s in fams[name].samples if s.labels.get("replica") == r]
            assert mine == [(s.name, s.labels, s.value) for s in f.samples], name
            assert fams[name].type == f.type
    # the format wants a family's lines together, with HELP / TYPE once
    lines = merged.splitlines()
    assert sum(line.startswith("# TYPE ") for line in lines) == len(fams)
    assert merge_expositions([]) == ""


def test_merge_keeps_a_family_together_when_replicas_list_it_in_another_order():
    a = "# TYPE m gauge\nm 1\n# TYPE n counter\nn 2\n"
    b = "# TYPE n counter\nn 5\n# TYPE m gauge\nm 7\n# TYPE o gauge\no 1\n"
    assert merge_expositions([a, b]).splitlines() == ["# TYPE m gauge", "m 1", "m 7", "# TYPE n counter", "n 2",
                                                      "n 5", "# TYPE o gauge", "o 1"]


# ----------------------------------------------------------------------------------------------------
# options


def test_fleet_options_name_a_bad_argument():
    assert FleetOptions.from_dict(None) == FleetOptions()
    for args, msg in (({"replica": 2}, "unknown argument 'replica'"), ({"replicas": 0}, "replicas must be an int >= 1"),
                      ({"gpus_per_replica": 3}, "gpus_per_replica must be 0, 1 or 2"),
                      ({"max_imbalance": -1}, "max_imbalance must be None or an int >= 0"), ({"threads": True}, "threads must be"),
                      ({"dtype": "fp16"}, "dtype must be fp32 or bf16"),
                      ({"min_replicas": 3, "max_replicas": 2}, "max_replicas must be"),
                      ({"max_replicas": 2, "replicas": 3}, "replicas must be within"),
                      ({"metrics_period_s": 0}, "metrics_period_s must be a number > 0")):
        with pytest.raises(ValueError, match=msg):
            FleetOptions.from_dict(args)


def test_fleet_options_autoscaling_and_devices():
    assert FleetOptions(replicas=3).autoscaling_config() is None
    assert FleetOptions.from_dict({"max_replicas": 4, "replicas": 2}).autoscaling_config() == {
        "min_replicas": 0, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 16}
    assert FleetOptions.from_dict({"min_replicas": 2, "target_ongoing_requests": 5, "replicas": 2}).autoscaling_config() \
        == {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2, "target_ongoing_requests": 5}
    assert [FleetOptions(gpus_per_replica=g).devices() for g in (0, 1, 2)] == [
        ("cpu", None), ("cuda:0", None), ("cuda:0", "cuda:1")]


def test_twotower_serve_ray_arguments_become_fleet_options(monkeypatch):
    from twotower_ext.cli import build_parser
    from twotower_ext.serve.ray import cli

    a = build_parser().parse_args(["serve", "--ray", "--replicas", "3", "--max-replicas", "6", "--device", "cuda",
                                   "--max-batch", "32", "--max-imbalance", "2", "--threads", "2"])
    opts = FleetOptions.from_dict(cli.fleet_options(a))
    assert (opts.replicas, opts.max_replicas, opts.gpus_per_replica, opts.max_batch, opts.max_imbalance, opts.threads) \
        == (3, 6, 1, 32, 2, 2)
    assert opts.autoscaling_config()["target_ongoing_requests"] == 32
    assert FleetOptions.from_dict(cli.fleet_options(build_parser().parse_args(["serve", "--ray"]))) == FleetOptions()
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"serve --ray needs the ray extra: pip install 'twotower_ext\[ray\]'"):
        cli.run_ray(a)


# ----------------------------------------------------------------------------------------------------
# the ASGI bridge: create_app's app run on (scope, body), as a replica runs it


@pytest.fixture(scope="module")
def app_and_lm(one_thread):
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    from twotower_ext.serve import Scheduler
    from twotower_ext.serve.http import create_app

    lm = tt.load(tt.default_model_path(), dtype=torch.float32)
    sched = Scheduler(lm, max_batch=4, max_queue=4, max_len=256)
    yield create_app(sched, "m"), lm, sched
    sched.shutdown(0)


def post_scope(path):
    from twotower_ext.serve.ray.asgi import portable_scope

    return portable_scope({"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                           "raw_path": path.encode(), "root_path": "/ignored", "query_string": b"",
                           "headers": [(b"content-type", b"application/json")], "state": object()})


async def messages(app, path, body, take=None):
    from twotower_ext.serve.ray.asgi import run_asgi

    out = []
    agen = run_asgi(app, post_scope(path), json.dumps(body).encode())
    async for m in agen:
        out.append(m)
        if take is not None and len(out) == take:
            await agen.aclose()      # the client went away
            break
    return out


def run_messages(app, path, body):
    return asyncio.run(asyncio.wait_for(messages(app, path, body), 120))


def test_asgi_bridge_answers_as_the_server(app_and_lm):
    app, lm, _ = app_and_lm
    ids = lm.encode("def add(a, b):\n")
    want = lm.generate([ids], max_new_tokens=12, temperature=0.0).new_tokens[0]
    msgs = run_messages(app, "/v1/completions", {"prompt": ids, "max_tokens": 12})
    assert [m["type"] for m in msgs] == ["http.response.start", "http.response.body"]
    assert msgs[0]["status"] == 200
    assert json.loads(msgs[1]["body"])["choices"][0]["token_ids"] == want
    stream = run_messages(app, "/v1/completions", {"prompt": ids, "max_tokens": 12, "stream": True})
    text = b"".join(m.get("body", b"") for m in stream[1:]).decode()
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == want and text.endswith("data: [DONE]\n\n")
    bad = run_messages(app, "/v1/completions", {"prompt": ids, "max_tokens": 0})
    assert bad[0]["status"] == 400 and json.loads(bad[1]["body"])["error"]["param"] == "max_tokens"


def test_asgi_bridge_closed_early_cancels_the_request(app_and_lm):
    app, lm, sched = app_and_lm
    before = sched.metrics.requests.get("cancelled", 0)

    async def go():   # one event loop throughout: the app's sink posts to it until the request is dropped
        msgs = await messages(app, "/v1/completions", {"prompt": lm.encode("import os\n"), "max_tokens": 200,
                                                       "stream": True, "mode": "ar"}, take=2)
        while sched.metrics.requests.get("cancelled", 0) == before or sched.load()["live_rows"]:
            await asyncio.sleep(0.02)
        return msgs

    msgs = asyncio.run(asyncio.wait_for(go(), 60))
    assert msgs[0]["status"] == 200 and msgs[1]["body"].startswith(b"data: {")
    assert sched.metrics.requests.get("cancelled", 0) == before + 1     # freed (the loop above waited for it)
