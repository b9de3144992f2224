"""Scaling out with Ray Serve (twotower_ext.serve.ray): throughput of 1 vs 2 replicas, and how well the
prefix-affinity routing keeps a prompt prefix on one replica (what a prefix cache needs) against round robin.

Throughput (the median of 3 runs): 16 closed-loop HTTP clients (each sends a request, waits for the answer,
sends the next) of distinct prompts to the fleet's OpenAI route, on the shipped model: 1 replica with 1
thread, 1 replica with 2 threads, 2 replicas with 1 thread each, each against its limit measured in the same
run, linear scaling of the first (%linear); side by side, the same requests to one in-process Scheduler with
1 thread (no HTTP, no Ray). Each row also says where the CPU went: the replicas' processes against Ray's
(proxy, ingress and its router, controller), from /proc, and the harness records what other processes used.

Routing: 8 prompt prefixes (a shared ~600-character head each) x 8 requests with distinct endings, shuffled,
at concurrency 16 over 2 replicas, with the prefix-affinity router (its default imbalance bound, max_batch =
16 ongoing requests, and a tight one of 4) and with Ray's round robin; per request, whether it landed on the
replica that served its prefix's previous request (what an LRU prefix cache of one entry per prefix would
hit) and on a replica that had served its prefix at all, and the replicas each prefix touched (its prefills:
1 is ideal).
"""
from __future__ import annotations

import importlib.util
import os
import random
import statistics
import threading
import time

from . import harness

COLUMNS = ["run", "router", "max_imbalance", "replicas", "threads", "concurrency", "requests", "tokens/s", "vs_1x1",
           "%linear", "p50_s", "p99_s", "replica_cores", "ray_cores", "hit_prev", "hit_any", "replicas/prefix"]
CONCURRENCY = 16
ROUND_ROBIN = "ray.serve.experimental.round_robin_router.RoundRobinRouter"
NEW_TOKENS = 32
REPS = 3             # throughput: the median of 3 runs of each configuration (the machine is shared)


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _ray_processes() -> dict[int, bool]:
    """Every process below this one: pid -> whether it is a replica (its title names TwoTowerReplica)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = {}, [os.getpid()]
    while todo:
        for c in kids.get(todo.pop(), []):
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    out[c] = b"TwoTowerReplica" in f.read()
            except OSError:
                continue
            todo.append(c)
    return out


class FleetMonitor(harness.LoadMonitor):
    """The harness' load monitor, with the fleet's own processes counted as this benchmark's (not as other
    load), and split into replica and Ray CPU."""

    def __enter__(self):
        self.procs = _ray_processes()
        self.cpu0 = {p: _cpu_s(p) for p in self.procs}
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        used = {p: _cpu_s(p) - c0 for p, c0 in self.cpu0.items()}
        wall = time.perf_counter() - self.t0
        self.replica_cores = sum(u for p, u in used.items() if self.procs[p]) / wall
        self.ray_cores = sum(u for p, u in used.items() if not self.procs[p]) / wall
        if self.other_cores is not None:
            self.other_cores = max(0.0, self.other_cores - self.replica_cores - self.ray_cores)
        return False


def _pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _closed_loop(send, bodies: list[dict], concurrency: int):
    """`concurrency` clients working through `bodies` in order; returns (answers in send order, latencies, wall
    time, monitor)."""
    answers: list = [None] * len(bodies)
    lat: list[float] = []
    next_i = iter(range(len(bodies)))
    lock = threading.Lock()
    failed: list[BaseException] = []

    def client():
        while not failed:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                answers[i] = send(bodies[i])
            except Exception as e:  # noqa: BLE001  (raised in the caller's thread below)
                failed.append(e)
                return
            with lock:
                lat.append(time.perf_counter() - t0)

    with FleetMonitor() as mon:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    if failed:
        raise failed[0]
    t = harness.Timing(wall, wall, wall, 1, mon.load1, mon.other_cores)
    harness.TIMINGS.append(t)
    if t.busy:
        print(f"bench: warning: other processes used {t.other_cores:.2f} cores during a timing", flush=True)
    return answers, lat, wall, mon


def _median_run(send, bodies: list[dict], reps: int, tokens):
    """The closed loop `reps` times; the run of median tokens/s (`tokens(answers)` counts a run's tokens)."""
    runs = sorted((_closed_loop(send, bodies, CONCURRENCY) for _ in range(reps)), key=lambda r: tokens(r[0]) / r[2])
    return runs[len(runs) // 2]


def _distinct_bodies(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"def task_{rng.randrange(10**6)}(x, y):\n    # {rng.random():.6f}\n", "max_tokens": NEW_TOKENS,
             "eos_token_id": None} for _ in range(n)]


def _prefix_bodies(prefixes: int, per: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    heads = [f"# project {p}: " + " ".join(f"rule_{p}_{k} = {rng.randrange(1000)}" for k in range(40)) + "\n"
             for p in range(prefixes)]
    bodies = [{"prompt": heads[p] + f"def q{j}_{rng.randrange(10**6)}():\n", "max_tokens": 8, "eos_token_id": None,
               "prefix": p} for p in range(prefixes) for j in range(per)]
    rng.shuffle(bodies)
    return bodies


def _in_process(bodies: list[dict], reps: int) -> tuple[float, list[float]]:
    """tokens/s and latencies of the same requests on one in-process Scheduler with 1 thread."""
    import torch

    import twotower_ext as tt
    from twotower_ext.serve import Scheduler

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    lm = tt.load(tt.default_model_path(), dtype=torch.float32)
    sched = Scheduler(lm, max_batch=CONCURRENCY, max_queue=CONCURRENCY, max_len=256)
    try:
        params = lambda b: {"max_tokens": b["max_tokens"], "eos_token_id": None}   # noqa: E731
        sched.submit(bodies[0]["prompt"], **params(bodies[0])).result()          # warm
        count = lambda answers: sum(len(h.tokens) for h in answers)   # noqa: E731
        answers, lat, wall, _ = _median_run(lambda b: sched.submit(b["prompt"], **params(b)).result(timeout=600),
                                            bodies, reps, count)
        return count(answers) / wall, lat
    finally:
        sched.shutdown()
        torch.set_num_threads(old)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if importlib.util.find_spec("ray") is None:
        print("bench scale: ray is not installed (pip install 'twotower_ext[ray]'): nothing measured")
        return []
    import httpx

    from twotower_ext.serve.ray.local import local_cluster

    gpus = 1 if device == "cuda" else 0
    n_req = 16 if quick else 64
    bodies = _distinct_bodies(n_req, seed=1)
    rows: list[dict] = []
    if not quick:
        tps, lat = _in_process(bodies, REPS)
        rows.append({"run": "throughput", "router": "in-process Scheduler (no HTTP, no Ray)", "replicas": 1,
                     "threads": 1, "concurrency": CONCURRENCY, "requests": n_req, "tokens/s": tps,
                     "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99)})
        print(f"  in-process scheduler: {tps:.1f} tokens/s", flush=True)
    configs = [(2, 1)] if quick else [(1, 1), (1, 2), (2, 1)]
    with local_cluster(num_cpus=max(4, os.cpu_count() or 1), num_gpus=gpus or None) as port:
        from ray import serve

        from twotower_ext.serve.ray import build_app

        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)

        def send(body):
            r = client.post("/v1/completions", json={k: v for k, v in body.items() if k != "prefix"})
            r.raise_for_status()
            return r.headers["x-twotower-replica"], r.json()["usage"]["completion_tokens"]

        def deploy(replicas, threads, router=None, imbalance=None):
            serve.run(build_app({"replicas": replicas, "threads": threads, "max_batch": CONCURRENCY,
                                 "max_queue": 2 * CONCURRENCY, "max_len": 512, "gpus_per_replica": gpus,
                                 "request_router": router, "max_imbalance": imbalance}), name="bench", route_prefix="/")
            for b in bodies[:8]:
                send(b)                          # warm the replicas' first passes

        base, deployed = None, None
        try:
            for replicas, threads in configs:
                deploy(replicas, threads)
                deployed = (replicas, threads, None, None)
                answers, lat, wall, mon = _median_run(send, bodies, 1 if quick else REPS,
                                                      lambda answers: sum(n for _, n in answers))
                tps = sum(n for _, n in answers) / wall
                if (replicas, threads) == (1, 1):
                    base = tps
                rows.append({"run": "throughput", "router": "prefix affinity", "max_imbalance": CONCURRENCY,
                             "replicas": replicas, "threads": threads, "concurrency": CONCURRENCY, "requests": n_req,
                             "tokens/s": tps, "vs_1x1": tps / base if base else "",
                             "%linear": 100 * tps / (base * replicas * threads) if base else "",
                             "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99),
                             "replica_cores": mon.replica_cores, "ray_cores": mon.ray_cores})
                print(f"  {replicas} replica(s) x {threads} thread(s): {tps:.1f} tokens/s (replicas "
                      f"{mon.replica_cores:.2f} cores, Ray {mon.ray_cores:.2f})", flush=True)
            prefix_bodies = _prefix_bodies(4 if quick else 8, 4 if quick else 8, seed=2)
            routers = [("prefix affinity", None, None)]
            if not quick:   # a tight bound (balance first), and Ray's round robin
                routers += [("prefix affinity", None, 4), ("round robin", ROUND_ROBIN, None)]
            for name, router, imbalance in routers:
                setting = (2, 1, router, imbalance)
                if deployed != setting:
                    deploy(*setting)
                    deployed = setting
                answers, lat, wall, mon = _closed_loop(send, prefix_bodies, CONCURRENCY)
                rows.append({"run": "shared prefixes", "router": name,
                             "max_imbalance": "" if router else imbalance or CONCURRENCY,
                             "replicas": 2, "threads": 1, "concurrency": CONCURRENCY, "requests": len(prefix_bodies),
                             "tokens/s": sum(n for _, n in answers) / wall, "p50_s": _pct(lat, 0.5),
                             "p99_s": _pct(lat, 0.99), "replica_cores": mon.replica_cores, "ray_cores": mon.ray_cores,
                             **prefix_hits(prefix_bodies, [r for r, _ in answers])})
                print(f"  shared prefixes, {name} ({imbalance}): {rows[-1]['hit_prev']:.0%} on the previous replica, "
                      f"{rows[-1]['replicas/prefix']:.2f} replicas per prefix", flush=True)
        finally:
            client.close()
    harness.print_table(f"Ray Serve fleet on {device}: throughput at concurrency {CONCURRENCY} and prefix routing",
                        rows, COLUMNS)
    return rows


def prefix_hits(bodies: list[dict], replicas: list[str]) -> dict:
    """Per request in send order after its prefix's first: on the replica of the prefix's previous request
    (hit_prev) / on any replica that served the prefix before (hit_any); and distinct replicas per prefix."""
    prev: dict[int, str] = {}
    seen: dict[int, set[str]] = {}
    same = anyh = n = 0
    for b, r in zip(bodies, replicas):
        p = b["prefix"]
        if p in prev:
            n += 1
            same += prev[p] == r
            anyh += r in seen[p]
        prev[p] = r
        seen.setdefault(p, set()).add(r)
    return {"hit_prev": same / n, "hit_any": anyh / n, "replicas/prefix": statistics.mean(len(s) for s in seen.values())}
