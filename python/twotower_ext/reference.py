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
