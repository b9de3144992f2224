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


def block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale=None, causal=False):
    """Denoiser attention: the S block queries attend, with one softmax and no mask, over the first
    ctx_lens[b] context keys of their row followed by the S block keys (docs/semantics.md). GQA:
    query head h uses KV head h // (Hq // Hkv). causal=True: block query j sees the context and block keys
    0..j only (the context tower's extension by S tokens; S = 1 is an AR step).

    q [B,S,Hq,D]; k_blk, v_blk [B,S,Hkv,D]; k_ctx, v_ctx [B,Lmax,Hkv,D]; ctx_lens int [B].
    Returns (out [B,S,Hq,D] in q's dtype, lse [B,Hq,S] fp32, natural log). Computed in fp32 (in fp64 for
    fp64 inputs, which makes it the tests' fp64 oracle).
    """
    B, S, Hq, D = q.shape
    group = Hq // k_blk.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for b in range(B):
        n = int(ctx_lens[b])
        k = torch.cat([k_ctx[b, :n], k_blk[b]], dim=0).to(acc).repeat_interleave(group, dim=1)  # [n+S,Hq,D]
        v = torch.cat([v_ctx[b, :n], v_blk[b]], dim=0).to(acc).repeat_interleave(group, dim=1)
        s = torch.einsum("shd,khd->hsk", q[b].to(acc), k) * scale                             # [Hq,S,n+S]
        if causal:   # block key j' is key n + j' of the row: query j sees it iff j' <= j
            later = torch.arange(S, device=q.device)[None, :] > torch.arange(S, device=q.device)[:, None]
            s = s.masked_fill(torch.cat([torch.zeros(S, n, dtype=torch.bool, device=q.device), later], 1), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        outs.append(torch.einsum("hsk,khd->shd", p, v))
        lses.append(lse)
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


# ----------------------------------------------------------------------------------------------------
# mamba_block_scan


def mamba_block_scan(xBC, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, seq_lens=None,
                     dt_min=0.0, dt_max=float("inf"), conv_state_out=None, ssm_state_out=None):
    """Seeded Mamba-2 block scan (docs/semantics.md), token by token in fp32.

    xBC [B,L,C] raw (pre-conv) in_proj slice, C = H*P + 2*G*N laid out [x | B | C]; dt [B,L,H] raw;
    conv_state [B,K-1,C] the last K-1 raw xBC rows before the block; ssm_state [B,H,P,N] fp32;
    conv_weight [C,K] (or [C,1,K]), conv_bias [C] or None; dt_bias, A_log, D [H] fp32; seq_lens [B] int or
    None (row b scans its first seq_lens[b] tokens; y is 0 after them). The activated conv output is
    rounded to xBC's dtype before the scan, like the reference conv kernels. Returns y [B,L,H*P] in xBC's
    dtype; the final conv state (last K-1 raw rows of [conv_state | xBC[:len]]) and SSM state are written
    to conv_state_out / ssm_state_out when given (they may be the input tensors).
    """
    B, L, C = xBC.shape
    H, P, N = ssm_state.shape[1:]
    G = (C - H * P) // (2 * N)
    raw = torch.cat([conv_state, xBC], dim=1)                                  # [B, K-1+L, C]
    x, Bm, Cm, dt, A = mamba_scan_inputs(raw, dt, conv_weight, conv_bias, dt_bias, A_log, H, P, N, dt_min, dt_max)
    lens = (torch.full((B,), L, dtype=torch.long, device=xBC.device) if seq_lens is None
            else seq_lens.long().clamp(0, L))
    Bm = Bm.repeat_interleave(H // G, dim=2)                                   # [B, L, H, N]
    Cm = Cm.repeat_interleave(H // G, dim=2)
    S = ssm_state.float().clone()
    ys = []
    for t in range(L):
        live = (t < lens).view(B, 1, 1, 1)
        dA = torch.exp(dt[:, t] * A)                                            # [B, H]
        dBx = (dt[:, t, :, None] * Bm[:, t])[:, :, None, :] * x[:, t, :, :, None]   # [B, H, P, N]
        S = torch.where(live, S * dA[..., None, None] + dBx, S)
        y = (S * Cm[:, t, :, None, :]).sum(-1) + D.float()[:, None] * x[:, t]   # [B, H, P]
        ys.append(torch.where(live[..., 0], y, torch.zeros_like(y)))
    y = (torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, H, P)).reshape(B, L, H * P).to(xBC.dtype)
    if conv_state_out is not None:
        conv_state_out.copy_(mamba_final_conv_state(conv_state, xBC, lens))
    if ssm_state_out is not None:
        ssm_state_out.copy_(S)
    return y


def mamba_scan_inputs(raw, dt, conv_weight, conv_bias, dt_bias, A_log, H, P, N, dt_min=0.0, dt_max=float("inf")):
    """The scan's work before the recurrence, shared by the token loop above and the chunked (SSD) prefill
    (models/ssd.py). raw = [conv_state | xBC] [B,K-1+L,C]: depthwise conv + bias, SiLU, rounded to raw's
    dtype, split into x [B,L,H,P] and B, C [B,L,G,N] (fp32); dt = clamp(softplus(dt + dt_bias), dt_min,
    dt_max) [B,L,H] and A = -exp(A_log) [H] in fp32. The conv accumulates in place into its output."""
    C, K = raw.shape[2], conv_weight.shape[-1]
    B, L = raw.shape[0], raw.shape[1] - (K - 1)
    G = (C - H * P) // (2 * N)
    w = conv_weight.reshape(C, K).float().t().contiguous()                     # [K, C]: each tap a dense row
    cat = raw.float()
    conv = cat[:, :L] * w[0]
    for k in range(1, K):
        conv.addcmul_(cat[:, k:k + L], w[k])
    if conv_bias is not None:
        conv += conv_bias.float()
    act = torch.nn.functional.silu(conv, inplace=True).to(raw.dtype).float()
    x, Bm, Cm = act.split([H * P, G * N, G * N], dim=-1)
    dt = torch.nn.functional.softplus(dt.float() + dt_bias.float()).clamp(dt_min, dt_max)   # [B, L, H]
    return x.reshape(B, L, H, P), Bm.reshape(B, L, G, N), Cm.reshape(B, L, G, N), dt, -torch.exp(A_log.float())


def mamba_final_conv_state(conv_state, xBC, lens):
    """The conv state after each row's lens[b] tokens: the last K-1 rows of [conv_state | xBC[b, :lens[b]]],
    gathered from the two parts (no concatenation of the whole block)."""
    B, hist, C = conv_state.shape
    L = xBC.shape[1]
    pos = lens.view(B, 1) + torch.arange(hist, device=xBC.device)               # [B, K-1] in [conv_state | xBC]
    from_state = torch.gather(conv_state, 1, pos.clamp(max=hist - 1)[..., None].expand(B, hist, C))
    if L == 0:
        return from_state
    from_x = torch.gather(xBC, 1, (pos - hist).clamp(0, L - 1)[..., None].expand(B, hist, C))
    return torch.where((pos < hist)[..., None], from_state, from_x)


# ----------------------------------------------------------------------------------------------------
# threshold_unmask

_PHILOX_M0, _PHILOX_M1, _PHILOX_W0, _PHILOX_W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF
# Cephes logf polynomial (highest degree first), exactly as csrc/threshold_unmask/threshold_unmask.h uses it.
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_FLT_MAX = 3.4028234663852886e38


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b (a a uint32 constant, b uint32 values held in int64) without
    overflowing int64: b is split into 16-bit halves."""
    p_lo = a * (b & 0xFFFF)
    t = a * (b >> 16) + (p_lo >> 16)              # a * b = t * 2^16 + (p_lo & 0xffff)
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 on int64 tensors holding uint32 counters (broadcastable); returns the 4 output words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


def _f32(v: float, device) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=device)


def unmask_log(x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 log (Cephes logf) for positive normal x, every multiply and add rounded on its own."""
    dev = x.device
    bits = x.view(torch.int32)
    m = ((bits & 0x7FFFFF) | 0x3F000000).view(torch.float32)              # x = m * 2^e, m in [0.5, 1)
    low = m < _f32(0.707106781186547524, dev)
    e = ((bits >> 23) - 126 - low.to(torch.int32)).to(torch.float32)
    m = torch.where(low, (m + m) - 1.0, m - 1.0)
    z = m * m
    y = torch.full_like(m, _LOG_POLY[0])
    for c in _LOG_POLY[1:]:
        y = y * m + _f32(c, dev)
    y = (y * m) * z
    y = y + e * _f32(-2.12194440e-4, dev)
    y = y - 0.5 * z
    return (m + y) + e * _f32(0.693359375, dev)


def unmask_gumbel(seed: int, offset: int, batch: int, seq: int, vocab: int, device="cpu") -> torch.Tensor:
    """The kernels' Gumbel noise g[b, s, v] (fp32): Philox-4x32-10 with key = seed and counter
    (v // 4, s | b << 6, offset lo, offset hi), word v % 4 -> u = (2 (w >> 9) + 1) / 2^24, g = -log(-log(u))."""
    seed, offset = seed & ((1 << 64) - 1), offset & ((1 << 64) - 1)
    groups = (vocab + 3) // 4
    i64 = dict(dtype=torch.int64, device=device)
    c0 = torch.arange(groups, **i64).view(1, 1, groups)
    c1 = (torch.arange(seq, **i64).view(1, seq, 1) | (torch.arange(batch, **i64).view(batch, 1, 1) << 6)) & _U32
    shape = (batch, seq, groups)
    c0, c1 = c0.expand(shape), c1.expand(shape)
    c2 = torch.full(shape, offset & _U32, **i64)
    c3 = torch.full(shape, offset >> 32, **i64)
    words = torch.stack(philox4x32_10(c0, c1, c2, c3, seed & _U32, seed >> 32), dim=-1).view(batch, seq, 4 * groups)
    u = (((words[..., :vocab] >> 9) << 1) | 1).to(torch.float32) * 2.0 ** -24
    return -unmask_log(-unmask_log(u))


def unmask_predict(logits, mask_id: int, temperature: float = 0.0, seed: int = 0, offset: int = 0):
    """Token and T=1 confidence for every position of logits [B, S, V] (fp32/bf16), mask id excluded:
    pred = argmax(logits) (temperature 0; ties: lowest id) or argmax(fp32(logits / T) + g) with the Philox
    Gumbel noise g = `unmask_gumbel(seed, offset, ...)`; conf = exp(log_softmax(logits)[pred]) as NVIDIA's
    reference computes it. Returns (pred int64 [B, S], conf fp32 [B, S]).

    The mask logit is -inf rather than NVIDIA's -1e12 (identical probabilities unless every other logit is below
    -1e12 + 88); a position whose other logits are all -inf gets pred = the lowest non-mask id with conf 0;
    +inf logits count as the largest finite float. NVIDIA takes the argmax of log_softmax rather than of the
    logits: the two differ only for logits closer than one rounding of the subtraction of the log-sum-exp.
    """
    B, S, V = logits.shape
    l = logits.float()
    l = torch.where(l == float("inf"), torch.full_like(l, _FLT_MAX), l)   # a new tensor: logits stay as given
    l[..., mask_id] = float("-inf")
    pred = l.argmax(-1)
    if temperature > 0:
        score = l / torch.full_like(l, temperature) + unmask_gumbel(seed, offset, B, S, V, l.device)
        pred = torch.where(score.amax(-1) > float("-inf"), score.argmax(-1), pred)
    conf = torch.log_softmax(l, dim=-1).gather(-1, pred.unsqueeze(-1)).squeeze(-1).exp()
    degenerate = l.amax(-1) == float("-inf")
    pred = torch.where(degenerate, torch.full_like(pred, 1 if mask_id == 0 else 0), pred)
    conf = torch.where(degenerate, torch.zeros_like(conf), conf)
    return pred, conf


def threshold_unmask(logits, x, mask_id: int, gamma: float, step, steps_per_block: int, temperature: float = 0.0,
                     seed=0, offset=0, out_counts=None, out_done=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask-diffusion commit step (docs/semantics.md), updating x [B, S] int64 in place.

    logits [B, S, V] fp32/bf16. For each masked position (x == mask_id), (pred, conf) = `unmask_predict`.
    Per row: n masked; k = n on the last step, else min(n, max(1, #(conf > gamma), ceil(n / (steps_per_block -
    step)))); the k most confident masked positions (ties: lower position first) take pred; rows with nothing
    masked are untouched. NaN logits at masked positions raise. Returns (counts int32 [B], done bool [B]).
    """
    B, S, V = logits.shape
    step, seed, offset = int(step), int(seed), int(offset)
    if not 0 <= step < steps_per_block:
        raise ValueError(f"twotower: step must be in [0, steps_per_block = {steps_per_block}), got {step}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"twotower: gamma must be in [0, 1], got {gamma}")
    masked = x == mask_id
    if torch.isnan(logits[masked]).any():
        raise ValueError("twotower: logits must not contain NaN at masked positions")
    pred, conf = unmask_predict(logits, mask_id, temperature, seed, offset)
    return unmask_commit(x, pred, conf, mask_id, gamma, step, steps_per_block, out_counts, out_done)


def unmask_commit(x, pred, conf, mask_id: int, gamma: float, step: int, steps_per_block: int, out_counts=None,
                  out_done=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row commit rule of `threshold_unmask` given pred [B, S] and conf [B, S]; updates x in place."""
    B, S = x.shape
    masked = x == mask_id
    n = masked.sum(1)
    if step == steps_per_block - 1:
        k = n
    else:
        left = steps_per_block - step
        k = (masked & (conf > gamma)).sum(1).clamp(min=1)
        k = torch.minimum(torch.maximum(k, (n + left - 1) // left), n)
    ranked = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices   # ties: lower position first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=x.device).expand(B, S))
    commit = masked & (rank < k.unsqueeze(1))
    x.copy_(torch.where(commit, pred, x))
    counts = commit.sum(1).to(torch.int32)
    done = n == counts
    if out_counts is not None:
        counts = out_counts.copy_(counts)
    if out_done is not None:
        done = out_done.copy_(done)
    return counts, done


# ----------------------------------------------------------------------------------------------------
# moe_experts


def moe_experts(x, expert_ids, expert_weights, w_up, w_down, out=None):
    """Routed MoE experts (csrc/moe/moe.h): y[t] = sum_j expert_weights[t, j] * w_down[e] @ h(e, t) with
    e = expert_ids[t, j] and h(e, t) = relu(w_up[e] @ x[t])^2 rounded to x's dtype.

    x [T, H]; expert_ids [T, k] int in [0, E); expert_weights [T, k] fp32/fp64; w_up [E, I, H], w_down [E, H, I]
    in x's dtype, or both `quant.QuantizedExperts` (fp8 / int4), dequantised to x's dtype first (the kernels'
    numerics, see quant.py). GEMMs in fp32 (fp64 for fp64 inputs, which makes it the tests' oracle); each token's k
    weighted outputs summed in fp64; y in x's dtype (written into `out` when given). One plain matmul pair per
    expert that some token chose (reads the chosen ids on the host).
    """
    from .quant import QuantizedExperts, dequantize
    if isinstance(w_up, QuantizedExperts) or isinstance(w_down, QuantizedExperts):
        if not (isinstance(w_up, QuantizedExperts) and isinstance(w_down, QuantizedExperts)):
            raise TypeError("twotower: w_up and w_down must both be quantised (QuantizedExperts) or both tensors")
        w_up, w_down = dequantize(w_up, x.dtype), dequantize(w_down, x.dtype)
    acc = torch.promote_types(x.dtype, torch.float32)
    T, k = expert_ids.shape
    y = torch.zeros(T, x.shape[1], dtype=torch.float64, device=x.device)
    flat = expert_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= w_up.shape[0]):
        raise ValueError(f"twotower: expert_ids must be in [0, {w_up.shape[0]}) (w_up's experts)")
    tok = torch.arange(T, device=x.device).repeat_interleave(k)
    wts = expert_weights.reshape(-1).double()
    for e in torch.unique(flat).tolist():
        sel = flat == e
        h = torch.square(torch.relu(x[tok[sel]].to(acc) @ w_up[e].to(acc).t())).to(x.dtype).to(acc)
        o = h @ w_down[e].to(acc).t()
        y.index_add_(0, tok[sel], o.double() * wts[sel, None])
    y = y.to(acc).to(x.dtype)
    return y if out is None else out.copy_(y)


# ----------------------------------------------------------------------------------------------------
# linear


def linear(x, w):
    """y = x @ W^T for a `packed.PackedLinear` w (csrc/linear/linear.h): the weight unpacked, products summed in fp32
    (fp64 for fp64 x: the tests' oracle route), y rounded once to x's dtype. x [..., K]; returns [..., N]."""
    from .packed import unpack
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc) @ unpack(w).to(device=x.device, dtype=acc).t()).to(x.dtype)
