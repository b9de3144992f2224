"""Soak: a real `twotower serve` subprocess on 127.0.0.1 (the shipped model) under N requests at concurrency
64, some of them hostile, and whether it stays whole.

Mix: 10 % of the requests disconnect mid-stream (they read the first event, then hang up), 5 % are
malformed (bad JSON, unknown or refused fields, bad values, text that is not UTF-8, a wrong model, a body
over --max-body-bytes), the rest are completions (half streamed) of 8-64 tokens in diffusion (80 %) or AR
mode. Every request must be accounted for: finished (200, whole), cancelled (the client hung up) or
refused (4xx, for the malformed ones); and the server must agree: its `request_success_total` by
finished_reason equals the clients' finished / cancelled counts, its /health live_rows and queue_depth
are back to 0, nothing was rejected (429). Anything else fails the run (SoakFailed). Also: the server's
RSS before and after warm-up (the first 10 % of the requests) and at the end, client-side p50 / p99
latency of finished requests and of the first event of streams, generated tokens per second.

python -m bench soak [--quick]   (--quick: 100 requests at concurrency 16, for CI's bench smoke)
python -m bench.bench_soak [--requests N] [--concurrency C] [--quick] [--no-save] [--allow-busy]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time

from . import harness

COLUMNS = ["kind", "requests", "finished", "cancelled", "4xx", "unexpected", "p50_s", "p99_s", "first_event_p50_s",
           "tokens/s", "duration_s", "rss_start_MB", "rss_warm_MB", "rss_end_MB", "live_rows_after", "other_cores"]
MAX_BODY = 65536
PROMPTS = ["def ", "import os\n", "class Node:\n    def __init__(self", "for i in range(", "# Return the sum\ndef add(a, b):",
           "with open(path) as f:\n", "if __name__ == '__main__':\n", "try:\n    x = int(s)\nexcept ValueError:"]
MALFORMED = [  # (raw body or a JSON object, the status it must get)
    (b"{not json", 400), ({"prompt": "x", "max_tokens": 0}, 400), ({"prompt": "x", "foo": 1}, 400),
    (b'{"prompt": "a\\ud800"}', 400), ({"model": "nope", "prompt": "x"}, 404), ({"prompt": "x", "stop": "\n"}, 400),
    ({"prompt": [1, 999999]}, 400), ({"prompt": "x", "temperature": -1}, 400), ({"prompt": "x" * (MAX_BODY + 1)}, 413),
    ({"prompt": "x", "max_tokens": 1000}, 400)]


class SoakFailed(RuntimeError):
    """A request or a row not accounted for."""


def _pct(v: list[float], q: float):
    if not v:
        return ""
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def _plan(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        u = rng.random()
        if u < 0.05:
            raw, status = MALFORMED[i % len(MALFORMED)]
            plan.append({"kind": "malformed", "body": raw, "status": status})
        elif u < 0.15:
            plan.append({"kind": "disconnect", "body": {"prompt": rng.choice(PROMPTS), "max_tokens": 200,
                                                          "eos_token_id": None, "stream": True}})
        else:
            stream = rng.random() < 0.5
            body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 64), "stream": stream,
                    "mode": "diffusion" if rng.random() < 0.8 else "ar"}
            if rng.random() < 0.3:
                body.update(temperature=0.8, seed=rng.randrange(2**31))
            plan.append({"kind": "stream" if stream else "completion", "body": body})
    return plan


async def _one(client, url: str, req: dict) -> dict:
    """Send one request; its outcome: finished / cancelled / 4xx / unexpected (with why), latency, tokens."""
    t0 = time.perf_counter()
    body = req["body"]
    out = {"kind": req["kind"]}
    try:
        if req["kind"] == "malformed":
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = await client.post(url + "/v1/completions", **kw)
            ok = r.status_code == req["status"] and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
            return {**out, "outcome": "4xx" if ok else "unexpected", "why": f"{r.status_code} {r.text[:200]}"}
        if not body["stream"]:
            r = await client.post(url + "/v1/completions", json=body)
            c = r.json()["choices"][0] if r.status_code == 200 else {}
            if c.get("finish_reason") in ("stop", "length"):
                return {**out, "outcome": "finished", "s": time.perf_counter() - t0,
                        "tokens": r.json()["usage"]["completion_tokens"]}
            return {**out, "outcome": "unexpected", "why": f"{r.status_code} {r.text[:200]}"}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {**out, "outcome": "unexpected", "why": f"{r.status_code} {r.text[:200]}"}
            first, tokens, finish, done = None, 0, None, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.perf_counter() - t0
                    if req["kind"] == "disconnect":
                        return {**out, "outcome": "cancelled", "first": first}   # hang up mid-stream
                if line == "data: [DONE]":
                    done = True
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    return {**out, "outcome": "unexpected", "why": f"error event {ev['error']}"}
                tokens += len(ev["choices"][0]["token_ids"])
                finish = ev["choices"][0]["finish_reason"] or finish
            if done and finish in ("stop", "length"):
                return {**out, "outcome": "finished", "s": time.perf_counter() - t0, "first": first, "tokens": tokens}
            return {**out, "outcome": "unexpected", "why": f"stream ended: done={done} finish={finish}"}
    except Exception as e:  # noqa: BLE001  (a transport error is an unaccounted request)
        return {**out, "outcome": "unexpected", "why": f"{type(e).__name__}: {e}"}


async def _drive(url: str, plan: list[dict], concurrency: int, on_progress) -> list[dict]:
    import httpx

    results: list = [None] * len(plan)
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            nonlocal next_i
            while next_i < len(plan):
                i, next_i = next_i, next_i + 1
                results[i] = await _one(client, url, plan[i])
                on_progress(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _server_metrics(url: str) -> dict:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r'^twotower:(request_success_total|requests_rejected_total|request_errors_total)\{([^}]*)\} (\S+)$',
                         text, re.M):
        labels = dict(kv.split("=", 1) for kv in m.group(2).split(","))
        key = labels.get("finished_reason", labels.get("reason", "")).strip('"')
        out[f"{m.group(1)}:{key}" if key else m.group(1)] = int(float(m.group(3)))
    return out


def soak(requests: int = 2000, concurrency: int = 64, threads: int = 1) -> list[dict]:
    import httpx

    import twotower_ext as tt

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(tt.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "twotower_ext.cli", "serve", "--port", "0", "--name", "default_model", "--max-batch",
           "16", "--max-queue", str(concurrency + 16), "--max-len", "256", "--max-body-bytes", str(MAX_BODY),
           "--threads", str(threads), "--shutdown-timeout", "5"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        while line and "serving default_model" not in line:
            line = proc.stderr.readline()
        if not line:
            raise SoakFailed(f"the server did not start: {proc.stderr.read()}")
        url = line.split(" on ")[1].split()[0]
        plan = _plan(requests)
        warm_at = max(1, requests // 10)
        rss = {"start": _rss_mb(proc.pid)}
        done = [0]

        def progress(i):
            done[0] += 1
            if done[0] == warm_at:
                rss["warm"] = _rss_mb(proc.pid)

        with harness.LoadMonitor() as mon:
            cpu0, t0 = _cpu_s(proc.pid), time.perf_counter()
            results = asyncio.run(_drive(url, plan, concurrency, progress))
            wall, server_cpu = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0
        end = time.monotonic() + 30      # cancelled rows leave before the next pass
        while (h := httpx.get(url + "/health", timeout=30).json())["live_rows"] or h["queue_depth"]:
            if time.monotonic() > end:
                break
            time.sleep(0.05)
        rss["end"] = _rss_mb(proc.pid)
        server = _server_metrics(url)
        proc.send_signal(15)
        rc = proc.wait(timeout=60)
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the server's CPU is this benchmark's own work, not another process's
    other = None if mon.other_cores is None else max(0.0, mon.other_cores - server_cpu / wall)
    timing = harness.Timing(wall, wall, wall, 1, mon.load1, other)
    harness.TIMINGS.append(timing)
    return _report(plan, results, server, h, rss, wall, rc, log, other)


def _report(plan, results, server, health, rss, wall, rc, log, other) -> list[dict]:
    rows = []
    for kind in ("completion", "stream", "disconnect", "malformed", "all"):
        rs = [r for r in results if kind == "all" or r["kind"] == kind]
        fin = [r for r in rs if r["outcome"] == "finished"]
        row = {"kind": kind, "requests": len(rs), "finished": len(fin),
               "cancelled": sum(r["outcome"] == "cancelled" for r in rs), "4xx": sum(r["outcome"] == "4xx" for r in rs),
               "unexpected": sum(r["outcome"] == "unexpected" for r in rs), "p50_s": _pct([r["s"] for r in fin], 0.5),
               "p99_s": _pct([r["s"] for r in fin], 0.99),
               "first_event_p50_s": _pct([r["first"] for r in rs if r.get("first") is not None], 0.5)}
        if kind == "all":
            row.update({"tokens/s": sum(r["tokens"] for r in fin) / wall, "duration_s": wall,
                        "rss_start_MB": rss["start"], "rss_warm_MB": rss.get("warm", ""), "rss_end_MB": rss["end"],
                        "live_rows_after": health["live_rows"], "other_cores": "" if other is None else other})
        rows.append(row)
    harness.print_table("soak: twotower serve (shipped model) under load, disconnects and malformed requests",
                        rows, COLUMNS)
    total = rows[-1]
    problems = [f"{r['kind']}: {r['why']}" for r in results if r["outcome"] == "unexpected"][:10]
    if len(results) != len(plan) or total["finished"] + total["cancelled"] + total["4xx"] != len(plan):
        problems.append(f"{len(plan) - total['finished'] - total['cancelled'] - total['4xx']} requests not accounted for")
    want = {"request_success_total:stop+length": total["finished"], "request_success_total:abort": total["cancelled"]}
    got = {"request_success_total:stop+length": server.get("request_success_total:stop", 0) +
           server.get("request_success_total:length", 0),
           "request_success_total:abort": server.get("request_success_total:abort", 0)}
    if got != want or any(k.startswith(("requests_rejected", "request_errors")) and v for k, v in server.items()):
        problems.append(f"the server counts {server}, the clients {want}")
    if health["live_rows"] or health["queue_depth"]:
        problems.append(f"rows leaked: /health says {health}")
    if rc != 0 or "Traceback" in log:
        problems.append(f"the server exited {rc}; its log: {log[-2000:]}")
    print(f"server accounting: {server}; /health after: live_rows={health['live_rows']} "
          f"queue_depth={health['queue_depth']}; RSS {rss['start']:.0f} MB at start, {rss.get('warm', 0):.0f} MB after "
          f"warm-up, {rss['end']:.0f} MB at the end; exit {rc}")
    if problems:
        raise SoakFailed("soak: " + "; ".join(problems))
    print("soak: every request accounted for, no row leaked, clean exit")
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device != "cpu":
        print("bench soak: CPU only (the shipped model; a GPU server is soaked the same way with --device cuda "
              "on `twotower serve`)")
        return []
    return soak(100, 16) if quick else soak()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="100 requests at concurrency 16")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--allow-busy", action="store_true")
    a = ap.parse_args(argv)
    rows = soak(100, 16) if a.quick else soak(a.requests, a.concurrency)
    if not a.no_save:
        try:
            out = harness.write_results("soak-cpu", "soak on cpu", rows, COLUMNS, allow_busy=a.allow_busy or None)
        except harness.BusyMachineError as e:
            print(f"python -m bench.bench_soak: {e}", file=sys.stderr)
            return 3
        print(f"(written to {out}/soak-cpu.md/.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
