"""How many CPU threads a decode runs on: the one rule shared by the API (`load(threads=None)`) and the
CLI (`--threads 0`). Measurements behind it: docs/threads.md.

- A model narrower than TINY_MODEL_HIDDEN (the shipped one, the parity checkpoint): 1 thread. Its ops
  take microseconds; a second thread cannot win back a hand-off.
- Up to SMALL_MODEL_HIDDEN: 1 thread unless OpenMP threads wait passively (OMP_WAIT_POLICY=PASSIVE, which
  `import twotower_ext` sets when it loads torch). With libgomp's default spin-then-sleep waiting, 2
  threads on a loaded 2-core machine made a width-1/8 denoiser pass 40x slower than 1 thread (a spinning
  thread takes the CPU from the one with work, at every one of the thousands of small matmuls of its
  MoE layers); with passive waiting 2 threads were 2-3x faster than 1.
- Wider models: torch's own setting (their matmuls are large enough to split either way).

A thread count asked for explicitly (`--threads N`) is capped at the cores this process may run on
(`cap_threads`): more OpenMP threads than cores only wait on each other (1024 threads made a 0.2 s generate
take 8 s on 2 cores), and libgomp aborts or crashes outright on counts in the tens of thousands.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

TINY_MODEL_HIDDEN = 256
SMALL_MODEL_HIDDEN = 1024


def passive_wait() -> bool:
    """Whether OpenMP's idle threads sleep rather than spin (the environment torch was loaded with)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def recommended_threads(config, device, passive: bool | None = None) -> int | None:
    """Threads for decoding `config` on `device` (None: leave torch's setting); passive: the OpenMP wait
    policy (None: read it from the environment, see `passive_wait`)."""
    if torch.device(device).type != "cpu":
        return None
    if config.hidden_size < TINY_MODEL_HIDDEN:
        return 1
    if config.hidden_size < SMALL_MODEL_HIDDEN and not (passive_wait() if passive is None else passive):
        return 1
    return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def cap_threads(n: int, what: str = "--threads") -> int:
    """n, or the usable cores when n asks for more (saying so on stderr: `twotower: warning: ...`)."""
    cores = usable_cores()
    if n > cores:
        print(f"twotower: warning: {what} {n} is more than the {cores} core(s) this process may use; using {cores}",
              file=sys.stderr, flush=True)
        return cores
    return n


@contextlib.contextmanager
def using_threads(n: int | None):
    """torch's intra-op thread count set to n for the block (None: unchanged), restored afterwards."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)
