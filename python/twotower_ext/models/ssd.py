"""Chunked Mamba-2 (SSD) scan for long prompts: the recurrence of the seeded scan op written as batched
matmuls, which CPU BLAS and GPU GEMMs run far faster than a token-by-token loop once a pass is long.

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t (outer) B_t        S: [P, N] per head, seeded from init_state
    y_t = S_t . C_t + D x_t

is split into chunks of Q tokens. With a_i the inclusive cumulative sum of dt A inside a chunk:
  - intra-chunk (quadratic form): y_i += sum_{j <= i} (C_i . B_j) exp(a_i - a_j) dt_j x_j
  - the chunk's own state at its end: sum_j exp(a_Q - a_j) dt_j x_j (outer) B_j
  - inter-chunk recurrence: S_end = exp(a_Q) S_start + own state, a short loop over chunks
  - state to output: y_i += exp(a_i) C_i . S_start
Decays and states are fp32 (inputs may be bf16). The segment sums a_i - a_j are formed in fp64 and then
rounded, so a decay is as accurate as the step-by-step product however long the chunk (in fp32 the
difference of two large cumulative sums would lose ~|a| ulps). Heads share B and C by group (G groups,
H/G heads each); the group's C.B scores are computed once and the R heads of a group are folded into the
matmuls' column dimension where they share an operand.

`mamba_chunked_scan` is a drop-in for `ops.mamba_block_scan` (same arguments and results) that does the
conv / dt work through the reference's shared helpers and the recurrence here; on CUDA the context tower uses
it for passes of at least `TwoTowerModel.prefill_chunked_min_len` tokens (towers.prefill_chunked_min_len).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import reference

# Cap on the elements of one pass's [rows, chunks, H, Q, Q] decay tensor, per device type: longer sequences
# are scanned in several passes of whole chunks (state carried), so memory stays bounded for any prompt
# length. On CPU small passes keep every temporary in cache and reuse the allocator's blocks (fresh large
# allocations cost page faults that outweigh the arithmetic); a GPU wants big passes (few launches).
PASS_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


# Log-decays are floored here before exp: exp(-80) ~ 2e-35 is as good as 0 next to any fp32 sum, and the
# floor keeps every decay a normal float (exp into the denormal range, and arithmetic on denormals, runs
# an order of magnitude slower on CPUs).
EXP_FLOOR = -80.0


def pass_tokens(b: int, H: int, Q: int, device) -> int:
    """Tokens per pass (a multiple of the chunk length Q) for b rows of H heads."""
    cap = PASS_ELEMENTS.get(torch.device(device).type, PASS_ELEMENTS["cuda"])
    return Q * max(1, cap // (b * H * Q * Q))


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """exp of an fp64 log-decay (<= 0) as fp32, floored at exp(EXP_FLOOR)."""
    return log_decay.clamp_min(EXP_FLOOR).exp().float()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"ssd_chunked_scan: {msg}")


def ssd_chunked_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor | None, init_state: torch.Tensor | None, chunk_size: int,
                     seq_lens: torch.Tensor | None = None, return_chunk_states: bool = False,
                     out: torch.Tensor | None = None):
    """The Mamba-2 recurrence over x [b, L, H, P] in chunked (SSD) form.

    dt [b, L, H]: the step (after softplus and clamping); A [H] (negative); B, C [b, L, G, N] with H % G == 0
    (head h reads group h // (H / G)); D [H] or None (skip term D x); init_state [b, H, P, N] or None (zeros);
    seq_lens [b] or None: row b scans only its first seq_lens[b] tokens (later steps get dt = 0, i.e. they
    are identity steps, and their y is 0). Returns (y [b, L, H, P] fp32, final_state [b, H, P, N] fp32: the
    state after each row's own length); with return_chunk_states also [b, ceil(L/Q), H, P, N], the state
    before every chunk. out: a [b, L, H, P] tensor of any float dtype to write y to (then returned as y).
    Differentiable when out is None (the training model's Mamba layers run through it); without autograd
    the big temporaries are written in place."""
    _check(x.dim() == 4, f"x must be [b, L, H, P], got shape {tuple(x.shape)}")
    b, L, H, P = x.shape
    _check(dt.shape == (b, L, H), f"dt must have shape {(b, L, H)}, got {tuple(dt.shape)}")
    _check(A.shape == (H,), f"A must have shape {(H,)}, got {tuple(A.shape)}")
    _check(B.dim() == 4 and B.shape[:2] == (b, L), f"B must be [{b}, {L}, G, N], got shape {tuple(B.shape)}")
    G, N = B.shape[2:]
    _check(G >= 1 and H % G == 0, f"B's group count {G} must divide the {H} heads")
    _check(C.shape == B.shape, f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    _check(D is None or D.shape == (H,),
           f"D must have shape {(H,)} or be None, got {None if D is None else tuple(D.shape)}")
    _check(init_state is None or init_state.shape == (b, H, P, N),
           f"init_state must have shape {(b, H, P, N)} or be None, got "
           f"{None if init_state is None else tuple(init_state.shape)}")
    _check(isinstance(chunk_size, int) and chunk_size >= 1, f"chunk_size must be a positive int, got {chunk_size!r}")
    _check(seq_lens is None or seq_lens.shape == (b,), f"seq_lens must have shape {(b,)} or be None")
    _check(out is None or out.shape == x.shape, f"out must have x's shape {tuple(x.shape)} or be None")

    inplace = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                   for t in (x, dt, A, B, C, D, init_state)))
    dt = dt.float()
    live = None
    if seq_lens is not None:
        live = torch.arange(L, device=x.device)[None] < seq_lens.to(x.device).long()[:, None]    # [b, L]
        dt = dt * live[..., None]
    dA = dt * A.float()                                                           # [b, L, H], as the op forms it
    state = (x.new_zeros(b, H, P, N, dtype=torch.float32) if init_state is None else init_state.float())
    R = H // G
    state = state.reshape(b, G, R, P, N).permute(0, 1, 4, 2, 3)                # [b, G, N, R, P]: see _pass

    Q = max(1, min(chunk_size, L))
    per_pass = pass_tokens(b, H, Q, x.device)
    ys, starts = [], []
    for s in range(0, L, per_pass):
        e = min(L, s + per_pass)
        y, state, st = _pass(x[:, s:e].float(), dt[:, s:e], dA[:, s:e], B[:, s:e].float(), C[:, s:e].float(),
                             state, Q, inplace)
        ys.append(y)
        starts.append(st)
    y = ys[0] if len(ys) == 1 else torch.cat(ys, 1) if ys else x.new_zeros(b, 0, H, P, dtype=torch.float32)
    if D is not None:  # the skip term, fused with the store into `out`
        y = torch.addcmul(y, x, D.float()[:, None]) if out is None else torch.addcmul(y, x, D.float()[:, None], out=out)
    elif out is not None:
        y = out.copy_(y)
    if live is not None:
        y = y * live[..., None, None] if out is None else y.mul_(live[..., None, None])
    final = state.permute(0, 1, 3, 4, 2).reshape(b, H, P, N)
    if not return_chunk_states:
        return y, final
    st = torch.cat(starts, 1) if starts else x.new_zeros(b, 0, G, N, R, P, dtype=torch.float32)
    return y, final, st.permute(0, 1, 2, 4, 5, 3).reshape(b, -1, H, P, N)


def _pass(x, dt, dA, B, C, state, Q: int, inplace: bool):
    """One pass over l tokens (whole chunks of Q, the last one padded with identity steps). x [b, l, H, P],
    dt / dA [b, l, H], B / C [b, l, G, N] fp32; state [b, G, N, R, P] (heads h = g*R + r). Returns
    (y [b, l, H, P], state after the pass, states before each chunk [b, c, G, N, R, P]). With inplace the big
    temporaries are formed in place (inference: fewer allocations, each a round of page faults on a CPU);
    without, every step is out of place so autograd can differentiate it (the training model)."""
    b, l, H, P = x.shape
    G, N = B.shape[2:]
    R = H // G
    pad = -l % Q
    if pad:  # dt = 0, x = B = C = 0 steps: no decay and no input
        x, dt, dA, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, dA, B, C))
    c = (l + pad) // Q
    xdt = (x.view(b, c, Q, G, R, P).permute(0, 1, 3, 4, 2, 5) *                 # dt_j x_j, per head [Q, P]
           dt.view(b, c, Q, G, R, 1).permute(0, 1, 3, 4, 2, 5))                 # [b, c, G, R, Q, P]
    Bc = B.view(b, c, Q, G, N).transpose(2, 3)                                  # [b, c, G, Q, N]
    Cc = C.view(b, c, Q, G, N).transpose(2, 3)
    a = dA.view(b, c, Q, G, R).permute(0, 1, 3, 4, 2).double().cumsum(4)        # [b, c, G, R, Q] fp64
    a_end = a[..., -1:]                                                         # [b, c, G, R, 1]

    # intra-chunk: (C_i . B_j) exp(a_i - a_j) for j <= i, per head, times dt_j x_j. The causal mask sits on
    # the group's C.B (R times smaller); the exponent is clamped to [EXP_FLOOR, 0], so the upper triangle
    # (a_i - a_j >= 0 there) cannot overflow.
    cb = (Cc @ Bc.transpose(-1, -2)).tril().unsqueeze(3)
    if inplace:
        scores = torch.empty(b, c, G, R, Q, Q, dtype=torch.float32, device=x.device)
        torch.sub(a[..., :, None], a[..., None, :], out=scores)                # fp64 difference, rounded once
        scores.clamp_(EXP_FLOOR, 0.0).exp_().mul_(cb)
    else:
        scores = (a[..., :, None] - a[..., None, :]).float().clamp(EXP_FLOOR, 0.0).exp() * cb
    y_in = scores @ xdt                                                         # [b, c, G, R, Q, P]

    # each chunk's own state at its end: B^T [N, Q] @ (decayed dt x) [Q, R*P], the R heads as columns
    w = xdt.transpose(3, 4) * _decay(a_end - a).transpose(3, 4)[..., None]      # [b, c, G, Q, R, P]
    own = (Bc.transpose(-1, -2) @ w.reshape(b, c, G, Q, R * P)).view(b, c, G, N, R, P)

    # inter-chunk recurrence (c elementwise steps); st[:, k] = state before chunk k, st[:, c] = after all
    chunk_decay = _decay(a_end).view(b, c, G, 1, R, 1)
    if inplace:
        st = torch.empty(b, c + 1, G, N, R, P, dtype=torch.float32, device=x.device)
        st[:, 0] = state
        for k in range(c):
            torch.addcmul(own[:, k], st[:, k], chunk_decay[:, k], out=st[:, k + 1])
    else:
        sts = [state]
        for k in range(c):
            sts.append(torch.addcmul(own[:, k], sts[-1], chunk_decay[:, k]))
        st = torch.stack(sts, 1)                                                # [b, c + 1, G, N, R, P]

    # state to output: C_i [Q, N] @ S_start [N, R*P], decayed to token i, plus the intra-chunk part
    y_off = (Cc @ st[:, :c].reshape(b, c, G, N, R * P)).view(b, c, G, Q, R, P)
    y = torch.addcmul(y_in.transpose(3, 4), y_off, _decay(a).transpose(3, 4)[..., None])  # [b, c, G, Q, R, P]
    y = y.transpose(2, 3).reshape(b, c * Q, H, P)[:, :l]
    return y, st[:, c], st[:, :c]


def mamba_chunked_scan(xBC, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, seq_lens=None,
                       dt_min: float = 0.0, dt_max: float = math.inf, conv_state_out=None, ssm_state_out=None,
                       chunk_size: int = 128):
    """`ops.mamba_block_scan` (same arguments, same results up to fp32 rounding) with the recurrence in
    chunked form: conv + SiLU and dt through `reference.mamba_scan_inputs` (the shared preamble), then
    `ssd_chunked_scan`. Returns y [B, L, H*P] in xBC's dtype; writes the final conv / SSM states to
    conv_state_out / ssm_state_out when given (they may be the seed tensors)."""
    Bsz, L, _ = xBC.shape
    H, P, N = ssm_state.shape[1:]
    hist = conv_state.shape[1]
    lens = (torch.full((Bsz,), L, dtype=torch.long, device=xBC.device) if seq_lens is None
            else seq_lens.to(xBC.device).long().clamp(0, L))
    # Pass by pass (whole chunks), so the conv's temporaries stay as small as the scan's; each pass's conv
    # input is [the K-1 raw rows before it | its tokens].
    step = pass_tokens(Bsz, H, min(chunk_size, max(L, 1)), xBC.device)
    state, y = ssm_state, xBC.new_empty(Bsz, L, H, P)
    for s in range(0, L, step):
        e = min(L, s + step)
        before = xBC[:, s - hist:s] if s >= hist else torch.cat([conv_state[:, s:], xBC[:, :s]], 1)
        x, Bm, Cm, d, A = reference.mamba_scan_inputs(torch.cat([before, xBC[:, s:e]], 1), dt[:, s:e], conv_weight,
                                                      conv_bias, dt_bias, A_log, H, P, N, dt_min, dt_max)
        _, state = ssd_chunked_scan(x, d, A, Bm, Cm, D, state, chunk_size, None if seq_lens is None else lens - s,
                                    out=y[:, s:e])
    if conv_state_out is not None:
        conv_state_out.copy_(reference.mamba_final_conv_state(conv_state, xBC, lens))
    if ssm_state_out is not None:
        ssm_state_out.copy_(state)
    return y.view(Bsz, L, H * P)
