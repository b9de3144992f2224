"""Large CPU tensors in memory advised for transparent huge pages (THP): the weights a CPU pass streams.

Why: a decode pass on the CPU reads its weights (hundreds of MB) once per pass from memory, and with 4 KB pages
every 4 KB of that stream is a TLB miss (on a VM a two-level page walk). Measured on this project's 2-core Xeon
VM: a pure read of 256 MB at 10.2 GB/s (1 thread) and 20 GB/s (2 threads) from 4 KB pages, 14.2 and 28.5 from
2 MB pages; the width-1/8 model's bf16 passes at 2 threads 8-17% faster with its weights in huge pages. torch's CPU
allocator gives no say over the page size (its large blocks are glibc mmaps: 4 KB pages unless the kernel's THP
mode is "always", and a reused block keeps the pages it has), so tensors of MIN_BYTES or more are carved out of
anonymous mappings here, 2 MB aligned and advised MADV_HUGEPAGE before their first touch. Where the kernel has no
THP (or TWOTOWER_HUGEPAGES=0) `empty` is torch.empty.

Each tensor has a storage of its own (a view of the mapping that keeps it alive): torch.save writes its bytes
only, and a mapping is unmapped when its last tensor is freed. Tensors under CHUNK_BYTES share chunks of that
size, so the chunk in use (at most CHUNK_BYTES) outlives the tensors in it until the next allocation moves on.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import threading

import torch

MIN_BYTES = 256 << 10    # smaller tensors stay torch's: they are few MB in all and mostly cache-resident
CHUNK_BYTES = 8 << 20    # smaller tensors share chunks of this size; larger ones get a mapping each
HUGE = 2 << 20           # the x86-64 / aarch64 (4 KB granule) huge page
ALIGN = 4096             # each tensor starts on a page of its own

_lock = threading.Lock()
_chunk: list = [None, 0, 0]   # [mapping, its 2 MB aligned offset, next free offset]


def enabled() -> bool:
    """Whether large CPU tensors go to huge pages: the kernel offers THP (mode always or madvise) and
    TWOTOWER_HUGEPAGES is not 0."""
    return os.environ.get("TWOTOWER_HUGEPAGES", "1") != "0" and _thp_available()


@functools.cache   # the kernel's THP support does not change while the process runs; empty() asks per tensor
def _thp_available() -> bool:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _map(nbytes: int) -> tuple[mmap.mmap, int]:
    """A fresh anonymous mapping of at least nbytes from a 2 MB boundary, advised for huge pages; (mapping,
    offset of that boundary)."""
    m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    probe = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(probe)
    del probe   # the buffer export ends here
    return m, (-addr) % HUGE


def empty(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device); on the CPU, from MIN_BYTES on, in huge-page memory
    (see the module docstring) when enabled()."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or not enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    size = -(-nbytes // ALIGN) * ALIGN
    if size >= CHUNK_BYTES:
        m, off = _map(-(-size // HUGE) * HUGE)
    else:
        with _lock:
            m, base, used = _chunk
            if m is None or used + size > base + CHUNK_BYTES:
                m, base = _map(CHUNK_BYTES)
                used = base
            off = used
            _chunk[:] = [m, base, used + size]
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=off).view(dtype).view(shape)
