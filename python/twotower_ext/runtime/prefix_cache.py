"""The prefix cache's bookkeeping (no torch): chained keys of a prompt's segments, the entries under a memory
budget, least-recently-used eviction, pins, and the query / hit counters. The tensors an entry holds are
opaque here (runtime/prefix_store.py makes and reads them).

Keys (vLLM's automatic prefix caching): a prompt is cut into segments of `size` tokens; segment j's key is
a hash of (segment j-1's key, segment j's tokens), segment 0's of (the root, its tokens), so a key stands
for everything before its segment's end. The root names what the cached state depends on (the model's
context-tower weights, dtype, expert format, the segment size), so two models or dtypes never share an
entry. An entry also keeps its tokens and its parent's key, and a lookup compares both: a hash collision
cannot hand a request another prompt's state.

An entry holds one segment's K/V and, where a lookup may end, the Mamba states at its end (`state`): the
recurrent state is only known where it was saved, and at the real model's sizes it is ~30x a segment's K/V,
so it is kept only at a request's last segment and at the segment where its prompt leaves what the cache
holds (the branch point a later request with the same prefix resumes from: SGLang keeps its Mamba states
at radix-tree nodes the same way). A lookup is usable up to the deepest entry with a state.

Memory: every entry's bytes count against the budget; inserting evicts least-recently-used entries that no
running prefill has pinned and that have no children (a parent goes after its children, so no entry is
ever unreachable), and gives up (the entry is not cached) when nothing can go. A budget of 0 disables the
cache. Pinned entries are never evicted: a prefill pins every entry of its prompt's chain, found or
inserted, until its rows hold their copy.
"""
from __future__ import annotations

import collections
import hashlib
import struct
from dataclasses import dataclass, field


def root_key(*parts) -> bytes:
    """The key under which a model's entries live: a hash of `parts` (strings, numbers, bytes)."""
    h = hashlib.blake2b(digest_size=16, person=b"twotower-prefix")
    for p in parts:
        b = p if isinstance(p, bytes) else repr(p).encode()
        h.update(struct.pack("<Q", len(b)) + b)
    return h.digest()


def chunk_keys(root: bytes, tokens, size: int) -> list[bytes]:
    """The chained keys of the whole `size`-token segments of tokens (a trailing partial one has none)."""
    keys, parent = [], root
    for lo in range(0, len(tokens) - size + 1, size):
        parent = hashlib.blake2b(parent + struct.pack(f"<{size}q", *tokens[lo:lo + size]), digest_size=16).digest()
        keys.append(parent)
    return keys


@dataclass
class Entry:
    key: bytes
    parent: bytes                # the previous segment's key (the root for segment 0)
    tokens: tuple
    kv: object                   # the store's payload: this segment's K/V
    nbytes: int
    state: object = None         # the store's payload: the Mamba states at the segment's end, or None
    pins: int = 0
    children: int = 0


@dataclass
class Lease:
    """A prefill's hold on its prompt's chain: `found` leading segments are cached (K/V), the first `hit` of
    them end at a state (usable); every entry it pinned is released together."""
    root: bytes
    keys: list
    chunks: list
    found: int
    hit: int
    pinned: list = field(default_factory=list)


class PrefixCache:
    def __init__(self, budget: int):
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(f"prefix cache budget must be an int >= 0 (bytes), got {budget!r}")
        self.budget = budget
        self.used = 0
        self.entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()   # least recent first
        self.queries = self.hits = 0     # prompt tokens looked up / taken from the cache
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def probe(self, root: bytes, keys: list, chunks: list) -> tuple[int, int]:
        """(found, hit): how many leading segments of a prompt's chain are cached (tokens and parents
        verified), and how many of them a prefill can start after (the deepest with a state). No side effects."""
        found = hit = 0
        parent = root
        for k, c in zip(keys, chunks):
            e = self.entries.get(k)
            if e is None or e.parent != parent or e.tokens != tuple(c):
                break
            found += 1
            if e.state is not None:
                hit = found
            parent = k
        return found, hit

    def acquire(self, root: bytes, keys: list, chunks: list, query_tokens: int) -> Lease:
        """Look a prompt's chain up and pin what is found; counts the query and the hit (tokens)."""
        found, hit = self.probe(root, keys, chunks)
        lease = Lease(root, list(keys), list(chunks), found, hit)
        for k in keys[:found]:
            self._pin(lease, k)
        self.queries += query_tokens
        self.hits += sum(len(c) for c in chunks[:hit])
        return lease

    def payloads(self, lease: Lease) -> tuple[list, object]:
        """The K/V payloads of the leased hit's segments and the state at its end (None without a hit)."""
        es = [self.entries[k] for k in lease.keys[:lease.hit]]
        return [e.kv for e in es], es[-1].state if es else None

    def _pin(self, lease: Lease, key: bytes) -> None:
        self.entries[key].pins += 1
        lease.pinned.append(key)

    def release(self, lease: Lease) -> None:
        """Unpin the lease's entries and mark its chain used, the root's end last (most recent): within a
        chain the deepest entry goes first."""
        for k in lease.pinned:
            self.entries[k].pins -= 1
        lease.pinned = []
        for k in reversed(lease.keys):
            if k in self.entries:
                self.entries.move_to_end(k)

    def insert(self, lease: Lease, j: int, kv, nbytes: int) -> bool:
        """Cache segment j of the lease's chain (its parent must be cached), pinned by the lease. False (not
        cached) when it is cached already or the budget has no room even after evicting what may go."""
        key = lease.keys[j]
        parent = lease.keys[j - 1] if j else lease.root
        if key in self.entries or (j and parent not in self.entries) or not self._make_room(nbytes):
            return False
        self.entries[key] = Entry(key, parent, tuple(lease.chunks[j]), kv, nbytes)
        self.used += nbytes
        if j:
            self.entries[parent].children += 1
        self._pin(lease, key)
        return True

    def add_state(self, key: bytes, state, nbytes: int) -> bool:
        """Attach the Mamba states at the end of a cached segment; False when it has one or there is no room."""
        e = self.entries.get(key)
        if e is None or e.state is not None:
            return False
        e.pins += 1   # not evicted to make room for its own state
        try:
            room = self._make_room(nbytes)
        finally:
            e.pins -= 1
        if room:
            e.state, e.nbytes = state, e.nbytes + nbytes
            self.used += nbytes
        return room

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.budget:
            return False
        while self.used + nbytes > self.budget:
            victim = next((e for e in self.entries.values() if e.pins == 0 and e.children == 0), None)
            if victim is None:
                return False
            del self.entries[victim.key]
            self.used -= victim.nbytes
            self.evictions += 1
            if victim.parent in self.entries:
                self.entries[victim.parent].children -= 1
        return True

    def stats(self) -> dict:
        return {"prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_entries": len(self.entries), "prefix_cache_bytes": self.used,
                "prefix_cache_budget_bytes": self.budget, "prefix_cache_evictions": self.evictions}


def plan_waves(chains: list[list], found: list[int], hit: list[int]) -> tuple[list[int], set]:
    """Plan the prefill of requests admitted together (chains: each one's keys; found / hit: `probe`'s).
    Returns (waves, state_keys). Segments several of them need and nobody has cached are computed once:
    the first request that needs a segment computes it (wave 0); a request whose first segment to compute
    another wave-0 request computes waits for wave 1 and takes the cached copy. state_keys: the segments at
    whose end the Mamba states are saved: each request's last one, the cached segment where its prompt
    leaves the cached chain (found > hit: the branch point a later prompt with the same prefix resumes
    from), and for a request of wave 1 the deepest segment wave 0 computes for it."""
    claimed: set = set()
    waves, state = [], set()
    for keys, n, h in zip(chains, found, hit):
        if keys:
            state.add(keys[-1])
        if n > h:
            state.add(keys[n - 1])
        todo = keys[h:]
        if todo and todo[0] in claimed:
            waves.append(1)
            shared = next((j for j, k in enumerate(todo) if k not in claimed), len(todo))
            state.add(todo[shared - 1])
        else:
            claimed.update(todo)
            waves.append(0)
    return waves, state
