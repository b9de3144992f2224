"""The model runner: owns the model's context cache, the persistent per-row batch (batch.py) and the CUDA
graphs, and executes a Plan (policy.py): row moves, prefills, then one pass per group of rows, then ONE
small device-to-host copy of what the passes produced.

Per group and iteration (docs/semantics.md for the rules):
- diffusion: first the pending extension — the rows whose block was committed at the last iteration and go
  on get it appended to the context, and start their next block (all masked, step 0, next block index) —
  then one denoiser pass over the group's rows and one commit with every row's own parameters (threshold,
  steps, step, temperature, seed, block index, kept length) as tensors: the model's denoise_commit, whose LM
  head and commit are one op (`lm_head_unmask`: on the CPU the logits are never stored unless the group
  returns top logprobs). A lockstep
  group with device_loop runs a whole block instead (a WHILE node, or the steps unrolled).
- AR / mock-AR: the pending extension by each row's last sampled token (mock-AR: with the Mamba snapshot),
  then (mock-AR: the denoiser's mock-AR pass and) one sampling call for every row, greedy and sampling rows
  alike: the same op on a one-position block (mask id -1 for AR: nothing is excluded), keyed by (seed, token
  index).

Eagerly (the CPU, or cuda_graphs=False) a pass covers exactly the group's rows and an extension exactly the
rows it appends to. Under CUDA graphs every pass is captured per (pass, static arguments, padded bucket of
rows): the group's slice is padded to a bucket size (layout.py), the rows of the bucket that are not the
group's (or not extending) are inert — their block tokens enter as "nothing masked", every write to them
is masked, the extension leaves their K/V, Mamba states and lengths as they were (TwoTowerModel.extend_step
`active`) — and which rows are the group's is read on the device from the per-row group slots, so one graph
serves every composition of its bucket. Graphs are captured on first use (the eager warm-up call, then the
capture); `capture_s` in the stats reports the time.
"""
from __future__ import annotations

import time
import types
import warnings

import numpy as np
import torch

from ..models.cache import Rows
from . import graphs as graph_mod
from .batch import PersistentBatch
from .layout import padded_slice
from .policy import Group, Plan, passes_of
from .prefix_store import model_root
from .sampler import sample_tokens, top_logprobs


def use_graphs(cuda_graphs: bool, model) -> bool:
    """CUDA graphs run the passes when asked for, on CUDA, with both towers on one device."""
    return cuda_graphs and model.ctx_device.type == "cuda" and model.ctx_device == model.den_device


def host_available_bytes() -> int:
    """MemAvailable (what can be allocated without swapping: free + reclaimable page cache), not MemFree."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_bytes(model, rows: int, capacity: int, snapshot: bool) -> int:
    """Bytes of a context cache: KV of every attention layer, conv + fp32 SSM state of every Mamba layer."""
    from ..models.cache import cache_row_bytes

    kv, state = cache_row_bytes(model.config, torch.finfo(model.dtype).bits // 8)
    return rows * (kv * capacity + state * (2 if snapshot else 1))


class PhaseClock:
    """Time per phase ("context_s", "denoiser_s"): CUDA events on a GPU (read after the iteration's readback,
    which synchronises anyway), the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.s = {"context_s": 0.0, "denoiser_s": 0.0}
        self.open: list = []

    def phase(self, name: str, fn):
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            self.s[name] += time.perf_counter() - t0
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        self.open.append((name, a, b))

    def settle(self) -> None:
        for name, a, b in self.open:
            self.s[name] += a.elapsed_time(b) / 1e3
        self.open = []


class ModelRunner:
    def __init__(self, model, max_rows: int, max_len: int, snapshot: bool, cuda_graphs: bool = True, prefix=None):
        self.model, self.cfg = model, model.config
        self.max_rows, self.max_len = max_rows, max_len
        self.cache = _allocate_cache(model, max_rows, max_len, snapshot)
        # the prefix cache (prefix_store.PrefixStore) when one with a budget is given, and this model's root key
        self.prefix = prefix if prefix is not None and prefix.enabled else None
        if self.prefix is not None:
            self.prefix.check(model)
            _check_prefix_room(self.prefix, model.ctx_device)
            self.prefix_root = model_root(model)
        self.dev = model.den_device
        self.batch = PersistentBatch(max_rows, self.dev, self.cfg.vocab_size)
        self.graphs = graph_mod.StepGraphs(self.dev) if use_graphs(cuda_graphs, model) else None
        self.clock = PhaseClock(self.dev)
        self.executed_passes = 0
        self.loop_kind = "while" if graph_mod.while_supported() else "unrolled"
        self._warned_while = False
        self._slices: dict = {}

    @property
    def snapshot(self) -> bool:
        return self.cache.snapshots

    # ------------------------------------------------------------------------------------------------
    # layout and admission

    def apply(self, plan: Plan) -> list[tuple[list, Exception]]:
        """Row moves, inert values for freed rows, prefill of the admitted requests. Returns the admissions
        whose prefill failed (their requests, the error): the caller fails them; the other rows are untouched."""
        src, dst = plan.moves
        self.cache.move(src, dst)
        self.batch.move(src, dst)
        self.batch.clear(plan.cleared)
        failed = []
        for group, rows, reqs in plan.admitted:
            try:
                self._prefill(group, rows, reqs)
            except Exception as e:  # noqa: BLE001  (only these requests fail)
                self.batch.clear(rows)
                failed.append((reqs, e))
        return failed

    def _prefill(self, g: Group, rows: list[int], reqs) -> None:
        self.batch.admit(rows, [r.params for r in reqs], g.slot)
        prompts = [q.prompt for q in reqs]

        def run(rows, prompts, start=None, on_segment=None):
            r = self.cache.rows(rows)
            logits = self.model.prefill(prompts, self.cache, r, logits=g.mode == "ar", snapshot=g.mode == "mock_ar",
                                        start=start, on_segment=on_segment)
            if g.mode == "ar":
                r.put(self.batch.ar_logits(), logits)
            elif g.mode == "mock_ar":   # the token the first mock-AR pass reads
                last = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=self.dev)
                r.put(self.batch.token, last[:, None])

        if self.prefix is None:
            self.clock.phase("context_s", lambda: run(rows, prompts))
        else:
            self.clock.phase("context_s", lambda: self.prefix.prefill(self.prefix_root, self.cache, rows, prompts,
                                                                      g.mode, run))

    # ------------------------------------------------------------------------------------------------
    # one iteration

    def execute(self, groups: list[Group]):
        """One pass per group (after its pending extension), then one readback. Returns (outs, failures):
        outs = [(group, per-row results)] for the groups that ran, failures = [(group, error)]."""
        ran, failures = [], []
        for g in groups:
            try:
                self._run_group(g)
                ran.append(g)
            except Exception as e:  # noqa: BLE001  (a failed pass fails its group's rows, not the others)
                failures.append((g, self._explain(g, e)))
        outs = self._readback(ran)
        self.clock.settle()
        for g, out in outs:
            if g.device_loop:   # unrolled: every step ran; else the passes until the last row was done
                unrolled = self.graphs is not None and self.loop_kind == "unrolled"
                self.executed_passes += self.block_steps(g) if unrolled else max(passes_of(h) for h in out.hist)
        return outs, failures

    @property
    def device_loop_kind(self) -> str:
        """How a device-loop block runs: "while" (one WHILE node), "unrolled" (graphs without WHILE nodes) or
        "eager" (no graphs: a host loop)."""
        return "eager" if self.graphs is None else self.loop_kind

    def _run_group(self, g: Group) -> None:
        """The group's pending extension, then its pass (device-loop groups: its block). Phases are timed and
        passes counted here, outside anything a graph captures."""
        n = len(g.requests)
        pending = [r.row for r in g.pending]
        ctx_phase = "context_s"
        pass_phase = "context_s" if g.mode == "ar" else "denoiser_s"
        if pending:
            self._check_capacity(pending, g.block_size)
        if self.graphs is None:   # eagerly: exactly the group's rows, exactly the extending rows
            exact = self._rows(g.lo, n)
            if pending:
                ext = exact if len(pending) == n else Rows(pending, self.max_rows)
                self.clock.phase(ctx_phase, lambda: self._extend(g, ext, None))
            self.clock.phase(pass_phase, lambda: self._pass(g, exact, None, self.block_steps(g) if g.device_loop else 0))
        else:
            a, size = padded_slice(g.lo, n, self.max_rows)
            rows = self._rows(a, size)
            steps = self.block_steps(g) if g.device_loop else 0
            static = (g.mode, g.block_size, g.mask_id, g.compat, g.device_loop, steps, g.slot, a, size)

            def member():
                return self.batch.group[a:a + size] == g.slot

            def ready():   # the rows with a pending block / token: the host's `pending`, seen on the device
                return self.batch.done[a:a + size] & member()

            if g.device_loop and self.loop_kind == "unrolled" and not self._warned_while:
                warnings.warn("twotower: this torch has no conditional WHILE nodes in CUDA graphs (torch >= 2.14 "
                              "with CUDA >= 12.4 has them): device_loop=True runs every block's steps unrolled "
                              "(stats['device_loop'] == 'unrolled')", RuntimeWarning, stacklevel=4)
                self._warned_while = True
            if g.diffusion:
                if pending:
                    self.clock.phase(ctx_phase, lambda: self.graphs.run(
                        ("extend",) + static, lambda: self._extend(g, rows, ready())))
                self.clock.phase(pass_phase, lambda: self.graphs.run(
                    ("denoise",) + static, lambda: self._pass(g, rows, member(), steps)))
            else:   # the extension by the last token and the next token: one graph
                def step():
                    if pending:
                        self._extend(g, rows, ready())
                    self._pass(g, rows, member())
                self.clock.phase(pass_phase, lambda: self.graphs.run(("ar", bool(pending)) + static, step))
        if pending:
            self.cache.count_appended(pending, g.block_size)
        if not g.device_loop:
            self.executed_passes += 1

    def _rows(self, lo: int, n: int) -> Rows:
        """The cache rows [lo, lo + n), made once per slice (a Rows caches its index tensors)."""
        key = (lo, n)
        if key not in self._slices:
            self._slices[key] = Rows(slice(lo, lo + n), self.max_rows)
        return self._slices[key]

    def _check_capacity(self, rows: list[int], add: int) -> None:
        full = [b for b in rows if self.cache.lens_host[b] + add > self.cache.capacity]
        if full:   # admission sizes every request's context: this is a bug, not a user error
            raise RuntimeError(f"rows {full} would exceed the cache capacity {self.cache.capacity}")

    @staticmethod
    def _sel(mask, new, old):
        """new where mask (bool [n]) holds, else old; mask None: new everywhere."""
        if mask is None:
            return new
        return torch.where(mask.view(-1, *[1] * (new.dim() - 1)), new, old)

    def _extend(self, g: Group, rows: Rows, ext) -> None:
        """Append every extending row's ready block (AR modes: its last token) to the context and start its
        next block. ext: bool mask over rows (None: all of them)."""
        b = self.batch
        if g.diffusion:
            xs = b.block_tokens(g.block_size)
            x = rows.take(xs)
            self.model.extend_step(x, self.cache, rows, active=ext)
            blk = rows.take(b.block) + 1
            kept = (rows.take(b.max_new).long() - blk * g.block_size).clamp(max=g.block_size).to(torch.int32)
            for t, new in ((xs, torch.full_like(x, g.mask_id)), (b.step, torch.zeros_like(rows.take(b.step))),
                           (b.block, blk), (b.kept, kept), (b.hist, torch.zeros_like(rows.take(b.hist)))):
                rows.put(t, self._sel(ext, new, rows.take(t)))
        else:
            mock = g.mode == "mock_ar"
            logits = self.model.extend_step(rows.take(b.token), self.cache, rows, logits=not mock, snapshot=mock,
                                            active=ext)
            if not mock:
                rows.put(b.ar_logits(), self._sel(ext, logits, rows.take(b.ar_logits())))
            if ext is None:   # eagerly the host's `pending` says which rows extend: no flags to clear
                return
        done = rows.take(b.done)
        rows.put(b.done, self._sel(ext, torch.zeros_like(done), done))

    def _pass(self, g: Group, rows: Rows, member, steps: int = 0) -> None:
        """The group's pass over rows (member: bool mask of the group's rows among them, None: all); a
        device-loop group's block of at most `steps` passes."""
        if not g.diffusion:
            self._sample(g, rows, member)
        elif not g.device_loop:
            self._denoise_commit(g, rows, member)
        else:
            self._block_loop(g, rows, member, steps)

    def block_steps(self, g: Group) -> int:
        """Passes a device-loop block runs at most: every pass commits a position, and the last step all."""
        return min(g.block_size, max(r.params.steps_per_block for r in g.requests))

    def _block_loop(self, g: Group, rows: Rows, member, steps: int) -> None:
        """A whole block without host reads: a WHILE node running passes until every row's kept positions are
        committed (eagerly: a host loop), or where the node is missing, block_steps passes unrolled."""
        b = self.batch

        def open_rows():
            done = rows.take(b.done)
            return (~done if member is None else member & ~done).any()

        if self.graphs is None or self.loop_kind == "while":
            graph_mod.device_while(open_rows, lambda: self._denoise_commit(g, rows, member))
            return
        for _ in range(steps):
            self._denoise_commit(g, rows, member)

    def _denoise_commit(self, g: Group, rows: Rows, member) -> None:
        """One denoiser pass over the rows' blocks and the commit step with each row's own parameters."""
        b, S, mask = self.batch, g.block_size, g.mask_id
        xs = b.block_tokens(S)
        held = rows.take(xs)
        x = held if member is None else torch.where(member[:, None], held, torch.zeros_like(held))
        frac = (x == mask).float().mean(1)
        if g.compat:   # NVIDIA's reference: every row is conditioned on the batch's mean masked fraction
            t = (frac.mean() if member is None else (frac * member).sum() / member.sum().clamp(min=1)).expand_as(frac)
        else:
            t = frac
        # rows whose kept positions were all committed before this pass: a lockstep group's, riding along
        open_before = None if member is None and not g.lockstep else ~rows.take(b.done)
        counts = torch.empty(x.shape[0], dtype=torch.int32, device=self.dev)
        held_step = step = rows.take(b.step)
        steps, kept = rows.take(b.steps), rows.take(b.kept)
        if member is not None:   # rows of other groups in the bucket: values valid for this block size
            step, steps, kept = (torch.where(member, v, torch.full_like(v, inert))
                                 for v, inert in ((step, 0), (steps, 1), (kept, 0)))
        done = rows.take(b.done) if member is None else torch.empty_like(member)
        # logprobs: written at the positions this pass commits (rows outside the group commit nothing)
        out_lp = rows.take(b.logprob_buffers()[0])[:, :S] if g.top_k >= 0 else None
        was = x == mask if g.top_k > 0 else None
        # the pass, the LM head and the commit in one (ops.lm_head_unmask): the logits are materialised only
        # for the groups that return alternatives
        _, _, logits = self.model.denoise_commit(
            x, self.cache, t, rows, mask_id=mask, gamma=rows.take(b.gamma), step=step, steps_per_block=steps,
            temperature=rows.take(b.temperature), seed=rows.take(b.seed), block=rows.take(b.block), kept=kept,
            out_counts=counts, out_done=done, out_logprob=out_lp, logits=g.top_k > 0)
        if g.top_k > 0:
            self._store_top(rows, logits, was & (x != mask), g.top_k, mask)
        hist = rows.take(b.hist)
        at = step.long().clamp(max=hist.shape[1] - 1)[:, None]
        live = open_before if member is None else open_before & member
        if live is None:   # eagerly, a group whose rows are all open: views of the batch, updated in place
            hist.scatter_(1, at, counts[:, None])
            held_step += 1
            return
        rows.put(b.hist, self._sel(live, hist.scatter(1, at, counts[:, None]), hist))
        rows.put(b.step, self._sel(live, held_step + 1, held_step))
        if member is not None:
            rows.put(b.done, self._sel(member, done, rows.take(b.done)))
            rows.put(xs, self._sel(member, x, held))

    def _sample(self, g: Group, rows: Rows, member) -> None:
        """AR / mock-AR: the next token of every row, greedy and sampling rows in one call, keyed by (seed,
        token index): the op on a one-position block (mask id -1 for AR: no id is excluded)."""
        b = self.batch
        if g.mode == "mock_ar":
            logits = self.model.mock_ar(rows.take(b.token)[:, 0], self.cache, rows)
        else:
            logits = rows.take(b.ar_logits())
        block = rows.take(b.block)
        lp = rows.take(b.logprob_buffers()[0])[:, :1] if g.top_k >= 0 else None
        out_lp = None if lp is None else lp if member is None else torch.empty_like(lp)
        x = sample_tokens(logits, rows.take(b.temperature), rows.take(b.seed), block, g.mask_id, out_lp)
        if g.top_k > 0:
            sampled = torch.ones_like(x, dtype=torch.bool) if member is None else member[:, None]
            self._store_top(rows, logits[:, None], sampled, g.top_k, g.mask_id)
        if member is None:   # eagerly the rows are the group's slice: views, updated in place (no ready flags:
            rows.take(b.token).copy_(x)   # the host's `pending` says which rows extend)
            block += 1
            return
        if lp is not None:
            lp.copy_(self._sel(member, out_lp, lp))
        done = rows.take(b.done)
        rows.put(b.token, self._sel(member, x, rows.take(b.token)))
        rows.put(b.block, block + member)
        rows.put(b.done, self._sel(member, torch.ones_like(done), done))

    def _store_top(self, rows: Rows, logits: torch.Tensor, committed: torch.Tensor, k: int, exclude: int) -> None:
        """The k likeliest alternatives of every position committed by this pass (committed: bool [n, S] of
        logits [n, S, V]) into the batch's top_lp / top_id (rows: a slice of the batch, its views)."""
        values, ids = top_logprobs(logits, k, exclude)
        _, top_lp, top_id = self.batch.logprob_buffers()
        S = logits.shape[1]
        for store, new in ((rows.take(top_lp)[:, :S, :k], values), (rows.take(top_id)[:, :S, :k], ids)):
            store.copy_(torch.where(committed[..., None], new, store))

    def _explain(self, g: Group, e: Exception) -> Exception:
        """NaN logits found by the commit step: say which tower and layer first produced a non-finite value."""
        if isinstance(e, ValueError) and "must not contain NaN" in str(e) and g.diffusion:
            from ..analysis.diagnose import nonfinite_origin

            rows = Rows(slice(g.lo, g.lo + len(g.requests)), self.max_rows)
            x = rows.take(self.batch.block_tokens(g.block_size))
            t = (x == g.mask_id).float().mean(1)
            return ValueError(f"{e}: {nonfinite_origin(self.model, x, self.cache, rows, t)}")
        return e

    # ------------------------------------------------------------------------------------------------
    def _readback(self, groups: list[Group]) -> list:
        """What the host needs of every group that ran, in one device-to-host copy."""
        b = self.batch
        parts, layouts = [], []
        for g in groups:
            sl = slice(g.lo, g.lo + len(g.requests))
            S, k = g.block_size, g.top_k
            if g.diffusion:
                cols = {"done": b.done[sl, None], "passes": b.step[sl, None], "tokens": b.block_tokens(S)[sl],
                        "hist": b.hist[sl, :S]}
            else:
                cols = {"tokens": b.token[sl]}
            if k >= 0:
                lp, top_lp, top_id = b.logprob_buffers()
                cols["logprob"] = lp[sl, :S]
                if k > 0:
                    cols["top_lp"] = top_lp[sl, :S, :k].reshape(len(g.requests), -1)
                    cols["top_id"] = top_id[sl, :S, :k].reshape(len(g.requests), -1)
            parts += cols.values()
            layouts.append((g, len(g.requests), [(name, t.shape[1]) for name, t in cols.items()]))
        if not parts:
            return []
        # float64 holds the token ids and counters exactly, and the log-probabilities; without those, int64
        dtype = torch.float64 if any(g.top_k >= 0 for g in groups) else torch.int64
        host = torch.cat([t.reshape(-1).to(dtype) for t in parts]).cpu().numpy()
        outs, at = [], 0
        for g, n, names in layouts:
            out = types.SimpleNamespace()
            for name, width in names:
                m = host[at:at + n * width].reshape(n, width)
                at += m.size
                if name in ("top_lp", "top_id"):
                    m = m.reshape(n, g.block_size, g.top_k)
                setattr(out, name, m if name in ("logprob", "top_lp") else m.astype(np.int64))
            if g.diffusion:
                out.done = out.done[:, 0].astype(bool)
                out.passes = out.passes[:, 0]
            else:
                out.done = np.ones(n, dtype=bool)
            outs.append((g, out))
        return outs


def free_bytes(dev: torch.device) -> int:
    return torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else host_available_bytes()


def _check_prefix_room(prefix, dev: torch.device) -> None:
    """The prefix cache grows into its budget as it fills: the device must have that much free beside the
    context cache."""
    room, free = prefix.index.budget - prefix.index.used, free_bytes(dev)
    if room > free:
        raise MemoryError(f"the prefix cache's budget of {prefix.index.budget / 2**30:.2f} GiB does not fit: {dev} has "
                          f"{free / 2**30:.2f} GiB free beside the context cache; lower prefix_cache_gb")


def _allocate_cache(model, rows: int, capacity: int, snapshot: bool):
    """The context cache, allocated whole up front so a request that cannot fit fails before any work."""
    need, dev = cache_bytes(model, rows, capacity, snapshot), model.ctx_device
    free = free_bytes(dev)
    if need > free:
        raise MemoryError(f"the context cache for {rows} rows x {capacity} tokens needs {need / 2**30:.2f} GiB "
                          f"but {dev} has {free / 2**30:.2f} GiB free; lower the rows, the prompt length or "
                          f"max_new_tokens")
    try:
        return model.new_cache(rows, capacity, snapshot=snapshot)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        raise MemoryError(f"the context cache for {rows} rows x {capacity} tokens does not fit in memory; lower "
                          f"the rows, the prompt length or max_new_tokens ({e})") from None
