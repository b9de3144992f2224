"""The context cache: everything the context tower has computed about each row, preallocated.

Per attention layer i: K and V [batch, capacity, Hkv, D] in the model dtype. Per Mamba layer i: the conv
state [batch, K-1, conv_dim] (the last K-1 raw pre-conv xBC rows) in the model dtype and the SSM state
[batch, H, P, N] in fp32; with `snapshot=True` also a second copy of both (the state *before* the last
extension, which mock-AR seeds the denoiser from). `lens` [batch] int32 on the device = tokens per row (the context tower reads and advances it there);
`lens_host` mirrors it on the host by counting what was appended (`count_appended`), never by reading the
device, so no call needs a device sync to size or check its work.

When the denoiser runs on another device than the context tower (or `mirror=True`), a second store on
the denoiser's device holds a copy the model refreshes after every prefill / extension, so the denoiser
only ever reads local memory. Batch rows are addressed by `rows`: None (all), a slice, or a sequence /
tensor of row indices; contiguous rows are handled as views (no copies).
"""
from __future__ import annotations

import torch

from .config import NemotronHConfig


def cache_row_bytes(cfg: NemotronHConfig, elt: int) -> tuple[int, int]:
    """(KV bytes per token, Mamba conv + fp32 SSM state bytes) of one cache row whose K/V and conv state are
    stored with `elt` bytes per element; the layout of CacheStore below."""
    kinds = cfg.layer_kinds
    kv = kinds.count("attention") * 2 * cfg.num_key_value_heads * cfg.head_dim * elt
    state = kinds.count("mamba") * ((cfg.conv_kernel - 1) * cfg.conv_dim * elt
                                    + cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * 4)
    return kv, state


class Rows:
    """A normalised selection of cache rows: `sl` (a slice, when contiguous) or an index on demand."""

    def __init__(self, rows, batch: int):
        if rows is None:
            rows = slice(0, batch)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(batch)
            if step != 1:
                raise ValueError(f"rows: slices must have step 1, got {rows}")
            host = list(range(start, stop))
        else:
            host = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
            bad = [r for r in host if not 0 <= r < batch]
            if bad:
                raise ValueError(f"rows: indices {bad} are outside the cache's {batch} rows")
            if len(set(host)) != len(host):
                raise ValueError(f"rows: indices must be distinct, got {host}")
        if not host:
            raise ValueError("rows: the selection is empty")
        self.host = host
        contiguous = host == list(range(host[0], host[0] + len(host)))
        self.sl = slice(host[0], host[0] + len(host)) if contiguous else None
        self._index: dict = {}

    def __len__(self):
        return len(self.host)

    def index(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._index:
            self._index[device] = torch.tensor(self.host, dtype=torch.long, device=device)
        return self._index[device]

    def ids(self, device) -> torch.Tensor:
        """The row indices as an int64 tensor on `device`: a device-side arange when contiguous (no host-to-device
        copy, so capturable in a CUDA graph), else the cached index."""
        if self.sl is not None:
            return torch.arange(self.sl.start, self.sl.stop, device=device)
        return self.index(device)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The selected rows of t: a view when contiguous, else a copy (write back with `put`)."""
        return t[self.sl] if self.sl is not None else t.index_select(0, self.index(t.device))

    def put(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """Store `value` (from `take`, possibly modified) back into t's selected rows."""
        if self.sl is not None:
            if value.data_ptr() != t[self.sl].data_ptr():
                t[self.sl].copy_(value)
        else:
            t.index_copy_(0, self.index(t.device), value.to(t.device))


class CacheStore:
    """The tensors of one device (see the module docstring)."""

    def __init__(self, cfg: NemotronHConfig, batch: int, capacity: int, dtype: torch.dtype, device, snapshot: bool):
        n = cfg.num_hidden_layers
        kinds = cfg.layer_kinds
        self.device = torch.device(device)
        self.k, self.v = [None] * n, [None] * n
        self.conv, self.ssm, self.prev_conv, self.prev_ssm = [None] * n, [None] * n, [None] * n, [None] * n
        for i in range(n):
            if kinds[i] == "attention":
                shape = (batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
                self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=device)
            elif kinds[i] == "mamba":
                cshape = (batch, cfg.conv_kernel - 1, cfg.conv_dim)
                sshape = (batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size)
                self.conv[i] = torch.zeros(cshape, dtype=dtype, device=device)
                self.ssm[i] = torch.zeros(sshape, dtype=torch.float32, device=device)
                if snapshot:
                    self.prev_conv[i] = torch.zeros(cshape, dtype=dtype, device=device)
                    self.prev_ssm[i] = torch.zeros(sshape, dtype=torch.float32, device=device)
        self.lens = torch.zeros(batch, dtype=torch.int32, device=device)

    def mamba_layers(self):
        return [i for i, c in enumerate(self.conv) if c is not None]

    def attention_layers(self):
        return [i for i, k in enumerate(self.k) if k is not None]

    def write_kv(self, i: int, flat: torch.Tensor, keep: torch.Tensor | None, k: torch.Tensor,
                 v: torch.Tensor) -> None:
        """Store k, v [n, L, Hkv, D] of attention layer i at the flattened token positions `flat` ([n * L], from
        kv_index): one index_copy_ into the [batch * capacity] token axis, no host read. Where `keep` ([n * L, 1, 1]
        bool, from kv_index, or None) is False a position keeps what it holds."""
        for store, val in ((self.k[i], k), (self.v[i], v)):
            tokens = store.view(-1, *store.shape[2:])
            val = val.reshape(-1, *store.shape[2:])
            if keep is not None:
                val = torch.where(keep, val, tokens.index_select(0, flat))
            tokens.index_copy_(0, flat, val)

    def kv_index(self, rows: Rows, pos: torch.Tensor, active: torch.Tensor | None = None):
        """Where write_kv stores the K/V of positions pos [n, L] (a device tensor) of the selected rows: (flat [n * L]
        int64 indices into the flattened [batch * capacity] token axis, keep [n * L, 1, 1] bool or None); (None, None)
        without attention layers. Rows where `active` (bool [n]) is False get keep False: they rewrite what they hold
        at positions inside their own row (a full inert row's positions are clamped into it). The same for every
        attention layer of a pass, so a pass computes them once."""
        stores = [k for k in self.k if k is not None]
        if not stores:
            return None, None
        cap = stores[0].shape[1]
        L = pos.shape[1]
        if active is not None:
            start = torch.where(active, pos[:, 0], pos[:, 0].clamp(max=cap - L))
            pos = start[:, None] + torch.arange(L, device=pos.device)
        flat = (rows.ids(pos.device)[:, None] * cap + pos).reshape(-1)
        keep = None if active is None else active.repeat_interleave(L).view(-1, 1, 1)
        return flat, keep

    def layer_states(self, conv: list, ssm: list) -> list[torch.Tensor]:
        """The cache tensors ops.tower_layers reads, in layer order: (conv[i], ssm[i]) of each Mamba layer (this
        store's current or snapshot lists), (k[i], v[i]) of each attention layer; whole, every row."""
        out = []
        for i in range(len(self.k)):
            if self.k[i] is not None:
                out += (self.k[i], self.v[i])
            elif self.conv[i] is not None:
                out += (conv[i], ssm[i])
        return out

    def reset(self, rows: Rows) -> None:
        for i in self.mamba_layers():
            for t in (self.conv[i], self.ssm[i], self.prev_conv[i], self.prev_ssm[i]):
                if t is not None:
                    rows.put(t, torch.zeros_like(rows.take(t)))
        rows.put(self.lens, torch.zeros(len(rows), dtype=torch.int32, device=self.device))

    def snapshot(self, rows: Rows, active: torch.Tensor | None = None) -> None:
        for i in self.mamba_layers():
            for prev, cur in ((self.prev_conv[i], self.conv[i]), (self.prev_ssm[i], self.ssm[i])):
                new = rows.take(cur)
                if active is not None:   # inert rows keep their snapshot
                    new = torch.where(active.view(-1, *[1] * (new.dim() - 1)), new, rows.take(prev))
                rows.put(prev, new)


class ContextCache:
    """Preallocated context state for `batch` rows of up to `capacity` tokens (see the module docstring).
    Create with `TwoTowerModel.new_cache`."""

    def __init__(self, cfg: NemotronHConfig, batch: int, capacity: int, dtype: torch.dtype, ctx_device,
                 den_device, snapshot: bool = False, mirror: bool | None = None):
        if batch <= 0 or capacity <= 0:
            raise ValueError(f"cache batch and capacity must be positive, got {batch} and {capacity}")
        self.batch, self.capacity, self.snapshots = batch, capacity, snapshot
        self.ctx = CacheStore(cfg, batch, capacity, dtype, ctx_device, snapshot)
        if mirror is None:
            mirror = torch.device(den_device) != torch.device(ctx_device)
        self.den = CacheStore(cfg, batch, capacity, dtype, den_device, snapshot) if mirror else self.ctx
        self.lens_host = [0] * batch

    @property
    def lens(self) -> torch.Tensor:
        """Tokens per row, int32 on the context device."""
        return self.ctx.lens

    def rows(self, rows) -> Rows:
        return rows if isinstance(rows, Rows) else Rows(rows, self.batch)

    def reset(self, rows=None) -> None:
        """Forget rows: zero their Mamba states and lengths."""
        r = self.rows(rows)
        for store in {id(s): s for s in (self.ctx, self.den)}.values():
            store.reset(r)
        for b in r.host:
            self.lens_host[b] = 0

    def count_appended(self, rows, added) -> None:
        """Advance the host copy of the rows' lengths by `added` tokens (an int for every row, or one per row).
        The model advances the device lengths itself; the host keeps its own count so nothing reads them back."""
        r = self.rows(rows)
        for j, b in enumerate(r.host):
            self.lens_host[b] += added if isinstance(added, int) else added[j]

    def snapshot(self, rows=None, active: torch.Tensor | None = None) -> None:
        """Keep the rows' current Mamba states as the 'before the last token' states mock-AR reads (not for
        rows where `active`, a bool [n] device tensor, is False)."""
        if not self.snapshots:
            raise ValueError("this cache was created without snapshot=True: it keeps no previous Mamba states")
        r = self.rows(rows)
        for store in {id(s): s for s in (self.ctx, self.den)}.values():
            store.snapshot(r, active)

    def sync_mirror(self, rows: Rows, kv_lo: int, kv_hi: int) -> None:
        """Copy rows' KV positions [kv_lo, kv_hi), Mamba states and lengths to the denoiser's store."""
        if self.den is self.ctx:
            return
        src, dst = self.ctx, self.den
        for i in src.attention_layers():
            for s, d in ((src.k[i], dst.k[i]), (src.v[i], dst.v[i])):
                if rows.sl is not None:
                    d[rows.sl, kv_lo:kv_hi].copy_(s[rows.sl, kv_lo:kv_hi])
                else:
                    d[rows.index(d.device), kv_lo:kv_hi] = s[rows.index(s.device), kv_lo:kv_hi].to(d.device)
        for i in src.mamba_layers():
            rows.put(dst.conv[i], rows.take(src.conv[i]))
            rows.put(dst.ssm[i], rows.take(src.ssm[i]))
        rows.put(dst.lens, rows.take(src.lens))


    def move(self, src, dst) -> None:
        """Copy rows src[j] to rows dst[j] (distinct indices; a row may be both a source and a destination:
        every source is read before any destination is written). The decode core moves rows this way to keep
        each group of rows a contiguous slice (views, no per-pass copies, fixed addresses for CUDA graphs).
        Tensors keep their storage."""
        src, dst = [int(v) for v in src], [int(v) for v in dst]
        if len(src) != len(dst) or len(set(src)) != len(src) or len(set(dst)) != len(dst) \
                or not all(0 <= v < self.batch for v in src + dst):
            raise ValueError(f"move: src and dst must be equally long lists of distinct row indices < {self.batch}, "
                             f"got {src} and {dst}")
        if not src:
            return
        for store in {id(s): s for s in (self.ctx, self.den)}.values():
            si = torch.tensor(src, dtype=torch.long, device=store.device)
            di = torch.tensor(dst, dtype=torch.long, device=store.device)
            for group in (store.k, store.v, store.conv, store.ssm, store.prev_conv, store.prev_ssm, [store.lens]):
                for t in group:
                    if t is not None:
                        t.index_copy_(0, di, t.index_select(0, si))
        lens = [self.lens_host[v] for v in src]
        for d, n in zip(dst, lens):
            self.lens_host[d] = n
