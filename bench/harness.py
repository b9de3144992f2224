"""Timing, machine limits and tables shared by every benchmark.

CPU timings: wall clock over repeated calls after warm-up, median and p10-p90 spread. CUDA timings:
CUDA events, warm-up, inputs rotated so L2 is cold. The machine's limits (copy bandwidth, matmul rate)
are measured in the same run, so "% of limit" compares like with like.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    reps: int

    @property
    def spread(self) -> str:
        return f"{self.p10_s * 1e6:.0f}-{self.p90_s * 1e6:.0f}"


def _summarise(samples: list[float]) -> Timing:
    samples = sorted(samples)
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return Timing(statistics.median(samples), pick(0.1), pick(0.9), len(samples))


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
    """Achieved GB/s of a large tensor copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda i: (lambda: dst.copy_(src)), device, budget_s=0.5, min_reps=5)
    return 2 * nbytes / t.median_s / 1e9


def measure_matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, device: str = "cpu") -> float:
    """Achieved TFLOP/s of one [m,k] @ [k,n] matmul in dtype."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    t = time_fn(lambda i: (lambda: a @ b), device, budget_s=0.5, min_reps=5)
    return 2 * m * k * n / t.median_s / 1e12


def machine_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
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


def write_results(name: str, title: str, rows: list[dict], columns: list[str], extra: dict | None = None,
                  out_dir: str | None = None) -> str:
    """Write results/<name>.json and .md with the machine, versions and command line."""
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    info = machine_info()
    payload = {"benchmark": name, "machine": info, "rows": rows, **(extra or {})}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\n`{info['command']}` on {info['cpu']}, {info['threads']} threads, "
                f"torch {info['torch']}" + (f", {info['gpu']}" if "gpu" in info else "") + "\n\n")
        f.write("| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n")
        for r in rows:
            f.write("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n")
    return out_dir
