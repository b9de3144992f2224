"""Plain PyTorch versions of every op: the test oracle and the fallback where no kernel exists.

Written for clarity, not speed. Each function has the same contract as the op of the same name.
"""
from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------------
# merge_states


def merge_states(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partial attention states over disjoint key sets.

    o: [P, *rows, D] partial outputs; lse: [P, *rows] fp32 natural-log LSEs (-inf = empty part).
    Returns (out [*rows, D] in o's dtype, lse [*rows] fp32). Empty parts are ignored (their o is never
    used); a row with only empty parts gives out = 0 and lse = -inf.
    """
    lse = lse.float()
    m = lse.amax(dim=0)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    empty = torch.isneginf(lse)
    w = torch.where(empty, torch.zeros_like(lse), torch.exp(lse - m_safe))
    wsum = w.sum(dim=0)
    terms = torch.where(empty.unsqueeze(-1), torch.zeros((), dtype=torch.float32, device=o.device),
                        w.unsqueeze(-1) * o.float())
    out = terms.sum(dim=0) / torch.where(wsum > 0, wsum, torch.ones_like(wsum)).unsqueeze(-1)
    lse_out = torch.where(wsum > 0, m_safe + torch.log(torch.where(wsum > 0, wsum, torch.ones_like(wsum))),
                          torch.full_like(wsum, float("-inf")))
    return out.to(o.dtype), lse_out


# ----------------------------------------------------------------------------------------------------
# block_attention


def block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale=None):
    """Denoiser attention: the S block queries attend, with one softmax and no mask, over the first
    ctx_lens[b] context keys of their row followed by the S block keys (SPEC.md section 2.1). GQA:
    query head h uses KV head h // (Hq // Hkv).

    q [B,S,Hq,D]; k_blk, v_blk [B,S,Hkv,D]; k_ctx, v_ctx [B,Lmax,Hkv,D]; ctx_lens int [B].
    Returns (out [B,S,Hq,D] in q's dtype, lse [B,Hq,S] fp32, natural log). Computed in fp32.
    """
    B, S, Hq, D = q.shape
    group = Hq // k_blk.shape[2]
    scale = D ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(B):
        n = int(ctx_lens[b])
        k = torch.cat([k_ctx[b, :n], k_blk[b]], dim=0).float().repeat_interleave(group, dim=1)  # [n+S,Hq,D]
        v = torch.cat([v_ctx[b, :n], v_blk[b]], dim=0).float().repeat_interleave(group, dim=1)
        s = torch.einsum("shd,khd->hsk", q[b].float(), k) * scale                             # [Hq,S,n+S]
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        outs.append(torch.einsum("hsk,khd->shd", p, v))
        lses.append(lse)
    return torch.stack(outs).to(q.dtype), torch.stack(lses)
