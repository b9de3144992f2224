"""fp64 oracles for every op, written from the definitions independently of python/twotower_ext/reference.py.

The tests check both the kernels and reference.py against these, so the reference is never the judge of its own
tolerance. Each one takes a different route from the reference: masked dense attention over the whole padded
cache with grouped (not repeated) heads; the merge as a softmax over parts; the Mamba recurrence per row, head
and token in Python; the commit rule per row over Python lists; the layers from their formulas in fp64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64


def _f64(t):
    return t.detach().to(device="cpu", dtype=F64)


# ----------------------------------------------------------------------------------------------------
# attention


def block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale=None, causal=False):
    """Softmax attention of the S block queries over keys [k_ctx[b, :ctx_lens[b]] | k_blk[b]] in fp64: every cache
    position is scored and the ones at or past ctx_lens[b] are masked out (-inf) before an explicit max-subtracted
    softmax; query head h reads KV head h // (Hq / Hkv) through a [Hkv, group] view. causal: block query j sees
    block keys 0..j. Returns (out [B,S,Hq,D] fp64, lse [B,Hq,S] fp64)."""
    q, k_blk, v_blk, k_ctx, v_ctx = (_f64(t) for t in (q, k_blk, v_blk, k_ctx, v_ctx))
    B, S, Hq, D = q.shape
    L, Hkv = k_ctx.shape[1], k_ctx.shape[2]
    g = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    keys = torch.cat([k_ctx, k_blk], 1)                                    # [B, L+S, Hkv, D]
    vals = torch.cat([v_ctx, v_blk], 1)
    qg = q.view(B, S, Hkv, g, D)
    s = torch.einsum("bsngd,bknd->bngsk", qg, keys) * scale                # [B, Hkv, g, S, L+S]
    pos = torch.arange(L + S)
    lens = ctx_lens.detach().cpu().long()
    valid = (pos[None, :] < lens[:, None]) | (pos[None, :] >= L)          # [B, L+S]
    valid = valid[:, None, :].expand(B, S, L + S)
    if causal:
        j = torch.arange(S)
        valid = valid & ~((pos[None, :] - L) > j[:, None])[None]
    s = s.masked_fill(~valid[:, None, None], -math.inf)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    out = torch.einsum("bngsk,bknd->bsngd", p / den, vals).reshape(B, S, Hq, D)
    lse = (m + torch.log(den)).squeeze(-1).reshape(B, Hq, S)
    return out, lse


def merge_states(o, lse):
    """P partial states over disjoint key sets merged in fp64: weights softmax(lse) over the parts (empty parts,
    lse = -inf, weigh 0), lse = logsumexp over the parts; a row with no live part gives out 0, lse -inf."""
    o, lse = _f64(o), _f64(lse)
    live = lse > -math.inf
    any_live = live.any(0)
    safe = torch.where(any_live, lse.amax(0), torch.zeros_like(lse[0]))
    w = torch.exp(lse - safe)                                              # exp(-inf) = 0 for empty parts
    tot = w.sum(0)
    wn = torch.where(any_live, w / torch.where(any_live, tot, torch.ones_like(tot)), torch.zeros_like(w))
    out = torch.einsum("p...,p...d->...d", wn, torch.where(live[..., None], o, torch.zeros_like(o)))
    return out, torch.where(any_live, safe + torch.log(tot), torch.full_like(tot, -math.inf))


# ----------------------------------------------------------------------------------------------------
# Mamba-2 seeded block scan


def mamba_block_scan(xBC, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, seq_lens=None,
                     dt_min=0.0, dt_max=math.inf):
    """The recurrence written out per row, head and token in fp64: depthwise causal conv over [conv_state | xBC]
    + bias, SiLU (rounded to the storage dtype, as the op stores it), dt = clamp(softplus(dt + dt_bias)),
    S = exp(dt A) S + dt x B^T, y = S C + D x. Returns (y [B,L,H*P] fp64, final SSM state fp64, final conv state
    in xBC's dtype: the last K-1 raw rows of [conv_state | xBC[:len]])."""
    B, L, C = xBC.shape
    H, P, N = ssm_state.shape[1:]
    K = conv_weight.shape[-1]
    G = (C - H * P) // (2 * N)
    cat = _f64(torch.cat([conv_state, xBC], 1))
    w, bias = _f64(conv_weight.reshape(C, K)), (_f64(conv_bias) if conv_bias is not None else torch.zeros(C, dtype=F64))
    y = torch.zeros(B, L, H, P, dtype=F64)
    S_all = _f64(ssm_state).clone()
    new_conv = torch.empty(B, K - 1, C, dtype=xBC.dtype)
    for b in range(B):
        n = L if seq_lens is None else int(seq_lens[b])
        acts = [F.silu((cat[b, t:t + K] * w.T).sum(0) + bias).to(xBC.dtype).double() for t in range(n)]
        for h in range(H):
            g = h // (H // G)
            S = S_all[b, h]
            A = -math.exp(float(A_log[h]))
            for t in range(n):
                act = acts[t]
                x = act[h * P:(h + 1) * P]
                Bv = act[H * P + g * N:H * P + (g + 1) * N]
                Cv = act[H * P + G * N + g * N:H * P + G * N + (g + 1) * N]
                d = min(max(math.log1p(math.exp(float(dt[b, t, h]) + float(dt_bias[h]))), dt_min), dt_max)
                S = math.exp(d * A) * S + d * torch.outer(x, Bv)
                y[b, t, h] = S @ Cv + float(D[h]) * x
            S_all[b, h] = S
        new_conv[b] = torch.cat([conv_state[b].cpu(), xBC[b].cpu()])[n:n + K - 1]
    return y.reshape(B, L, H * P), S_all, new_conv


# ----------------------------------------------------------------------------------------------------
# threshold_unmask's prediction and commit rule


def _masked_f64(logits, mask_id: int):
    """fp64 logits with +inf as the largest finite fp32 and the mask id at -inf (mask_id -1: nothing excluded)."""
    l = _f64(logits).clone()
    l[l == math.inf] = torch.finfo(torch.float32).max      # +inf counts as the largest finite float
    if mask_id >= 0:
        l[..., mask_id] = -math.inf
    return l


def predict(logits, mask_id: int):
    """Greedy (pred, conf) per position in fp64: the mask id excluded (-1: none), pred = the lowest id of the
    largest logit (+inf counting as the largest finite fp32), conf = softmax(logits)[pred]. A position with no
    finite logit besides the mask gives conf 0."""
    l = _masked_f64(logits, mask_id)
    pred = l.argmax(-1)                         # the first maximum: the lowest id
    m = l.amax(-1, keepdim=True)
    p = torch.exp(l - torch.where(m > -math.inf, m, torch.zeros_like(m)))
    conf = p.gather(-1, pred[..., None]).squeeze(-1) / p.sum(-1).clamp_min(1e-300)
    return pred, torch.where(m.squeeze(-1) > -math.inf, conf, torch.zeros_like(conf))


def log_prob(logits, pred, mask_id: int):
    """log softmax(logits)[pred] in fp64 (the mask id excluded; -1: none), as log(p[pred]) - log(sum p) with p
    the exps against the max; -inf where no logit besides the mask is finite."""
    l = _masked_f64(logits, mask_id)
    m = l.amax(-1, keepdim=True)
    shifted = l - torch.where(m > -math.inf, m, torch.zeros_like(m))
    lp = shifted.gather(-1, pred.cpu()[..., None]).squeeze(-1) - torch.log(torch.exp(shifted).sum(-1))
    return torch.where(m.squeeze(-1) > -math.inf, lp, torch.full_like(lp, -math.inf))


def commit_count(n_masked: int, n_above: int, step: int, steps_per_block: int) -> int:
    """How many masked positions a row commits: all of them on the last step, else at least one, at least
    ceil(n / steps left), every confidence strictly above gamma, never more than n."""
    if n_masked == 0:
        return 0
    if step == steps_per_block - 1:
        return n_masked
    floor = -(-n_masked // (steps_per_block - step))
    return min(n_masked, max(1, floor, n_above))


def per_row(v, rows: int) -> list:
    """A per-row parameter (a number, or a sequence / tensor of one value or of one per row) as a list of rows."""
    vals = v.tolist() if isinstance(v, torch.Tensor) else list(v) if isinstance(v, (list, tuple)) else [v]
    vals = [vals] if not isinstance(vals, list) else vals
    return vals * rows if len(vals) == 1 else vals


def commit_rule(conf, masked, gamma, step, steps_per_block) -> list[list[int]]:
    """Per row the positions committed (sorted): the commit_count most confident masked positions, confidence
    descending, equal confidences taken lowest position first. conf [B, S] (any float dtype), masked bool [B, S];
    gamma, step, steps_per_block: a number for every row or one per row. Gamma is compared in fp32, as the op
    takes it."""
    B = conf.shape[0]
    gammas = [float(torch.tensor(g, dtype=torch.float32)) for g in per_row(gamma, B)]
    out = []
    rows = zip(conf.tolist(), masked.tolist(), gammas, per_row(step, B), per_row(steps_per_block, B))
    for c_row, m_row, g, st, spb in rows:
        cand = [(c, s) for s, (c, m) in enumerate(zip(c_row, m_row)) if m]
        k = commit_count(len(cand), sum(1 for c, _ in cand if c > g), int(st), int(spb))
        cand.sort(key=lambda cs: (-cs[0], cs[1]))
        out.append(sorted(s for _, s in cand[:k]))
    return out


# ----------------------------------------------------------------------------------------------------
# layers


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * w, in fp64."""
    x = _f64(x)
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * _f64(w)


def rms_norm_bf16(x, w, eps):
    """NVIDIA's bf16 RMSNorm rounding: the normalised value rounded to fp32 then to bf16, times the bf16 weight
    (one rounding of the exact product). Also returns the positions where fp32 rounding of the normalisation
    could flip the bf16 rounding (within 2^-20 of a bf16 midpoint): only those may differ bit-wise."""
    x64 = _f64(x)
    xn = x64 / torch.sqrt((x64 * x64).sum(-1, keepdim=True) / x.shape[-1] + eps)
    lo, hi = (xn * (1 - 2 ** -20)).to(torch.bfloat16), (xn * (1 + 2 ** -20)).to(torch.bfloat16)
    nb = xn.float().to(torch.bfloat16)
    out = (nb.double() * _f64(w)).to(torch.bfloat16)
    return out, lo != hi


def route(x, router, bias, k: int, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
          scaling: float = 1.0):
    """NVIDIA's router in fp64: sigmoid(x . router) scores; selection by score + bias, restricted (n_group > 1)
    to the topk_group groups with the largest sum of their two best choices; torch.topk picks the k experts
    (its tie order is the reference's); weights = chosen raw scores / their sum, times the scaling factor.
    Returns (ids [T, k] ascending, weights [T, k] fp64 in that order)."""
    scores = 1.0 / (1.0 + torch.exp(-(_f64(x) @ _f64(router).T)))
    choice = scores + _f64(bias)
    if n_group > 1:
        T, E = choice.shape
        per = choice.view(T, n_group, E // n_group)
        top2 = per.sort(-1, descending=True).values[..., :2].sum(-1)
        groups = top2.topk(topk_group, -1, sorted=False).indices
        allowed = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, groups, True)
        choice = torch.where(allowed.repeat_interleave(E // n_group, 1), choice, torch.zeros_like(choice))
    ids = choice.topk(k, -1, sorted=False).indices.sort(-1).values
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * scaling


def linear(x, w):
    """y = x W^T in fp64 from the plain (unpacked) weight W [N, K], with the rigorous bound on an fp32-accumulated
    result rounded to `x`'s dtype: every product is exact in fp32 (the inputs have at most 24-bit significands),
    each of the <= K + 1 additions rounds by at most u = 2^-24 relative to the running sum, which is bounded by
    sum_k |x_k w_k| (so |error| <= (K + 1) u |x| |W|^T, inner products of absolute values), and the final
    rounding to bf16 adds at most 2^-8 |y| (its unit roundoff; none for fp32). Returns (y [.., N] fp64, bound [.., N] fp64)."""
    x64, w64 = _f64(x), _f64(w)
    K = x64.shape[-1]
    out_rel = 2.0 ** -8 if x.dtype == torch.bfloat16 else 0.0
    y = x64 @ w64.T
    return y, (K + 1) * 2.0 ** -24 * (x64.abs() @ w64.abs().T) * (1 + out_rel) + out_rel * y.abs()


def relu2_mlp(x, up, down):
    return torch.relu(x @ _f64(up).T).square() @ _f64(down).T


def moe(h, router, bias, up, down, shared_up, shared_down, k: int, **route_kw):
    """Token by token in fp64: the k routed experts' relu^2 MLPs weighted by the router, plus the shared expert."""
    x = _f64(h).reshape(-1, h.shape[-1])
    ids, w = route(x, router, bias, k, **route_kw)
    out = relu2_mlp(x, shared_up, shared_down)
    for t in range(x.shape[0]):
        for j in range(k):
            e = int(ids[t, j])
            out[t] += w[t, j] * relu2_mlp(x[t:t + 1], up[e], down[e])[0]
    return out.view(h.shape)


def time_modulation(t, emb0_w, emb0_b, emb2_w, emb2_b, block_w, block_b, dtype, freq_dim: int):
    """adaLN-single in fp64: s = 1000 t (t rounded to the model dtype first, as the reference does), the
    [cos, sin] embedding at frequencies 10000^(-i / (freq_dim/2)), then Linear, SiLU, Linear, SiLU, Linear."""
    s = _f64((_f64(t.to(dtype)) * 1000).to(dtype))          # one rounding of the exact product, in the model dtype
    half = freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=F64) / half)
    e = torch.cat([torch.cos(s[:, None] * freqs), torch.sin(s[:, None] * freqs)], -1)
    lin = lambda v, w, b: v @ _f64(w).T + _f64(b)  # noqa: E731
    e = lin(e, emb0_w, emb0_b)
    e = lin(F.silu(e), emb2_w, emb2_b)
    return lin(F.silu(e), block_w, block_b).view(t.shape[0], 3, -1)


def add_rms_norm(x, add, gate, w, eps, shift=None, scale=None, modulate_first=False):
    """The layer input in fp64: s = x + gate * add (gate and shift / scale [groups, H] per group of x's rows),
    the modulation s (1 + scale) + shift before or after RMSNorm(.) * w. Returns (normed, s)."""
    H = x.shape[-1]
    grouped = lambda t: _f64(t).reshape(-1, 1, H)  # noqa: E731  [groups, 1, H]
    s = _f64(x).reshape(-1, H)
    if add is not None:
        a = _f64(add).reshape(-1, H)
        if gate is not None:
            a = (a.reshape(gate.shape[0], -1, H) * grouped(gate)).reshape(-1, H)
        s = s + a
    mod = lambda v: (v.reshape(shift.shape[0], -1, H) * (1 + grouped(scale)) + grouped(shift)).reshape(-1, H)  # noqa: E731
    v = mod(s) if shift is not None and modulate_first else s
    h = v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps) * _f64(w)
    if shift is not None and not modulate_first:
        h = mod(h)
    return h.reshape(x.shape), s.reshape(x.shape)


def gated_rms_norm(y, z, w, group: int, eps):
    """Mamba-2's gated norm in fp64: g = y z sigmoid(z), RMSNorm over groups of `group` channels, times w."""
    z64 = _f64(z)
    g = _f64(y) * z64 / (1 + torch.exp(-z64))
    gg = g.reshape(*g.shape[:-1], -1, group)
    return (gg / torch.sqrt((gg * gg).mean(-1, keepdim=True) + eps)).reshape(g.shape) * _f64(w)
