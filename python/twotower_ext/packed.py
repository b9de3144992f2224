"""Dense linear weights packed once at load for the CPU linear op (`ops.linear`, csrc/linear/linear.h).

A weight W [N, K] (F.linear's: N outputs, K inputs) is stored as 16-output panels, P = ceil(N / 16):

- float32:  data [P, K, 16]            data[p, k, c]    = W[16 p + c, k]
- bfloat16: data [P, ceil(K/2), 16, 2] data[p, j, c, i] = W[16 p + c, 2 j + i]

zero where 16 p + c >= N or 2 j + i >= K. One panel row is one AVX-512 vector of 16 outputs, so the CPU kernel
broadcasts x[m, k] into whole output rows, and the bf16 k-pairs are what vdpbf16ps and AMX tiles read: one
layout serves every instruction set. The packing is a permutation (no rounding): `unpack(pack(w))` is `w`.
Everything here is plain PyTorch, the reference of the layout.

Only CPU tensors in float32 or bfloat16 are packed (`packable`); everything else (CUDA, fp16, training's
parameters) stays a plain tensor, on which `ops.linear` is F.linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hugepages

PANEL = 16
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedLinear:
    """One packed linear weight: `data` in the layout above for a logical [n, k] weight."""
    data: torch.Tensor
    n: int
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def packed_shape(n: int, k: int, dtype: torch.dtype) -> tuple[int, ...]:
    panels = -(-n // PANEL)
    return (panels, k, PANEL) if dtype == torch.float32 else (panels, -(-k // 2), PANEL, 2)


def packable(shape, dtype: torch.dtype, device) -> bool:
    """Whether a weight of this shape, dtype and device is packed at load (2-D, CPU, float32 / bfloat16)."""
    return len(shape) == 2 and torch.device(device).type == "cpu" and dtype in DTYPES


def empty(n: int, k: int, dtype: torch.dtype, device="cpu") -> PackedLinear:
    """Uninitialised storage for an [n, k] weight (filled panel by panel, padding included, by pack_rows_into)."""
    if dtype not in DTYPES:
        raise ValueError(f"twotower: packed linear weights are float32 or bfloat16, got {dtype}")
    if n < 1 or k < 0:
        raise ValueError(f"twotower: a packed linear weight needs n >= 1 and k >= 0, got [{n}, {k}]")
    return PackedLinear(hugepages.empty(packed_shape(n, k, dtype), dtype, device), n, k)


def pack_rows_into(p: PackedLinear, row0: int, rows: torch.Tensor) -> None:
    """Rows [row0, row0 + len(rows)) of the weight into p; row0 is a multiple of 16, and so is len(rows) unless they
    end the weight. rows [r, k] in any dtype is rounded to p's (the loader streams checkpoint rows through this)."""
    r = rows.shape[0]
    if row0 % PANEL or (r % PANEL and row0 + r != p.n) or row0 + r > p.n or tuple(rows.shape[1:]) != (p.k,):
        raise ValueError(f"twotower: pack_rows_into: rows [{row0}, {row0 + r}) of width {tuple(rows.shape[1:])} do "
                         f"not fit whole panels of a [{p.n}, {p.k}] weight")
    full, panel0 = r // PANEL * PANEL, row0 // PANEL
    _pack_panels(p, panel0, rows[:full])
    if full < r:                          # the weight's last, partial panel
        tail = torch.zeros(PANEL, p.k, dtype=p.dtype, device=p.device)
        tail[:r - full] = rows[full:]
        _pack_panels(p, panel0 + full // PANEL, tail)


def _pack_panels(p: PackedLinear, panel0: int, rows: torch.Tensor) -> None:
    """Whole panels: rows [16 c, k] into panels panel0 .. panel0 + c - 1."""
    c = rows.shape[0] // PANEL
    if c == 0:
        return
    w = rows.to(device=p.device, dtype=p.dtype).view(c, PANEL, p.k)
    if p.dtype == torch.float32:
        p.data[panel0:panel0 + c].copy_(w.transpose(1, 2))
        return
    if p.k % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    p.data[panel0:panel0 + c].copy_(w.view(c, PANEL, -1, 2).transpose(1, 2))


def pack(w: torch.Tensor) -> PackedLinear:
    """A 2-D float32 / bfloat16 weight [n, k] packed (on its device)."""
    if w.dim() != 2:
        raise ValueError(f"twotower: pack: w must be a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    p = empty(w.shape[0], w.shape[1], w.dtype, w.device)
    pack_rows_into(p, 0, w)
    return p


def unpack(p: PackedLinear) -> torch.Tensor:
    """The [n, k] weight (a new tensor)."""
    panels = p.data.shape[0]
    if p.dtype == torch.float32:
        w = p.data.transpose(1, 2).reshape(panels * PANEL, p.k)
    else:
        w = p.data.transpose(1, 2).reshape(panels * PANEL, -1)[:, :p.k]
    return w[:p.n].contiguous()
