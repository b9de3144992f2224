"""Where rows live in the cache: pure functions, no torch (unit-tested in tests/test_runtime_plans.py).

Every group of rows that shares a pass (diffusion rows of one block size, the AR rows, the mock-AR rows, a
lockstep batch) is a contiguous slice of the cache, so its passes read views of the cache, never gathers.
Groups are packed from row 0 in their order; when rows leave or join, the fewest rows move.

A captured CUDA graph covers a padded bucket of rows (`bucket`, `padded_slice`): the rows a bucket holds
beyond its group's are inert in it (runner.py masks their writes)."""
from __future__ import annotations

from collections.abc import Hashable


def plan_layout(placed: dict[int, Hashable], new: dict[Hashable, int], order: list[Hashable], max_rows: int):
    """placed: row -> group of every row that holds a request; new: group -> requests joining it; order: the
    groups' order in the cache (every group of placed / new, each once). Returns (moves, slices, new_rows):
    moves = (src, dst) lists (a row's data goes from src[j] to dst[j]; every source is read before any
    destination is written), slices = group -> (lo, n) with the groups packed from row 0 in `order`, and
    new_rows = group -> the rows its new requests take (ascending)."""
    if set(placed.values()) | set(new) != set(order) or len(order) != len(set(order)):
        raise ValueError("plan_layout: order must list every group of placed and new exactly once")
    count = {g: 0 for g in order}
    for g in placed.values():
        count[g] += 1
    for g, k in new.items():
        count[g] += k
    total = sum(count.values())
    if total > max_rows:
        raise ValueError(f"plan_layout: {total} rows do not fit in {max_rows}")
    slices, lo = {}, 0
    for g in order:
        slices[g] = (lo, count[g])
        lo += count[g]
    src, dst, new_rows = [], [], {}
    for g in order:
        lo, n = slices[g]
        mine = sorted(r for r, h in placed.items() if h == g)
        staying = {r for r in mine if lo <= r < lo + n}
        holes = [r for r in range(lo, lo + n) if r not in staying]   # ascending
        movers = [r for r in mine if r not in staying]
        for r, h in zip(movers, holes):
            src.append(r)
            dst.append(h)
        new_rows[g] = holes[len(movers):]
    return (src, dst), slices, new_rows


def bucket(n: int, max_rows: int) -> int:
    """The padded batch size a group of n rows runs at under CUDA graphs: 1, 2, 4, 8, then multiples of 8 up
    to 64, then multiples of 16 (SGLang's and vLLM's shape: fine steps where batches are small), never more
    than max_rows."""
    if not 1 <= n <= max_rows:
        raise ValueError(f"bucket: n must be in [1, max_rows={max_rows}], got {n}")
    if n <= 8:
        b = 1 << (n - 1).bit_length()
    elif n <= 64:
        b = -(-n // 8) * 8
    else:
        b = -(-n // 16) * 16
    return min(b, max_rows)


def padded_slice(lo: int, n: int, max_rows: int) -> tuple[int, int]:
    """(start, size) of the padded bucket that holds the group's rows [lo, lo + n): starts at lo unless that
    would run past the cache's last row, then ends there."""
    size = bucket(n, max_rows)
    return min(lo, max_rows - size), size
