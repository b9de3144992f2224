"""Quantised routed-expert weights: the storage formats, the quantisers and their exact dequantisation.

Routed experts are ~94% of the real model's bytes and decoding reads them once per pass, so storing them in
8 or 4 bits is both what fits the two towers on one 80 GB GPU and a direct speed-up. Two formats, both for a
stacked expert tensor w [E, N, K] (N output channels, K = the input dimension, contiguous):

- fp8:  data float8_e4m3fn [E, N, K]; scale float32 [E, N], one per output channel:
        scale = amax_k |w| / 448 (1 where the row is all zero), data = e4m3(w / scale) (round to nearest even).
- int4: symmetric round-to-nearest in groups of `group` (default 128, even) consecutive k (W4A16):
        scale [E, N, ceil(K / group)] in bf16 (or fp16) = amax over the group / 7 (1 where all zero);
        q = clamp(round_half_even(w / scale), -8, 7); data uint8 [E, N, ceil(K / 2)], element k in byte k // 2,
        even k in the low nibble, stored as q + 8. A K that is not a multiple of the group has a shorter last
        group (its own scale); an odd K pads the last byte's high nibble with q = 0.

Dequantisation (the kernels' contract, CPU and CUDA): w' = round_to_x_dtype(float32(q) * float32(scale)), i.e.
the product in fp32, rounded once to the activations' dtype (what a bf16 tensor-core GEMM consumes). A NaN
weight makes its row's (fp8) or group's (int4) scale NaN, so every output it feeds is NaN, never a plausible
number. Everything here is plain PyTorch (the reference the kernels are tested against).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hugepages

FORMATS = ("fp8", "int4")
CHOICES = ("bf16", *FORMATS)  # what `--experts` / the cost and memory tables take; bf16 = unquantised
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_MAX = 7     # symmetric range used by the quantiser: [-7, 7] (q = -8 is representable, never produced)
DEFAULT_GROUP = 128


@dataclass(frozen=True)
class QuantizedExperts:
    """One stacked routed-expert weight [E, N, K] in a quantised format (see the module docstring)."""
    fmt: str                 # "fp8" | "int4"
    data: torch.Tensor       # fp8: float8_e4m3fn [E, N, K]; int4: uint8 [E, N, ceil(K/2)]
    scale: torch.Tensor      # fp8: float32 [E, N]; int4: bf16/fp16 [E, N, ceil(K/group)]
    k: int                   # K, the logical input dimension
    group: int = 0           # int4 group size along K; 0 for fp8

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data.shape[0], self.data.shape[1], self.k)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device) -> "QuantizedExperts":
        return QuantizedExperts(self.fmt, self.data.to(device), self.scale.to(device), self.k, self.group)


def empty(fmt: str, shape, device="cpu", group: int = DEFAULT_GROUP,
          scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedExperts:
    """Uninitialised storage for a [E, N, K] expert stack (filled expert by expert with quantize_into)."""
    E, N, K = shape
    check_format(fmt, K, group, scale_dtype)
    if fmt == "fp8":
        return QuantizedExperts("fp8", hugepages.empty((E, N, K), torch.float8_e4m3fn, device),
                                torch.empty(E, N, dtype=torch.float32, device=device), K, 0)
    return QuantizedExperts("int4", hugepages.empty((E, N, (K + 1) // 2), torch.uint8, device),
                            torch.empty(E, N, -(-K // group), dtype=scale_dtype, device=device), K, group)


def check_format(fmt: str, k: int, group: int = DEFAULT_GROUP, scale_dtype: torch.dtype = torch.bfloat16) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"twotower: experts format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if k < 1:
        raise ValueError(f"twotower: the expert weight's input dimension must be >= 1, got {k}")
    if fmt == "int4":
        if group < 2 or group % 2:
            raise ValueError(f"twotower: int4 group size must be an even number >= 2, got {group}")
        if scale_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"twotower: int4 scale dtype must be bfloat16 or float16, got {scale_dtype}")


def quantize(w: torch.Tensor, fmt: str, group: int = DEFAULT_GROUP,
             scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedExperts:
    """Quantise a stacked expert weight w [E, N, K] (any float dtype) into `fmt`."""
    if w.dim() != 3 or not w.is_floating_point():
        raise ValueError(f"twotower: w must be a floating-point [experts, out, in] tensor, got {w.dtype} "
                         f"shape {tuple(w.shape)}")
    q = empty(fmt, w.shape, w.device, group, scale_dtype)
    quantize_into(q, slice(None), w)
    return q


def quantize_into(q: QuantizedExperts, e, w: torch.Tensor) -> None:
    """q[e] = quantised w (w [N, K] for an int e, [n, N, K] for a slice): the loader fills the stack one
    checkpoint tensor at a time, so peak memory stays near the quantised size."""
    w = w.float()
    d, s = q.data[e], q.scale[e]
    if q.fmt == "fp8":
        amax = w.abs().amax(dim=-1)
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)
        s.copy_(scale)
        d.copy_((w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
        return
    K, G = q.k, q.group
    ng = -(-K // G)
    pad = ng * G - K
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    wg = wp.reshape(*w.shape[:-1], ng, G)
    amax = wg.abs().amax(dim=-1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / INT4_MAX).to(q.scale.dtype)
    s.copy_(scale)
    qi = torch.round(wg / scale.float()[..., None]).clamp(-8, 7).reshape(*w.shape[:-1], ng * G)[..., :K]
    u = (qi + 8).to(torch.uint8)  # NaN -> implementation-defined bits; the NaN scale still poisons the group
    if K % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    d.copy_(u[..., 0::2] | (u[..., 1::2] << 4))


def unpack_int4(data: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(k/2)] -> int q in [-8, 7], [..., k] (int16)."""
    lo = (data & 0xF).to(torch.int16) - 8
    hi = (data >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :k]


def dequantize(q: QuantizedExperts, dtype: torch.dtype) -> torch.Tensor:
    """The stack as [E, N, K] in `dtype`: fp32(q) * fp32(scale), rounded once to dtype (the kernels' numerics)."""
    if q.fmt == "fp8":
        w = q.data.float() * q.scale.float()[..., None]
    else:
        qi = unpack_int4(q.data, q.k).float()
        s = q.scale.float().repeat_interleave(q.group, dim=-1)[..., :q.k]
        w = qi * s
    return w.to(dtype)


def expert_bytes(fmt: str | None, n: int, k: int, dtype_bytes: int = 2, group: int = DEFAULT_GROUP) -> int:
    """Exact bytes of one expert matrix [n, k] in `fmt` (None: unquantised, dtype_bytes per weight)."""
    if fmt is None:
        return n * k * dtype_bytes
    if fmt == "fp8":
        return n * k + n * 4
    return n * ((k + 1) // 2) + n * (-(-k // group)) * 2


def storage_format(choice: str) -> str | None:
    """The quantised format of an experts choice (CHOICES): None for "bf16" (unquantised, in the model dtype)."""
    if choice not in CHOICES:
        raise ValueError(f"experts must be one of {', '.join(CHOICES)}, got {choice!r}")
    return None if choice == "bf16" else choice


def expert_pair_bytes(choice: str, hidden: int, inter: int, dtype_bytes: float = 2) -> float:
    """Stored bytes of one routed expert, up [inter, hidden] + down [hidden, inter], for an experts choice."""
    fmt = storage_format(choice)
    return expert_bytes(fmt, inter, hidden, dtype_bytes) + expert_bytes(fmt, hidden, inter, dtype_bytes)
