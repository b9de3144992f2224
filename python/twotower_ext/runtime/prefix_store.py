"""The prefix cache's tensors and its part of a prefill (the bookkeeping is prefix_cache.py's).

An entry (one `model.prefill_segment`-token segment of a prompt) holds that segment's K/V of every
attention layer, [2 x attention layers, segment, Hkv, D] in the model dtype, and where the bookkeeping asks
for it the Mamba states at its end: conv [Mamba layers, K-1, conv_dim] (model dtype) and SSM [Mamba layers,
H, P, N] (fp32). Entries are tensors of their own on the context tower's device (beside the cache), made
when saved and freed when evicted, so the memory in use is exactly the bytes the budget counts.

A prefill with the cache (`PrefixStore.prefill`): the prompts' chained keys are looked up; each row that
hits gets the K/V of its cached segments copied into its cache row, its Mamba states set from the state
at the last one and its length set there; the model then prefills the rest of the prompt as an extension
of the row from that boundary (models/towers.py `prefill(start=...)`), and after each round of segments the
rows that computed a segment nobody has cached save it. Prompts admitted together that share uncached
segments compute them once (prefix_cache.plan_waves). Entries a prefill reads or writes are pinned until it
ends; rows keep copies, so a live row never reads the cache after its prefill.

What an entry may be used for is fixed by its root key: the model's context-tower weights (a sampled
fingerprint), its dtype, the routed experts' storage format and the segment size (`model_root`)."""
from __future__ import annotations

import torch

from .. import quant
from ..models.cache import Rows
from .prefix_cache import PrefixCache, chunk_keys, plan_waves, root_key

# Bytes of each context-tower tensor that enter the model's fingerprint (evenly spaced).
FINGERPRINT_SAMPLES = 256


def _tensors(obj):
    """Every tensor of a weights object (dataclasses, lists, quantised experts), in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, quant.QuantizedExperts):
        yield obj.data
        yield obj.scale
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def expert_format(model) -> str:
    """How the context tower's routed experts are stored: "bf16" (the model dtype) or a quant format."""
    for layer in model.weights.context.layers:
        up = getattr(layer.mixer, "up", None)
        if isinstance(up, quant.QuantizedExperts):
            return up.fmt
    return "bf16"


def model_root(model) -> bytes:
    """The root key of a model's entries: its config, dtype, expert format, segment size and a fingerprint of
    its context-tower weights (shape, dtype and FINGERPRINT_SAMPLES evenly spaced bytes of each tensor, read
    in one device-to-host copy)."""
    shapes, samples = [], []
    for t in _tensors(model.weights.context):
        raw = t.reshape(-1).view(torch.uint8)   # bytes: any dtype (fp8, packed int4) indexes on any device
        idx = torch.linspace(0, max(0, raw.numel() - 1), min(FINGERPRINT_SAMPLES, raw.numel()),
                             device=raw.device).long()
        samples.append(raw[idx])
        shapes.append((tuple(t.shape), str(t.dtype)))
    data = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return root_key("twotower-prefix-v1", _config_items(model), str(model.dtype), expert_format(model),
                    model.prefill_segment, shapes, data)


def _config_items(model) -> list:
    return sorted((k, repr(v)) for k, v in vars(model.config).items())


def budget_bytes(gb, name: str) -> int:
    """A prefix cache budget given in GiB (a number >= 0; 0: no cache) as bytes."""
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not 0 <= gb < float("inf"):
        raise ValueError(f"{name} must be a number of GiB >= 0 (0: no prefix cache), got {gb!r}")
    return int(gb * 2**30)


def usable_tokens(prompt_len: int, mode: str) -> int:
    """The prompt tokens whose state may come from the cache: all of them in diffusion (nothing is read from
    the prefill); AR needs the last token's logits and mock-AR the states before the last token, so there
    the cache covers at most prompt[:-1]."""
    return prompt_len if mode == "diffusion" else prompt_len - 1


class PrefixStore:
    """The prefix cache of one model layout (config, dtype, device), under a budget of `budget` bytes
    (0: disabled). Cores of one model may share it (`generate` keeps one across the cores it makes)."""

    def __init__(self, model, budget: int):
        self.index = PrefixCache(budget)
        self.segment = model.prefill_segment
        self.layout = self._layout(model)
        cfg = model.config
        self.attention = [i for i, k in enumerate(cfg.layer_kinds) if k == "attention"]
        self.mamba = [i for i, k in enumerate(cfg.layer_kinds) if k == "mamba"]

    @staticmethod
    def _layout(model) -> tuple:
        return _config_items(model), model.dtype, model.ctx_device, model.prefill_segment

    @property
    def enabled(self) -> bool:
        return self.index.enabled

    def check(self, model) -> None:
        if self._layout(model) != self.layout:
            raise ValueError("prefix cache: this store was made for another model layout (config, dtype, device or "
                             "prefill_segment); make one per model")

    def stats(self) -> dict:
        return self.index.stats()

    # ------------------------------------------------------------------------------------------------
    def prefill(self, root: bytes, cache, rows: list[int], prompts: list[list[int]], mode: str, run) -> None:
        """Prefill `prompts` into cache `rows` through the cache. run(rows, prompts, start, on_segment) is the
        model's prefill of some of them (models/towers.py `prefill` and what the runner keeps of it)."""
        P, index = self.segment, self.index
        usable = [p[:usable_tokens(len(p), mode)] for p in prompts]
        keys = [chunk_keys(root, u, P) for u in usable]
        chunks = [[u[j * P:(j + 1) * P] for j in range(len(k))] for u, k in zip(usable, keys)]
        probes = [index.probe(root, k, c) for k, c in zip(keys, chunks)]
        waves, state_keys = plan_waves(keys, [f for f, _ in probes], [h for _, h in probes])
        for wave in (0, 1):
            idx = [i for i, w in enumerate(waves) if w == wave]
            if not idx:
                continue
            leases = {rows[i]: index.acquire(root, keys[i], chunks[i], len(prompts[i])) for i in idx}
            try:
                wrows = [rows[i] for i in idx]
                self._load(cache, wrows, leases)
                run(wrows, [prompts[i] for i in idx], [leases[r].hit * P for r in wrows],
                    lambda seg_rows, ends: self._save(cache, seg_rows, ends, leases, state_keys))
            finally:
                for lease in leases.values():
                    index.release(lease)

    def _load(self, cache, rows: list[int], leases: dict) -> None:
        """Rows that hit: their cached segments' K/V, the state at the last one and their length."""
        hit = [r for r in rows if leases[r].hit]
        if not hit:
            return
        sel = Rows(hit, cache.batch)
        cache.reset(sel)
        st, P = cache.ctx, self.segment
        states, lens = [], []
        for r in hit:
            kvs, state = self.index.payloads(leases[r])
            T = len(kvs) * P
            for a, i in enumerate(self.attention):
                for j, t in enumerate((st.k[i], st.v[i])):
                    torch.cat([kv[2 * a + j] for kv in kvs], out=t[r, :T])
            states.append(state)
            lens.append(T)
        conv = torch.stack([s[0] for s in states])   # [rows, Mamba layers, K-1, conv_dim]
        ssm = torch.stack([s[1] for s in states])
        for m, i in enumerate(self.mamba):
            sel.put(st.conv[i], conv[:, m])
            sel.put(st.ssm[i], ssm[:, m])
        sel.put(st.lens, torch.tensor(lens, dtype=torch.int32, device=st.device))
        for r, T in zip(hit, lens):
            cache.lens_host[r] = T
        cache.sync_mirror(sel, 0, max(lens))

    def _save(self, cache, rows: list[int], ends: list[int], leases: dict, state_keys: set) -> None:
        """After a round of segments: cache the segments of `rows` (ending at `ends`) nobody has cached yet, and
        the states at the end of those in state_keys. A device out of memory caches nothing, failing nothing."""
        try:
            self._save_round(cache, rows, ends, leases, state_keys)
        except torch.OutOfMemoryError:
            pass

    def _save_round(self, cache, rows, ends, leases, state_keys) -> None:
        P, index = self.segment, self.index
        new, states, seen = [], [], set()
        for r, end in zip(rows, ends):
            lease, j = leases[r], end // P - 1
            if j >= len(lease.keys) or lease.keys[j] in seen:   # past what the cache covers (AR's last token)
                continue
            key = lease.keys[j]
            seen.add(key)
            if key not in index.entries:
                new.append((r, j))
            if key in state_keys:
                states.append((r, key))
        if new:
            for (r, j), kv in zip(new, self._gather_kv(cache, [r for r, _ in new], [j for _, j in new])):
                index.insert(leases[r], j, kv, kv.nbytes)
        states = [(r, k) for r, k in states if k in index.entries and index.entries[k].state is None]
        if states:
            for (r, key), (conv, ssm) in zip(states, self._gather_state(cache, [r for r, _ in states])):
                index.add_state(key, (conv, ssm), conv.nbytes + ssm.nbytes)

    def _gather_kv(self, cache, rows: list[int], segs: list[int]) -> list[torch.Tensor]:
        """Each row's K/V of its segment segs[i], [2 x attention layers, segment, Hkv, D], one tensor each."""
        st, P = cache.ctx, self.segment
        cap = cache.capacity
        base = torch.tensor([r * cap + j * P for r, j in zip(rows, segs)], device=st.device)
        flat = (base[:, None] + torch.arange(P, device=st.device)).reshape(-1)
        parts = [t.view(-1, *t.shape[2:]).index_select(0, flat).view(len(rows), P, *t.shape[2:])
                 for i in self.attention for t in (st.k[i], st.v[i])]
        both = torch.stack(parts, 1)   # [rows, 2 x attention layers, segment, Hkv, D]
        return [both[0]] if len(rows) == 1 else [x.clone() for x in both.unbind(0)]

    def _gather_state(self, cache, rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        st = cache.ctx
        sel = Rows(rows, cache.batch)
        conv = torch.stack([sel.take(st.conv[i]) for i in self.mamba], 1)   # [rows, Mamba layers, ...]
        ssm = torch.stack([sel.take(st.ssm[i]) for i in self.mamba], 1)
        if len(rows) == 1:
            return [(conv[0], ssm[0])]
        return [(c.clone(), s.clone()) for c, s in zip(conv.unbind(0), ssm.unbind(0))]
