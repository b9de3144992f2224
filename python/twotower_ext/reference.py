"""Plain PyTorch versions of every op: the test oracle and the fallback where no kernel exists.

Written for clarity, not speed. Each function has the same contract as the op of the same name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on int64 tensors holding uint32 counters and keys (ints or broadcastable tensors); returns
    the 4 output words."""
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


def unmask_row_error(S: int, gamma=None, step=None, steps_per_block=None, temperature=None, kept=None,
                     row: int | None = None) -> str | None:
    """The message for the first out-of-range value among one row's parameters (Python numbers; None: not
    checked), or None when they are valid: gamma in [0, 1], steps_per_block >= 1, step in [0, steps_per_block),
    temperature 0 or a positive finite float32 value, kept in [0, S]."""
    at = "" if row is None else f" at row {row}"
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        return f"twotower: gamma must be in [0, 1], got {gamma}{at}"
    if steps_per_block is not None and not 1 <= steps_per_block < 2**31:
        return f"twotower: steps_per_block must be >= 1 (and < 2^31), got {steps_per_block}{at}"
    if step is not None and (step < 0 or (steps_per_block is not None and step >= steps_per_block)):
        spb = "" if steps_per_block is None else f" = {steps_per_block}"
        return f"twotower: step must be in [0, steps_per_block{spb}), got {step}{at}"
    # a positive value at or below 2^-150 rounds to fp32 0, one above FLT_MAX to inf
    if temperature is not None and not (temperature == 0 or 2.0 ** -150 < temperature <= _FLT_MAX):
        return f"twotower: temperature must be 0 (greedy) or a positive finite float32 value, got {temperature}{at}"
    if kept is not None and not 0 <= kept <= S:
        return f"twotower: kept must be in [0, seq = {S}], got {kept}{at}"
    return None


def unmask_rows(v, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A per-row parameter (a Python number, or a [batch] or [1] tensor) as a [batch] tensor of dtype. A Python
    int for an int64 parameter (seed, block) counts by its low 64 bits (two's complement)."""
    if not isinstance(v, torch.Tensor):
        if dtype == torch.int64:
            v = (int(v) + 2**63) % 2**64 - 2**63
        return torch.full((batch,), v, dtype=dtype, device=device)
    return v.to(device=device, dtype=dtype).reshape(-1).expand(batch)


def _philox_key(seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Philox key words (lo, hi) of int64 seeds (their two's-complement bits)."""
    return seed & _U32, (seed >> 32) & _U32


def unmask_gumbel(seed, block, batch: int, seq: int, vocab: int, device="cpu") -> torch.Tensor:
    """The kernels' Gumbel noise g[b, s, v] (fp32): Philox-4x32-10 with key = seed[b] and counter
    (v // 4, s, block[b] lo, block[b] hi), word v % 4 -> u = (2 (w >> 9) + 1) / 2^24, g = -log(-log(u)).
    seed and block: Python ints (every row) or [batch] / [1] int tensors. The row's slot b is not in the key."""
    groups = (vocab + 3) // 4
    i64 = dict(dtype=torch.int64, device=device)
    seed = unmask_rows(seed, batch, torch.int64, device).view(batch, 1, 1)
    block = unmask_rows(block, batch, torch.int64, device).view(batch, 1, 1)
    shape = (batch, seq, groups)
    c0 = torch.arange(groups, **i64).view(1, 1, groups).expand(shape)
    c1 = torch.arange(seq, **i64).view(1, seq, 1).expand(shape)
    c2, c3 = _philox_key(block)
    c2, c3 = c2.expand(shape), c3.expand(shape)
    k0, k1 = _philox_key(seed)
    words = torch.stack(philox4x32_10(c0, c1, c2, c3, k0, k1), dim=-1).view(batch, seq, 4 * groups)
    u = (((words[..., :vocab] >> 9) << 1) | 1).to(torch.float32) * 2.0 ** -24
    return -unmask_log(-unmask_log(u))


def unmask_predict(logits, mask_id: int, temperature=0.0, seed=0, block=0):
    """Token and T=1 log-probability for every position of logits [B, S, V] (fp32/bf16), mask id excluded
    (mask_id -1: nothing excluded): pred = argmax(logits) (temperature[b] 0; ties: lowest id) or
    argmax(fp32(logits / T[b]) + g) with the Philox Gumbel noise g = `unmask_gumbel(seed, block, ...)`;
    logprob = log_softmax(logits)[pred] as NVIDIA's reference computes it (conf = exp(logprob)). temperature,
    seed, block: Python numbers (every row) or [B] / [1] tensors. Returns (pred int64 [B, S], logprob fp32 [B, S]).

    The mask logit is -inf rather than NVIDIA's -1e12 (identical probabilities unless every other logit is below
    -1e12 + 88); a position whose other logits are all -inf gets pred = the lowest non-mask id with logprob -inf;
    +inf logits count as the largest finite float. NVIDIA takes the argmax of log_softmax rather than of the
    logits: the two differ only for logits closer than one rounding of the subtraction of the log-sum-exp.
    """
    B, S, V = logits.shape
    l = logits.float()
    l = torch.where(l == float("inf"), torch.full_like(l, _FLT_MAX), l)   # a new tensor: logits stay as given
    if mask_id >= 0:
        l[..., mask_id] = float("-inf")
    pred = l.argmax(-1)
    temperature = unmask_rows(temperature, B, torch.float32, l.device)
    rows = (temperature > 0).nonzero().flatten()                          # the sampling rows
    if len(rows):
        seed, block = (unmask_rows(v, B, torch.int64, l.device)[rows] for v in (seed, block))
        score = l[rows] / temperature[rows].view(-1, 1, 1) + unmask_gumbel(seed, block, len(rows), S, V, l.device)
        pred[rows] = torch.where(score.amax(-1) > float("-inf"), score.argmax(-1), pred[rows])
    logprob = torch.log_softmax(l, dim=-1).gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    degenerate = l.amax(-1) == float("-inf")
    pred = torch.where(degenerate, torch.full_like(pred, 1 if mask_id == 0 else 0), pred)
    logprob = torch.where(degenerate, torch.full_like(logprob, float("-inf")), logprob)
    return pred, logprob


def threshold_unmask(logits, x, mask_id: int, gamma, step, steps_per_block, temperature=0.0, seed=0, block=0,
                     kept=None, out_counts=None, out_done=None, out_logprob=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask-diffusion commit step (docs/semantics.md), updating x [B, S] int64 in place.

    logits [B, S, V] fp32/bf16; mask_id in [-1, V). Per row b (Python numbers or [B] / [1] tensors): gamma,
    step, steps_per_block, temperature, seed, block, kept (default S). For each masked position (x == mask_id),
    (pred, logprob) = `unmask_predict`, conf = exp(logprob); then `unmask_commit`. Bad per-row values and NaN
    logits at masked positions raise ValueError. Returns (counts int32 [B], done bool [B]) of the kept positions;
    out_logprob [B, S] fp32, when given, receives logprob at the positions committed.
    """
    B, S, V = logits.shape
    if not -1 <= mask_id < V:
        raise ValueError(f"twotower: mask_id must be in [-1, vocab = {V}), got {mask_id}")
    dev = logits.device
    rows = [unmask_rows(v, B, torch.float64 if fp else torch.int64, dev).tolist()
            for v, fp in ((gamma, True), (step, False), (steps_per_block, False), (temperature, True))]
    kept_rows = [None] * B if kept is None else unmask_rows(kept, B, torch.int64, dev).tolist()
    for b, (g, st, spb, t) in enumerate(zip(*rows)):
        msg = unmask_row_error(S, g, st, spb, t, kept_rows[b], row=b)
        if msg:
            raise ValueError(msg)
    masked = x == mask_id
    if torch.isnan(logits[masked]).any():
        raise ValueError("twotower: logits must not contain NaN at masked positions")
    pred, logprob = unmask_predict(logits, mask_id, temperature, seed, block)
    return unmask_commit(x, pred, logprob.exp(), mask_id, gamma, step, steps_per_block, kept, out_counts, out_done,
                         logprob, out_logprob)


def unmask_commit(x, pred, conf, mask_id: int, gamma, step, steps_per_block, kept=None, out_counts=None,
                  out_done=None, logprob=None, out_logprob=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row commit rule of `threshold_unmask` given pred [B, S] and conf [B, S] (and the per-row
    parameters as numbers or [B] / [1] tensors); updates x in place, and out_logprob from logprob at the
    committed positions when given. Counts and done flags cover positions [0, kept[b]) only."""
    B, S = x.shape
    dev = x.device
    gamma = unmask_rows(gamma, B, torch.float32, dev).view(B, 1)
    step = unmask_rows(step, B, torch.int64, dev)
    steps_per_block = unmask_rows(steps_per_block, B, torch.int64, dev)
    kept = unmask_rows(S if kept is None else kept, B, torch.int64, dev)
    masked = x == mask_id
    n = masked.sum(1)
    left = steps_per_block - step
    k = (masked & (conf > gamma)).sum(1).clamp(min=1)
    k = torch.minimum(torch.maximum(k, (n + left - 1) // left), n)
    k = torch.where(step == steps_per_block - 1, n, k)              # the last step commits everything
    ranked = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices   # ties: lower position first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(S, device=dev).expand(B, S))
    commit = masked & (rank < k.unsqueeze(1))
    x.copy_(torch.where(commit, pred, x))
    if out_logprob is not None:
        out_logprob.copy_(torch.where(commit, logprob, out_logprob))
    in_kept = torch.arange(S, device=dev) < kept.unsqueeze(1)
    counts = (commit & in_kept).sum(1).to(torch.int32)
    done = ~(masked & ~commit & in_kept).any(1)
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
# moe_route


def moe_route(x, router, bias, k: int, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
              scaling: float = 1.0):
    """Router of NVIDIA's reference (csrc/moe_router/moe_router.h): logits in fp64, sigmoid scores, top-k by
    score + correction bias (n_group > 1: within the topk_group groups whose two best choices sum highest, the
    other groups' choices set to 0.0), torch.topk(sorted=False)'s selection and order, weights = the chosen raw
    scores (renormalised when norm_topk_prob), times scaling. NaN in x gives that token NaN weights.
    x [T, hidden] -> (expert ids [T, k] int64, weights [T, k] fp64). Differentiable (training's route)."""
    scores = F.linear(x.double(), router.double()).sigmoid()
    return moe_route_select(scores, bias, k, n_group, topk_group, norm_topk_prob, scaling)


def moe_route_select(scores, bias, k: int, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                     scaling: float = 1.0):
    """moe_route from the sigmoid scores [T, E] fp64 on: the selection and the weights. (The tie tests feed it
    scores computed one element at a time: torch's vectorised sigmoid rounds the tensor's last few elements through
    another exp than the rest, which can split an exact tie between equal logits.)"""
    choice = scores + bias.double()
    if n_group > 1:
        E = scores.shape[-1]
        per = choice.view(-1, n_group, E // n_group)
        group_scores = per.topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False)[1], 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // n_group, dim=1), 0.0)
    idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * scaling


# ----------------------------------------------------------------------------------------------------
# linear


def linear(x, w):
    """y = x @ W^T for a `packed.PackedLinear` w (csrc/linear/linear.h): the weight unpacked, products summed in fp32
    (fp64 for fp64 x: the tests' oracle route), y rounded once to x's dtype. x [..., K]; returns [..., N]."""
    from .packed import unpack
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc) @ unpack(w).to(device=x.device, dtype=acc).t()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# norms (NemotronH's RMSNorm with the denoiser's adaLN modulation; Mamba-2's gated norm)


def modulate(x, shift, scale):
    """adaLN modulation x * (1 + scale) + shift in x's dtype; shift / scale [groups, H] apply to x's rows
    grouped as x.view(groups, -1, H) (the denoiser: x [B, S, H], one (shift, scale) per block)."""
    v = x.reshape(shift.shape[0], -1, x.shape[-1])
    return (v * (1.0 + scale.unsqueeze(1)) + shift.unsqueeze(1)).view(x.shape)


def rms_norm(x, w, eps: float, shift=None, scale=None, modulate_first: bool = False):
    """NemotronHRMSNorm: normalise x in fp32, cast back to x's dtype, then times w (in the promoted dtype), with
    the denoiser's modulation (shift and scale, see `modulate`) before it (modulate_first) or after it."""
    if shift is not None and modulate_first:
        x = modulate(x, shift, scale)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = w * xf.to(x.dtype)
    return modulate(h, shift, scale) if shift is not None and not modulate_first else h


def add_rms_norm(x, add, gate, w, eps: float, shift=None, scale=None, modulate_first: bool = False):
    """A layer's input: the residual add s = x + gate * add (gate [groups, H] like `modulate`'s, or None:
    x + add; in the promoted dtype, the residual's), then `rms_norm` of s cast to w's dtype, with modulate_first
    modulating s before that cast (as NVIDIA's blocks do). Returns (normed, s)."""
    if gate is not None:
        add = (add.reshape(gate.shape[0], -1, add.shape[-1]) * gate.unsqueeze(1)).view(add.shape)
    s = x + add
    v = s
    if shift is not None and modulate_first:   # before the cast; after the norm, rms_norm modulates
        v, shift, scale = modulate(s, shift, scale), None, None
    return rms_norm(v.to(w.dtype), w, eps, shift, scale), s


def gated_rms_norm(y, z, w, group: int, eps: float):
    """Mamba-2's output norm: RMSNorm over groups of `group` channels of y * silu(z), in fp32, times w, rounded
    to y's dtype once."""
    g = y.float() * F.silu(z.float())
    shape = g.shape
    g = g.view(*shape[:-1], shape[-1] // group, group)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.view(shape) * w.float()).to(y.dtype)
