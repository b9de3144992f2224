"""The decode core's policy over request state (vLLM's Scheduler): admission, the queue bound, the groups
of rows that share a pass and where they sit in the cache, and the decode rules the host applies to what a
pass produced (docs/semantics.md: the EOS cut, the partial last block, reference_compat's batch stop). No
torch and no model: `schedule()` returns a Plan the model runner executes; `update(plan, out)` takes the one
small readback of the iteration and moves requests on.

Groups: rows share a pass when they share its shape and static arguments: diffusion rows of one block size
and mask id, the AR rows, the mock-AR rows of one mask id. A lockstep batch (a `generate` call with
reference_compat=True, NVIDIA's batch semantics, or device_loop=True, a whole block per graph) is a group of
its own whose rows start every block together."""
from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

import numpy as np

from .layout import plan_layout
from .request import FINISHED, RUNNING, Request


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the request was refused at once."""


@dataclass
class Group:
    slot: int                    # small id, stable for the group's life (graph keys, the row -> group tensor)
    key: tuple
    mode: str
    block_size: int              # diffusion; 1 in the AR modes
    mask_id: int                 # the id a masked position holds (-1 for AR: nothing is excluded)
    compat: bool = False         # reference_compat: batch-mean t, any EOS stops every row, whole blocks kept
    device_loop: bool = False    # a whole block per iteration (one graph: WHILE node or unrolled steps)
    requests: list = field(default_factory=list)   # in row order
    lo: int = 0
    top_k: int = -1              # logprobs: -1 none asked, else the most alternatives a request asked for
    passes: int = 0              # lockstep: passes of the current block so far
    pending: list = field(default_factory=list)    # rows whose block (token) waits to be appended to the context

    @property
    def lockstep(self) -> bool:
        return self.compat or self.device_loop

    @property
    def diffusion(self) -> bool:
        return self.mode == "diffusion"


@dataclass
class Plan:
    moves: tuple[list[int], list[int]]
    cleared: list[int]                 # rows no request holds any more (made inert)
    admitted: list[tuple[Group, list[int], list[Request]]]
    groups: list[Group]                # in cache order; each runs one pass (lockstep device loop: a block)


_lockstep_ids = itertools.count()


class Policy:
    def __init__(self, max_rows: int, max_queue: int):
        self.max_rows, self.max_queue = max_rows, max_queue
        self.waiting: collections.deque[list[Request]] = collections.deque()   # admission units
        self.queued = 0                        # requests waiting
        self.groups: dict[tuple, Group] = {}   # in cache order
        self.rows: list[Request | None] = [None] * max_rows
        self.finished: list[Request] = []      # requests finished since the last take_finished()
        self.emitted: list[tuple[Request, int]] = []   # (request, tokens) emitted since the last take_emitted()
        self.dirty = False                     # something to drop or admit: schedule() has work beyond the passes

    # ------------------------------------------------------------------------------------------------
    @property
    def live(self) -> int:
        return sum(len(g.requests) for g in self.groups.values())

    def has_work(self) -> bool:
        return bool(self.groups) or bool(self.waiting)

    def enqueue(self, requests: list[Request], lockstep: dict | None = None) -> None:
        """Queue requests: each on its own, or with lockstep = {"compat": bool, "device_loop": bool} as one
        lockstep batch, admitted together, whose rows must share mode, block size and mask id. Raises
        QueueFull (queuing none of them) when the queue beyond the free rows has no room for them."""
        if self.queued + len(requests) > self.max_queue + max(0, self.max_rows - self.live):
            raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
        if lockstep is not None and len(requests) > self.max_rows:
            raise QueueFull(f"a lockstep batch of {len(requests)} requests needs more than the {self.max_rows} rows")
        for r in requests:
            r.on_cancel = self.note_cancel
        self.dirty = True
        if lockstep is not None:
            tag = next(_lockstep_ids)
            for r in requests:
                r.group_key = self.group_of(r) + (tag, lockstep["compat"], lockstep["device_loop"])
            self.waiting.append(list(requests))
        else:
            for r in requests:
                r.group_key = self.group_of(r) + (None, False, False)
                self.waiting.append([r])
        self.queued += len(requests)

    @staticmethod
    def group_of(r: Request) -> tuple:
        """(mode, block size, mask id): what rows must share to share a pass."""
        p = r.params
        if p.mode == "diffusion":
            return ("diffusion", p.block_size, p.mask_token_id)
        return (p.mode, 1, p.mask_token_id if p.mode == "mock_ar" else -1)

    # ------------------------------------------------------------------------------------------------
    def note_cancel(self) -> None:
        """A request was cancelled (from any thread): the next schedule() looks for it."""
        self.dirty = True

    def schedule(self) -> Plan:
        """Drop finished and cancelled rows, admit waiting requests that fit (first come, first served),
        lay the groups out; the plan of this iteration. When nothing finished, was cancelled or arrived, the
        groups run as they are (no per-row work)."""
        if not self.dirty:
            return Plan(([], []), [], [], list(self.groups.values()))
        self.dirty = False
        before = {i for i, r in enumerate(self.rows) if r is not None}
        for g in list(self.groups.values()):
            for r in g.requests:
                if r.cancelled and r.state != FINISHED:
                    self.end(r, "cancelled")
            gone = [r for r in g.requests if r.state == FINISHED]
            if gone:
                g.requests = [r for r in g.requests if r.state != FINISHED]
                g.pending = [r for r in g.pending if r.state != FINISHED]
            if not g.requests:
                del self.groups[g.key]
        admitted: dict[tuple, list[Request]] = {}
        free = self.max_rows - self.live
        while self.waiting:
            unit = self.waiting[0]
            live = [r for r in unit if not r.cancelled]
            if len(live) > free:   # it waits for rows; a request that finishes frees some (and sets dirty)
                break
            self.waiting.popleft()
            self.queued -= len(unit)
            for r in unit:
                if r.cancelled:
                    self.end(r, "cancelled")
            for r in live:
                admitted.setdefault(r.group_key, []).append(r)
            free -= len(live)
        for key, reqs in admitted.items():
            if key not in self.groups:
                self.groups[key] = self._new_group(key, reqs[0])
        order = list(self.groups)
        placed = {r.row: key for key, g in self.groups.items() for r in g.requests}
        (src, dst), slices, new_rows = plan_layout(placed, {k: len(v) for k, v in admitted.items()}, order,
                                                   self.max_rows)
        moved = dict(zip(src, dst))
        rows: list[Request | None] = [None] * self.max_rows
        for key, g in self.groups.items():
            for r in g.requests:
                r.row = moved.get(r.row, r.row)
                rows[r.row] = r
        adm = []
        for key, reqs in admitted.items():
            g = self.groups[key]
            for r, row in zip(reqs, new_rows[key]):
                r.row, r.state = row, RUNNING
                rows[row] = r
            g.requests.extend(reqs)
            adm.append((g, new_rows[key], reqs))
        for key, g in self.groups.items():
            g.lo = slices[key][0]
            g.requests.sort(key=lambda r: r.row)
            g.top_k = max((r.params.logprobs for r in g.requests if r.params.logprobs is not None), default=-1)
        self.rows = rows
        now = {i for i, r in enumerate(rows) if r is not None}
        cleared = sorted((before | set(src)) - now)
        return Plan((src, dst), cleared, adm, list(self.groups.values()))

    def _new_group(self, key: tuple, r: Request) -> Group:
        used = {g.slot for g in self.groups.values()}
        slot = next(i for i in itertools.count() if i not in used)
        mode, size, mask, _, compat, device_loop = key
        return Group(slot, key, mode, size, mask, compat, device_loop)

    # ------------------------------------------------------------------------------------------------
    # The decode rules on the host, from one iteration's readback (runner.py `Readback`).

    def update(self, group: Group, out) -> None:
        """Apply what group's pass produced. out: per row of the group (in row order) `done` (a block or
        token is ready), and for diffusion rows `tokens` [S], `passes` (this block's passes so far) and
        `hist` (commits per pass); for AR rows `tokens` [1]."""
        if group.diffusion:
            self._update_diffusion(group, out)
        else:
            self._update_ar(group, out)

    def _update_ar(self, g: Group, out) -> None:
        eos_any = False
        for j, tok in enumerate(out.tokens[:, 0].tolist()):
            r = g.requests[j]
            if r.state == FINISHED:   # failed at admission: its row was inert
                continue
            r.nfe += 1
            keep, text, matched = self.text_of(r, [tok])
            if keep and r.params.logprobs is not None:
                self.record_logprobs(r, out, j, 1)
            self.deliver(r, keep, text)
            if r.params.stops(tok) or matched:
                eos_any = True
                self.end(r, "stop")
            elif len(r.tokens) >= r.params.max_new_tokens:
                self.end(r, "length")
        if g.compat and eos_any:   # NVIDIA's reference: the first EOS of any row stops the batch
            for r in g.requests:
                self.end(r, "stop")
        g.pending = [r for r in g.requests if r.state != FINISHED]

    def _update_diffusion(self, g: Group, out) -> None:
        g.pending = []
        if g.lockstep:
            if not g.device_loop:
                g.passes += 1
            if not all(out.done):
                return
            if g.device_loop:   # the passes the block took: the last pass that committed something
                used = [passes_of(h) for h in out.hist]
                passes = [max(used)] * len(used) if g.compat else used
            else:
                passes = [g.passes] * len(g.requests)
            g.passes = 0
            eos_any = False
            for j, (r, n) in enumerate(zip(g.requests, passes)):
                if r.state != FINISHED:
                    eos_any |= self.commit_block(r, out, j, n, cut=not g.compat)
            if g.compat and eos_any:   # NVIDIA's reference: a block with EOS in any row stops the batch
                for r in g.requests:
                    self.end(r, "stop")
            g.pending = [r for r in g.requests if r.state != FINISHED]
            return
        for j in np.flatnonzero(out.done).tolist():   # only the rows that emit a block
            r = g.requests[j]
            if r.state != FINISHED:
                self.commit_block(r, out, j, int(out.passes[j]), cut=True)
                if r.state != FINISHED:
                    g.pending.append(r)

    def commit_block(self, r: Request, out, j: int, passes: int, cut: bool) -> bool:
        """Row j of a readback completed its request's block: record its passes, emit its tokens (the kept
        ones, cut after the first EOS or stop token id when `cut`), finish it there or at its length. Returns
        whether the block holds a stop."""
        p = r.params
        keep = [int(t) for t in out.tokens[j][:min(out.tokens.shape[1], r.remaining)]]
        at = next((i for i, t in enumerate(keep) if p.stops(t)), None)
        eos = at is not None
        if eos and cut:
            keep = keep[:at + 1]
        keep, text, matched = self.text_of(r, keep)
        eos |= matched
        r.nfe += passes
        r.nfe_per_block.append(passes)
        r.commits_per_step.append([int(c) for c in out.hist[j][:passes]])
        if p.logprobs is not None:
            self.record_logprobs(r, out, j, len(keep))
        self.deliver(r, keep, text)
        if eos:
            self.end(r, "stop")
        elif r.remaining <= 0:
            self.end(r, "length")
        return eos

    @staticmethod
    def record_logprobs(r: Request, out, j: int, n: int) -> None:
        """The first n positions' log-probabilities of readback row j (and the request's k alternatives)."""
        r.logprobs.extend(float(v) for v in out.logprob[j, :n])
        k = r.params.logprobs
        if k:
            r.top_logprobs.extend([(int(i), float(v)) for i, v in zip(out.top_id[j, s, :k], out.top_lp[j, s, :k])]
                                  for s in range(n))

    @staticmethod
    def text_of(r: Request, tokens: list[int]) -> tuple[list[int], str | None, bool]:
        """(the tokens r keeps, the text they show, whether a stop string ended r) when r builds its text
        (runtime/text.py: nothing after a stop string is kept or shown); else (tokens, None, False)."""
        if r.text is None:
            return tokens, None, False
        n, text, matched = r.text.add(tokens)
        return tokens[:n], text, matched

    def deliver(self, r: Request, tokens: list[int], text: str | None = None) -> None:
        """Emit tokens (and their text) to r's client (its nfe already counts the pass); noted for
        take_emitted()."""
        r.emit(tokens, text)
        self.emitted.append((r, len(tokens)))

    def take_emitted(self) -> list[tuple[Request, int]]:
        out, self.emitted = self.emitted, []
        return out

    def end(self, r: Request, reason: str, error: BaseException | None = None) -> None:
        """Finish r (once) and note it for take_finished()."""
        if r.state == FINISHED:
            return
        r.finish(reason, error)
        self.finished.append(r)
        self.dirty = True

    def take_finished(self) -> list[Request]:
        out, self.finished = self.finished, []
        return out

    def drain(self, reason: str = "cancelled") -> None:
        """Finish every queued and running request (the core is stopping)."""
        for unit in self.waiting:
            for r in unit:
                self.end(r, reason)
        self.waiting.clear()
        self.queued = 0
        for g in self.groups.values():
            for r in g.requests:
                self.end(r, reason)


def passes_of(hist) -> int:
    """Passes a row's block took in a device loop: up to the last pass that committed a token."""
    n = 0
    for i, c in enumerate(hist):
        if c:
            n = i + 1
    return n
