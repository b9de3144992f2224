"""NemotronH layer math, written to round like NVIDIA's reference code (modeling_nemotron_h.py and
modeling_nemotron_twotower.py): Mamba-2 through the seeded block-scan op with the grouped z-gated RMSNorm,
relu^2 MLPs, the fp64 sigmoid router, adaLN-single time conditioning. The RMSNorms with the residual add and
the modulation around them are ops (ops.rms_norm, ops.add_rms_norm; their rounding in reference.py).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from .. import ops
from .config import NemotronHConfig
from .ssd import mamba_chunked_scan
from .weights import T_FREQ_DIM, MambaWeights, MLPWeights, MoEWeights, TimeWeights


def mlp(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    return ops.relu2_mlp(x, w.up, w.down)


def mamba_mixer(h: torch.Tensor, w: MambaWeights, cfg: NemotronHConfig, conv_state: torch.Tensor,
                ssm_state: torch.Tensor, seq_lens: torch.Tensor | None = None, write_state: bool = False,
                chunk_size: int | None = None):
    """Mamba-2 mixer over h [B, L, hidden] seeded from conv_state [B, K-1, conv_dim] and ssm_state
    [B, H, P, N] (fp32); with write_state the final states are written back into those tensors. The scan
    is the seeded op (token by token), or with chunk_size the chunked SSD form (ssd.py: batched matmuls,
    faster for long passes; equal up to fp32 rounding)."""
    z, xbc, dt = ops.linear(h, w.in_proj).split([cfg.d_inner, cfg.conv_dim, cfg.mamba_num_heads], dim=-1)
    lo, hi = cfg.time_step_limit
    outs = (conv_state, ssm_state) if write_state else (None, None)
    scan = ops.mamba_block_scan if chunk_size is None else partial(mamba_chunked_scan, chunk_size=chunk_size)
    y = scan(xbc, dt, conv_state, ssm_state, w.conv_w, w.conv_b, w.dt_bias, w.A_log, w.D, seq_lens, lo, hi, *outs)
    y = ops.gated_rms_norm(y, z, w.norm, cfg.d_inner // cfg.n_groups, cfg.layer_norm_epsilon)
    return ops.linear(y, w.out_proj)


# ----------------------------------------------------------------------------------------------------
# MoE


def route(x: torch.Tensor, w: MoEWeights, cfg: NemotronHConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of NVIDIA's reference: logits in fp64, sigmoid scores, top-k by score + correction bias
    (torch.topk ties), weights = chosen raw scores renormalised, times routed_scaling_factor.
    x [T, hidden] -> (expert ids [T, k] int64, weights [T, k] fp64). One `ops.moe_route` call (the fused CPU op;
    `reference.moe_route` on other devices and under autograd)."""
    return ops.moe_route(x, w.router, w.bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                         cfg.norm_topk_prob, cfg.routed_scaling_factor)


def moe(h: torch.Tensor, w: MoEWeights, cfg: NemotronHConfig, experts=None) -> torch.Tensor:
    """Routed experts + shared expert. One `ops.moe_experts` call on every device runs the routed experts (only the
    chosen experts are read, each token's k weighted outputs summed in fp64 on the CPU, as NVIDIA's reference
    accumulates; no host read, no data-dependent shapes: CUDA-graph capturable) and the shared expert (inside the op
    on the CPU). `experts` replaces the routed op (same signature): training passes `reference.moe_experts`, which
    autograd can differentiate (the op has no backward); the shared MLP then runs beside it."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    idx, weights = route(x, w, cfg)
    if experts is not None:
        return (experts(x, idx, weights, w.up, w.down) + mlp(x, w.shared)).view(shape)
    return ops.moe_experts(x, idx, weights, w.up, w.down, shared_up=w.shared.up, shared_down=w.shared.down).view(shape)


# ----------------------------------------------------------------------------------------------------
# adaLN-single time conditioning


def timestep_embedding(t: torch.Tensor, dim: int = T_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of t * exp(-ln(max_period) * k / (dim/2)), computed in fp32, returned in t's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def modulates_first(kind: str) -> bool:
    """Whether a denoiser layer of this kind applies its adaLN modulation before its RMSNorm (Mamba and attention
    layers, as NVIDIA's reference does) rather than after it (MoE and MLP layers)."""
    return kind in ("mamba", "attention")


def time_modulation(t: torch.Tensor, w: TimeWeights, dtype: torch.dtype) -> torch.Tensor:
    """t [B] (fraction of the block still masked) -> t_block(t_embedder(t)) viewed [B, 3, hidden]: the
    per-row (shift, scale, gate) offsets added to each layer's scale_shift_table. t is cast to the model
    dtype first and scaled by 1000 in it, like the reference."""
    t = t.to(dtype) * 1000
    e = F.linear(timestep_embedding(t), w.emb0_w, w.emb0_b)
    e = F.linear(F.silu(e), w.emb2_w, w.emb2_b)
    return F.linear(F.silu(e), w.block_w, w.block_b).view(t.shape[0], 3, -1)
