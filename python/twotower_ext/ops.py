"""Public op wrappers over `torch.ops.twotower`, their fake (meta) implementations for torch.compile and
CUDA-graph capture, and the fallback to `reference` on devices the build has no kernel for."""
from __future__ import annotations

import torch

from . import reference

OP_NAMES = ["merge_states"]


def kernel_devices(name: str) -> list[str]:
    """Dispatch keys ("CPU", "CUDA") that have a compiled kernel for op `twotower::name`."""
    qual = f"twotower::{name}"
    return [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qual, k)]


def _has_kernel(name: str, device: torch.device) -> bool:
    return device.type.upper() in kernel_devices(name)


# ----------------------------------------------------------------------------------------------------
# merge_states


@torch.library.register_fake("twotower::merge_states")
def _merge_states_fake(o, lse):
    torch._check(o.dim() >= 2, lambda: "o must be [parts, ..., head_dim]")
    rows = o.shape[1:-1]
    return o.new_empty((*rows, o.shape[-1])), lse.new_empty(rows)


def merge_states(o, lse) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention states over disjoint key sets (see `reference.merge_states`).

    o: [P, *rows, D] (fp32/bf16/fp16, last dim contiguous) or a sequence of P tensors [*rows, D];
    lse: [P, *rows] fp32 or a sequence of P tensors [*rows]. Returns (out [*rows, D], lse [*rows]).
    """
    if isinstance(o, (list, tuple)):
        o = torch.stack(list(o))
    if isinstance(lse, (list, tuple)):
        lse = torch.stack(list(lse))
    if not _has_kernel("merge_states", o.device):
        return reference.merge_states(o, lse)
    return torch.ops.twotower.merge_states(o, lse)


# ----------------------------------------------------------------------------------------------------
# block_attention (kernels: see issue 8; until registered, the reference runs)


def block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale=None):
    """Denoiser attention over [context KV cache | block KV] (see `reference.block_attention`)."""
    if not hasattr(torch.ops.twotower, "block_attention") or not _has_kernel("block_attention", q.device):
        return reference.block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale)
    return torch.ops.twotower.block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale)
