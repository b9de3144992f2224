"""Timing, machine limits, machine load and tables shared by every benchmark.

CPU timings: wall clock over repeated calls after warm-up, median and p10-p90 spread. CUDA timings:
CUDA events, warm-up, inputs rotated so L2 is cold. The machine's limits (copy and read bandwidth at the
working-set size of the row, matmul rate) are measured in the same run, so "% of limit" compares like with
like: an in-cache input against an in-cache copy, a DRAM-sized one against a DRAM-sized copy, a read-only
kernel against a pure read.

Every timing also records the 1-minute load average and the CPU time other processes used while it ran
(/proc/stat minus this process): a timing during which others kept more than BUSY_CORES cores busy prints
a warning, and write_results refuses to save results that contain one unless allowed (`python -m bench
--allow-busy`, or TWOTOWER_BENCH_ALLOW_BUSY=1); allowed results are marked busy in the JSON and the table.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch


BUSY_CORES = 0.25        # other processes' average CPU use (cores) during a timing above which it is "busy"


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    reps: int
    load1: float | None = None       # 1-minute load average at the end of the timing
    other_cores: float | None = None  # CPU seconds other processes used per wall second during the timing

    @property
    def spread(self) -> str:
        return f"{self.p10_s * 1e6:.0f}-{self.p90_s * 1e6:.0f}"

    @property
    def busy(self) -> bool:
        return self.other_cores is not None and self.other_cores > BUSY_CORES


def _summarise(samples: list[float]) -> Timing:
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return Timing(statistics.median(samples), pick(0.1), pick(0.9), len(samples))


# ----------------------------------------------------------------------------------------------------
# machine load


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have used (user, nice, system, irq, softirq, steal) since boot (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class LoadMonitor:
    """Other processes' CPU use over an interval: all CPU time used on the machine minus this process's."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_cpu_s(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy1, own = _busy_cpu_s(), time.process_time() - self.own0
        self.other_cores = (None if busy1 is None or self.busy0 is None or wall <= 0
                            else max(0.0, (busy1 - self.busy0 - own) / wall))
        self.load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return False


TIMINGS: list[Timing] = []   # every timing of this process, for write_results' busy check


def _record(timings: list[Timing], mon: LoadMonitor) -> None:
    """Give timings taken under `mon` its load figures, keep them in TIMINGS, and warn (once) when it was busy."""
    for t in timings:
        t.load1, t.other_cores = mon.load1, mon.other_cores
    TIMINGS.extend(timings)
    if timings and timings[0].busy:
        print(f"bench: warning: other processes used {mon.other_cores:.2f} cores during a timing (load average "
              f"{mon.load1:.1f}): this result is not trustworthy", file=sys.stderr, flush=True)


def _monitored(timing_fn):
    """Wrap a timing function: record load average and other processes' CPU use, warn when busy."""
    def wrapped(*a, **kw):
        with LoadMonitor() as mon:
            t = timing_fn(*a, **kw)
        _record([t], mon)
        return t
    wrapped.__doc__, wrapped.__name__ = timing_fn.__doc__, timing_fn.__name__
    return wrapped


def load_fields(*timings: Timing) -> dict:
    """Row columns for the machine load during a row's timings: the worst other-process CPU use and load."""
    others = [t.other_cores for t in timings if t is not None and t.other_cores is not None]
    loads = [t.load1 for t in timings if t is not None and t.load1 is not None]
    return {"other_cores": max(others) if others else "", "load1": max(loads) if loads else ""}


@_monitored
def time_cpu(fn, *, warmup: int = 3, min_reps: int = 10, budget_s: float = 1.0) -> Timing:
    """Median wall time of fn() over at least min_reps calls or budget_s seconds."""
    for _ in range(warmup):
        fn()
    samples, t_end = [], time.perf_counter() + budget_s
    while len(samples) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10_000:
            break
    return _summarise(samples)


def time_cpu_interleaved(fns, *, rounds: int = 3, warmup: int = 2, min_reps: int = 6, budget_s: float = 1.0
                         ) -> list[Timing]:
    """Median wall time of each of fns, timed in turn for `rounds` rounds (each fn at least min_reps calls and about
    budget_s seconds in all), so that a machine whose speed drifts over minutes (the shared VMs: 10-30% within an
    hour) moves them alike: how to compare variants of one call. The machine load is recorded over the whole run."""
    per_round = max(1, -(-min_reps // rounds))
    with LoadMonitor() as mon:
        for fn in fns:
            for _ in range(warmup):
                fn()
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(rounds):
            for fn, s in zip(fns, samples):
                n0, t_end = len(s), time.perf_counter() + budget_s / rounds
                while len(s) - n0 < per_round or time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    fn()
                    s.append(time.perf_counter() - t0)
    out = [_summarise(s) for s in samples]
    _record(out, mon)
    return out


@_monitored
def time_calls(fn, reps: int) -> Timing:
    """Median wall time of reps calls of fn() (no warm-up: for long calls, e.g. a whole generation; the caller
    warms up), with the machine load recorded like every other timing."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return _summarise(samples)


@_monitored
def time_cuda(fns, *, warmup: int = 5, reps: int = 50) -> Timing:
    """Median time via CUDA events; `fns` is a list of closures over distinct input buffers, cycled so
    consecutive calls do not find their inputs in L2."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    samples = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fns[i % len(fns)]()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b) * 1e-3)
    return _summarise(samples)


def time_fn(fn_for_buffer, device: str, n_buffers: int = 1, **kw) -> Timing:
    """Time on the right clock: fn_for_buffer(i) returns a closure over input set i."""
    if device == "cuda":
        return time_cuda([fn_for_buffer(i) for i in range(n_buffers)], **kw)
    return time_cpu(fn_for_buffer(0), **kw)


@dataclass
class Limits:
    """The machine's practical limits, measured now."""
    copy_gbps: float
    matmul_tflops: dict = field(default_factory=dict)


def measure_copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Achieved GB/s of a tensor copy of nbytes (bytes read + bytes written). The default is DRAM-sized; pass
    the working set of the row being compared (read + written bytes) for an in-cache row."""
    n = max(1024, nbytes // 8)                       # half read, half written
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda i: (lambda: dst.copy_(src)), device, budget_s=0.5, min_reps=5)
    return 2 * n * 4 / t.median_s / 1e9


def measure_read_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, huge_pages: bool = False) -> float:
    """Achieved GB/s of a pure read of nbytes (a sum: one add per 4 bytes, far below the FPU's rate): the
    limit of a read-only kernel of that working set. huge_pages: the buffer from twotower_ext.hugepages (2 MB
    pages where the kernel has them), the limit for a model's CPU weights, which live there; on the 2-core Xeon
    VM it read 1.4x faster than 4 KB pages."""
    n = max(1024, nbytes // 4)
    if huge_pages:
        from twotower_ext import hugepages

        src = hugepages.empty((n,), torch.float32, device).fill_(1.0)
    else:
        src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    t = time_fn(lambda i: (lambda: src.sum()), device, budget_s=0.5, min_reps=5)
    return src.numel() * 4 / t.median_s / 1e9


def measure_matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, device: str = "cpu") -> float:
    """Achieved TFLOP/s of one [m,k] @ [k,n] matmul in dtype."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    t = time_fn(lambda i: (lambda: a @ b), device, budget_s=0.5, min_reps=5)
    return 2 * m * k * n / t.median_s / 1e12


def best_of(measure, *args, reps: int = 3, **kw) -> float:
    """The highest of `reps` runs of a limit measurement (measure_*): a limit is the best the machine does, and on a
    shared machine a run during which the process was descheduled says nothing about it."""
    return max(measure(*args, **kw) for _ in range(reps))


# ----------------------------------------------------------------------------------------------------
# before / after: the same timings against another build of the package, in the same run

BASELINE_ENV = "TWOTOWER_BENCH_BASELINE"


def baseline() -> str | None:
    """The code a benchmark compares against (`python -m bench --baseline`, or TWOTOWER_BENCH_BASELINE): `installed`
    (the twotower_ext this interpreter has installed, e.g. main's wheel in the shared venv) or `TREE:LIB` (a source
    tree's python/ package with a build of it); None when unset."""
    return os.environ.get(BASELINE_ENV) or None


def run_in_baseline(module: str, func: str, **kwargs):
    """bench.<module>.<func>(**kwargs) run in a child interpreter whose twotower_ext is the baseline build (JSON in
    and out; the child's timings are its own, taken right before or after the parent's); None without a baseline.
    The function must only use what both builds have."""
    spec = baseline()
    if spec is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in (BASELINE_ENV, "TWOTOWER_EXT_LIB", "PYTHONPATH")}
    path = [root]  # this tree's bench package; twotower_ext from the baseline
    if spec != "installed":
        tree, sep, lib = spec.partition(":")
        if not sep or not os.path.isfile(lib):
            raise SystemExit(f"bench: {BASELINE_ENV} must be 'installed' or TREE:LIB with LIB a built _C*.so, "
                             f"got {spec!r}")
        env["TWOTOWER_EXT_LIB"] = lib
        path.insert(0, os.path.join(tree, "python"))
    env["PYTHONPATH"] = os.pathsep.join(path)
    code = ("import json, sys, torch; torch.set_num_threads(%d); from bench import %s as m; "
            "print('@@' + json.dumps(m.%s(**json.loads(sys.argv[1]))))" % (torch.get_num_threads(), module, func))
    res = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], env=env, cwd=root, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench: the baseline run of {module}.{func} failed:\n{res.stderr[-3000:]}")
    return json.loads(next(line[2:] for line in reversed(res.stdout.splitlines()) if line.startswith("@@")))


def around_baseline(module: str, func: str, body, **kwargs):
    """body() with the baseline build's bench.<module>.<func>(**kwargs) run right before and right after it: returns
    (body's result, per entry the one of the two baseline results with the smaller first value (a median), or None
    without a baseline). A shared machine's load drifts over the minutes a table takes; bracketing the new build's
    timings with the old build's lets both see it."""
    before = run_in_baseline(module, func, **kwargs)
    result = body()
    if before is None:
        return result, None
    after = run_in_baseline(module, func, **kwargs)
    return result, [min(a, b, key=lambda v: v[0]) for a, b in zip(before, after)]


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), e.g. 'Intel(R) Xeon(R) ...'."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _main_module() -> str:
    """The module `python -m` ran (bench, bench.bench_quality, ...), for the command line in the results."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name.removesuffix(".__main__") if spec is not None else "bench"


def machine_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "command": " ".join([os.path.basename(sys.executable), "-m", _main_module(), *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import twotower_ext

        b = twotower_ext.build_info()
        info["twotower_ext"] = {k: b[k] for k in ("version", "cuda", "cuda_archs", "cutlass")}
    except ImportError as e:  # benchmarks of baselines still run
        info["twotower_ext"] = f"not importable: {e}"
    return info


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (saying so) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    return plt


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """A markdown table: readable in a terminal and pasteable into notes and README."""
    print(f"\n### {title}\n")
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


class BusyMachineError(RuntimeError):
    """Results taken while other processes used the CPU: not saved (see write_results)."""


def allow_busy_default() -> bool:
    return os.environ.get("TWOTOWER_BENCH_ALLOW_BUSY", "") not in ("", "0")


def write_results(name: str, title: str, rows: list[dict], columns: list[str], extra: dict | None = None,
                  out_dir: str | None = None, allow_busy: bool | None = None, timings: list | None = None) -> str:
    """Write results/<name>.json and .md with the machine, versions, command line and the machine load seen
    by `timings` (default: every timing this process took). Raises BusyMachineError when one of them was
    taken on a busy machine, unless allow_busy (default: TWOTOWER_BENCH_ALLOW_BUSY); then the results are
    marked busy."""
    timings = TIMINGS if timings is None else timings
    allow_busy = allow_busy_default() if allow_busy is None else allow_busy
    others = [t.other_cores for t in timings if t.other_cores is not None]
    loads = [t.load1 for t in timings if t.load1 is not None]
    load = {"max_other_cores": max(others) if others else None, "max_load1": max(loads) if loads else None,
            "busy_timings": sum(t.busy for t in timings), "timings": len(timings), "busy_cores_limit": BUSY_CORES}
    if load["busy_timings"] and not allow_busy:
        raise BusyMachineError(
            f"{name}: {load['busy_timings']} of {len(timings)} timings ran while other processes used up to "
            f"{load['max_other_cores']:.2f} cores (limit {BUSY_CORES}; load average up to {load['max_load1']:.1f}): "
            f"not saved. Rerun on a quiet machine, or pass --allow-busy to save them marked busy.")
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    info = machine_info()
    payload = {"benchmark": name, "machine": info, "load": load, "busy": bool(load["busy_timings"]), "rows": rows,
               "columns": columns, "title": title, **(extra or {})}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n`{info['command']}` on {info['cpu']}, {info['threads']} threads, "
                f"torch {info['torch']}" + (f", {info['gpu']}" if "gpu" in info else "") + "\n\n")
        if payload["busy"]:
            f.write(f"**Taken on a busy machine** (other processes up to {load['max_other_cores']:.2f} cores, "
                    f"saved with --allow-busy): not for comparison.\n\n")
        f.write("| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n")
    return out_dir
