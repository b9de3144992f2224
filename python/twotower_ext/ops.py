"""Public op wrappers over `torch.ops.twotower`, their fake (meta) implementations for torch.compile and
CUDA-graph capture, and the fallback to `reference` on devices the build has no kernel for."""
from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F

from . import reference
from .packed import PackedLinear

OP_NAMES = ["merge_states", "mamba_block_scan", "threshold_unmask", "block_attention", "moe_experts", "linear",
            "lm_head_unmask", "rms_norm", "add_rms_norm", "gated_rms_norm", "moe_route", "tower_layers"]


@functools.lru_cache(maxsize=None)
def kernel_devices(name: str) -> tuple[str, ...]:
    """Dispatch keys ("CPU", "CUDA") that have a compiled kernel for op `twotower::name` (fixed once the
    library is loaded, so cached: this sits on every op call's path)."""
    qual = f"twotower::{name}"
    return tuple(k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qual, k))


_FORCE_REFERENCE = False


def use_reference(flag: bool = True) -> bool:
    """Route every op to its plain-PyTorch reference (True) or to the kernels (False); returns the old
    setting. For baselines and debugging: the reference does the same math the obvious way."""
    global _FORCE_REFERENCE
    old, _FORCE_REFERENCE = _FORCE_REFERENCE, bool(flag)
    return old


def has_kernel(name: str, device: torch.device) -> bool:
    """Whether a call of op `name` on `device` takes the compiled kernel (else the reference, see use_reference)."""
    return not _FORCE_REFERENCE and device.type.upper() in kernel_devices(name)


def _autograd_needed(*tensors) -> bool:
    """Whether autograd records a call on these tensors: the kernels have no backward, so those calls (training)
    run the reference."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cpu_isas() -> list[str]:
    """The CPU instruction-set levels this CPU runs, lowest first ("scalar", "avx2", "avx512", "avx512_bf16",
    "amx"; AMX only where the OS grants the tile state): the values the TWOTOWER_<OP>_CPU_ISA variables take
    (MOE, SCAN, ATTN), which force a CPU kernel's path (tests and benchmarks run each in turn)."""
    return list(torch.ops.twotower.cpu_isas())


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
    if not has_kernel("merge_states", o.device):
        return reference.merge_states(o, lse)
    return torch.ops.twotower.merge_states(o, lse)


# ----------------------------------------------------------------------------------------------------
# block_attention


@torch.library.register_fake("twotower::block_attention")
def _block_attention_fake(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale=None, causal=False):
    torch._check(q.dim() == 4, lambda: "q must be [batch, block_len, q_heads, head_dim]")
    B, S, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, Hq, S), dtype=torch.float32)


@torch.library.register_fake("twotower::block_attention_out")
def _block_attention_out_fake(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, out, causal=False):
    torch._check(q.dim() == 4, lambda: "q must be [batch, block_len, q_heads, head_dim]")
    B, S, Hq, _ = q.shape
    return q.new_empty((B, Hq, S), dtype=torch.float32)


def block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale=None, out=None,
                    causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoiser attention: the S block queries attend, with one softmax and no mask, over the first
    ctx_lens[b] keys of their row's context cache followed by the S block keys (see `reference.block_attention`).

    q [B,S,Hq,D]; k_blk, v_blk [B,S,Hkv,D]; k_ctx, v_ctx [B,Lmax,Hkv,D] (last dim contiguous, other strides
    free: a slice of a bigger cache is read in place); ctx_lens int32 [B] on q's device, values in [0, Lmax]
    (checked on CPU; clamped on CUDA, where checking would need a host sync). Hq % Hkv == 0; fp32/bf16/fp16;
    scale defaults to 1/sqrt(D). Returns (out [B,S,Hq,D] in q's dtype, lse [B,Hq,S] fp32, natural log).
    out: a preallocated [B,S,Hq,D] tensor of q's dtype and device (last dim contiguous, other strides free) to
    write the result into; it is returned as the first element. causal=True: block query j sees the context and
    block keys 0..j only (the context tower's extension; S = 1 is an AR step).
    """
    if not has_kernel("block_attention", q.device):
        o, lse = reference.block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, causal)
        if out is None:
            return o, lse
        _check_out(out, q)
        return out.copy_(o), lse
    if out is None:
        return torch.ops.twotower.block_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, causal)
    return out, torch.ops.twotower.block_attention_out(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale, out, causal)


def _check_out(out, q) -> None:
    """The reference route's check of `out` (on the kernel route the binding checks the same properties, one
    message per failed property)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"twotower: out must be a tensor, got {type(out).__name__}")
    if out.dtype != q.dtype or out.device != q.device or out.shape != q.shape:
        raise RuntimeError(f"twotower: out must be a {q.dtype} tensor on {q.device} of q's shape {tuple(q.shape)}, "
                           f"got {out.dtype} on {out.device} of shape {tuple(out.shape)}")


# ----------------------------------------------------------------------------------------------------
# mamba_block_scan


@torch.library.register_fake("twotower::mamba_block_scan")
def _mamba_block_scan_fake(xBC, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, seq_lens,
                           dt_min, dt_max, conv_state_out, ssm_state_out):
    torch._check(xBC.dim() == 3 and ssm_state.dim() == 4, lambda: "xBC must be 3-D and ssm_state 4-D")
    return xBC.new_empty((xBC.shape[0], xBC.shape[1], ssm_state.shape[1] * ssm_state.shape[2]))


def mamba_block_scan(xBC, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, seq_lens=None,
                     dt_min: float = 0.0, dt_max: float = math.inf, conv_state_out=None, ssm_state_out=None):
    """Seeded Mamba-2 scan of a block of tokens (see `reference.mamba_block_scan` and
    csrc/mamba_scan/mamba_scan.h). Returns y [B, L, H*P] in xBC's dtype; writes the final conv / SSM
    states into conv_state_out / ssm_state_out when given (pass the seed tensors for an in-place update).
    conv_weight may be NVIDIA's [C, 1, K] conv1d weight or [C, K]."""
    if conv_weight.dim() == 3:
        conv_weight = conv_weight.squeeze(1)
    if not has_kernel("mamba_block_scan", xBC.device):
        return reference.mamba_block_scan(xBC, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                          seq_lens, dt_min, dt_max, conv_state_out, ssm_state_out)
    return torch.ops.twotower.mamba_block_scan(xBC, dt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias,
                                               A_log, D, seq_lens, float(dt_min), float(dt_max), conv_state_out,
                                               ssm_state_out)


# ----------------------------------------------------------------------------------------------------
# threshold_unmask


@torch.library.register_fake("twotower::threshold_unmask")
def _threshold_unmask_fake(logits, x, mask_id, gamma, step, steps_per_block, temperature, seed, block, kept, counts,
                           done, logprob):
    torch._check(logits.dim() == 3, lambda: "logits must be [batch, seq, vocab]")
    return None  # x, counts, done and logprob are written in place


# The per-row arguments of threshold_unmask and their dtypes, in the order of the op's schema.
UNMASK_ROW_ARGS = {"gamma": torch.float32, "step": torch.int32, "steps_per_block": torch.int32,
                   "temperature": torch.float32, "seed": torch.int64, "block": torch.int64, "kept": torch.int32}


def _check_number(name: str, v) -> None:
    """A per-row argument given as a Python value must be a number of its kind (an int for the integer ones)."""
    ok = numbers.Real if UNMASK_ROW_ARGS[name].is_floating_point else numbers.Integral
    if isinstance(v, bool) or not isinstance(v, ok):
        kind = "a real number" if UNMASK_ROW_ARGS[name].is_floating_point else "an int"
        raise TypeError(f"twotower: {name} must be {kind} or a tensor, got {type(v).__name__}")


def _row_tensor(name: str, v, device: torch.device) -> torch.Tensor:
    """A per-row argument as the op takes it: a [B] or [1] tensor of UNMASK_ROW_ARGS[name]'s dtype. A tensor of
    another integer (float) dtype for an integer (float) argument is converted with .to() on its own device (the
    op checks the device and shape); a 0-d tensor becomes [1]. A Python number becomes a device-side fill, never a
    host-to-device copy, so a CUDA graph can capture the call."""
    dtype = UNMASK_ROW_ARGS[name]
    if not isinstance(v, torch.Tensor):
        return reference.unmask_rows(v, 1, dtype, device)
    if v.dtype != dtype and v.dtype != torch.bool and v.is_floating_point() == dtype.is_floating_point:
        v = v.to(dtype)
    return v.reshape(1) if v.dim() == 0 else v


def threshold_unmask(logits, x, mask_id: int, gamma, step, steps_per_block, temperature=0.0, seed=0, block=0,
                     kept=None, out_counts=None, out_done=None, out_logprob=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask-diffusion commit step between two denoiser passes, updating x in place (docs/semantics.md:
    the commit rule, the random key, kept and logprob).

    logits [B, S, V] fp32/bf16 (vocab contiguous, S <= 64); x [B, S] int64 block tokens; mask_id in [-1, V)
    (-1: the masked positions hold -1 and no vocabulary id is excluded, the AR sampling use). Per row b:
    gamma (float32), step (int32), steps_per_block (int32), temperature (float32; 0 greedy), seed (int64),
    block (int64: the block or token index) and kept (int32, default S: only positions [0, kept[b]) are
    counted), each a Python number (the same for every row) or a [B] or [1] tensor on the logits' device
    (tensors keep a captured CUDA graph replayable for other values; the op never synchronises with the host).

    Returns (counts int32 [B]: kept positions committed by this call, done bool [B]: no kept position left
    masked), written into out_counts / out_done when given. out_logprob: a float32 [B, S] tensor that receives
    log softmax(logits)[pred] (temperature 1) at every position this call commits; other positions untouched.
    Bad per-row values raise ValueError on the CPU naming the argument and the row; on CUDA such a row is left
    untouched with counts -1 (kept is clamped to [0, S]) unless TWOTOWER_UNMASK_DEBUG=1 (synchronises, raises).
    NaN logits at masked positions raise on CPU; on CUDA they count as -inf (the debug mode raises). Exact
    definition and numerics: `reference.threshold_unmask` and csrc/threshold_unmask/threshold_unmask.h.
    """
    batch = logits.shape[0] if logits.dim() > 0 else 0
    rows, counts, done = _commit_args(batch, logits.shape[1] if logits.dim() == 3 else 0, logits.device, gamma, step,
                                      steps_per_block, temperature, seed, block, kept, out_counts, out_done)
    if not has_kernel("threshold_unmask", logits.device):
        return reference.threshold_unmask(logits, x, mask_id, gamma, step, steps_per_block, temperature, seed, block,
                                          kept, counts, done, out_logprob)
    args, kept_t = _row_args(rows, kept, logits.device)
    torch.ops.twotower.threshold_unmask(logits, x, int(mask_id), *args, kept_t, counts, done, out_logprob)
    return counts, done


def _commit_args(batch: int, seq: int, device, gamma, step, steps_per_block, temperature, seed, block, kept,
                 out_counts, out_done) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The commit step's per-row arguments by name (Python numbers checked: kind, and range against seq) and the
    counts / done outputs (the given ones, or new [batch] tensors on device)."""
    rows = {"gamma": gamma, "step": step, "steps_per_block": steps_per_block, "temperature": temperature,
            "seed": seed, "block": block}
    numbers_given = {k: v for k, v in {**rows, "kept": kept}.items() if v is not None and not isinstance(v, torch.Tensor)}
    for k, v in numbers_given.items():
        _check_number(k, v)
    msg = reference.unmask_row_error(seq, **{k: v for k, v in numbers_given.items() if k not in ("seed", "block")})
    if msg:
        raise ValueError(msg)
    counts = out_counts if out_counts is not None else torch.empty(batch, dtype=torch.int32, device=device)
    done = out_done if out_done is not None else torch.empty(batch, dtype=torch.bool, device=device)
    return rows, counts, done


def _row_args(rows: dict, kept, device) -> tuple[list, torch.Tensor | None]:
    """_commit_args' per-row values as the ops take them (_row_tensor), in the schemas' order, and kept's."""
    kept_t = None if kept is None else _row_tensor("kept", kept, device)
    return [_row_tensor(k, v, device) for k, v in rows.items()], kept_t


# ----------------------------------------------------------------------------------------------------
# lm_head_unmask


@torch.library.register_fake("twotower::lm_head_unmask")
def _lm_head_unmask_fake(hidden, w, n, x, mask_id, gamma, step, steps_per_block, temperature, seed, block, kept,
                         counts, done, logprob, logits_out):
    torch._check(hidden.dim() == 3, lambda: "hidden must be [batch, seq, hidden_size]")
    return None  # x, counts, done, logprob and logits_out are written in place


def lm_head_unmask(hidden, w, x, mask_id: int, gamma, step, steps_per_block, temperature=0.0, seed=0, block=0,
                   kept=None, out_counts=None, out_done=None, out_logprob=None, logits: bool = False):
    """The denoiser's LM head and the commit step in one: threshold_unmask(linear(hidden, w), x, ...) with the same
    arguments (see `threshold_unmask`), x updated in place.

    hidden [B, S, K] (the final normed hidden states, in the model dtype); w the LM head: a `packed.PackedLinear`
    on the CPU runs the fused kernel (csrc/lm_head_unmask/lm_head_unmask.h: each vocabulary slice's logits are
    computed for the masked positions only and scanned while in cache, never stored; the commit is bit for bit the
    unfused one's on the micro kernel's logits). Anything else (CUDA, plain weights, the reference) composes linear
    and threshold_unmask (on the logits widened to fp32); there is no CUDA kernel of the fusion.

    Returns (counts, done, logits): logits [B, S, V] in hidden's dtype (every position's, the linear's output) when
    `logits` is true, else None (the fused kernel then never materialises them). NaN in a masked position's logits
    (NaN in its hidden row) raises on the CPU like threshold_unmask's NaN logits. No host synchronisation."""
    if not (isinstance(w, PackedLinear) and hidden.is_cpu and has_kernel("lm_head_unmask", hidden.device)):
        out = linear(hidden, w)   # threshold_unmask checks the commit arguments
        counts, done = threshold_unmask(out.float(), x, mask_id, gamma, step, steps_per_block, temperature, seed,
                                        block, kept, out_counts, out_done, out_logprob)
        return counts, done, out if logits else None
    B = hidden.shape[0] if hidden.dim() > 0 else 0
    S = hidden.shape[1] if hidden.dim() == 3 else 0
    rows, counts, done = _commit_args(B, S, hidden.device, gamma, step, steps_per_block, temperature, seed, block,
                                      kept, out_counts, out_done)
    args, kept_t = _row_args(rows, kept, hidden.device)
    out = hidden.new_empty((B, S, w.n)) if logits else None
    torch.ops.twotower.lm_head_unmask(hidden, w.data, w.n, x, int(mask_id), *args, kept_t, counts, done, out_logprob,
                                      out)
    return counts, done, out


# ----------------------------------------------------------------------------------------------------
# moe_experts


@torch.library.register_fake("twotower::moe_experts")
def _moe_experts_fake(x, expert_ids, expert_weights, w_up, w_down, w_up_scale=None, w_down_scale=None, group_size=0,
                      shared_up=None, shared_down=None, shared_inter=0):
    torch._check(x.dim() == 2, lambda: "x must be [tokens, hidden]")
    return x.new_empty(x.shape)


@torch.library.register_fake("twotower::moe_experts_out")
def _moe_experts_out_fake(x, expert_ids, expert_weights, w_up, w_down, out, w_up_scale=None, w_down_scale=None,
                          group_size=0, shared_up=None, shared_down=None, shared_inter=0):
    torch._check(x.dim() == 2, lambda: "x must be [tokens, hidden]")
    return None  # out is written in place


def relu2_mlp(x, up, down) -> torch.Tensor:
    """NemotronH's MLP (the MoE layer's shared expert): linear(square(relu(linear(x, up))), down), each step rounded
    to x's dtype; up / down plain [out, in] weights or `packed.PackedLinear`s (see `linear`)."""
    return linear(torch.square(F.relu(linear(x, up))), down)


def quantized_args(hidden: int, w_up, w_down) -> tuple:
    """(w_up, w_down, w_up_scale, w_down_scale, group_size) for the op: the tensors themselves when dense, the
    QuantizedExperts' storage otherwise (both must be quantised, in one format, with the op's k's)."""
    from .quant import QuantizedExperts
    qu, qd = isinstance(w_up, QuantizedExperts), isinstance(w_down, QuantizedExperts)
    if not (qu or qd):
        return w_up, w_down, None, None, 0
    if not (qu and qd):
        raise TypeError("twotower: w_up and w_down must both be QuantizedExperts or both tensors, got "
                        f"{type(w_up).__name__} and {type(w_down).__name__}")
    if w_up.fmt != w_down.fmt or w_up.group != w_down.group:
        raise ValueError(f"twotower: w_up and w_down must have one format, got w_up {w_up.fmt} (group {w_up.group}) "
                         f"and w_down {w_down.fmt} (group {w_down.group})")
    if w_up.k != hidden or w_down.k != w_up.shape[1]:
        raise ValueError(f"twotower: w_up's k must be hidden = {hidden} (x's) and w_down's k inter = "
                         f"{w_up.shape[1]} (w_up's), got {w_up.k} and {w_down.k}")
    return w_up.data, w_down.data, w_up.scale, w_down.scale, w_up.group


def moe_experts(x, expert_ids, expert_weights, w_up, w_down, out=None, shared_up=None,
                shared_down=None) -> torch.Tensor:
    """Routed MoE experts: y[t] = sum_j expert_weights[t, j] * w_down[e] @ relu(w_up[e] @ x[t])^2,
    e = expert_ids[t, j] (see `reference.moe_experts` and csrc/moe/moe.h for the exact numerics), plus the layer's
    shared expert `relu2_mlp(x, shared_up, shared_down)` when given (added in x's dtype).

    x [T, H] fp32/bf16/fp16 (last dim contiguous); expert_ids [T, k] int32/int64 in [0, E), k <= E;
    expert_weights [T, k] fp32/fp64; w_up [E, I, H], w_down [E, H, I] in x's dtype (last dim contiguous, other
    strides free: the loader's stacked tensors or slices of them). Returns y [T, H] in x's dtype, written into
    `out` ([T, H], x's dtype and device, last dim contiguous; may be x) when given. Only the experts some token
    chose are read, each once; no host synchronisation. Out-of-range ids raise on CPU; on CUDA they are skipped
    (contribute 0) unless TWOTOWER_MOE_DEBUG=1 (synchronises, raises).

    w_up / w_down may instead both be `quant.QuantizedExperts` of one format (fp8 or int4, see quant.py for the
    formats and the dequantisation contract): the kernel dequantises tile by tile in its inner loop.

    shared_up [I_s, H] / shared_down [H, I_s]: with both `packed.PackedLinear` on the CPU the shared expert runs
    inside the op, in the same two phases as the routed experts (csrc/moe/moe_shared_cpu.cpp: no hand-offs between
    its steps, its weights streamed beside the routed ones); elsewhere (CUDA, plain weights) `relu2_mlp` beside the
    op. The same result either way.
    """
    if (shared_up is None) != (shared_down is None):
        raise ValueError("twotower: shared_up and shared_down (the shared expert's weights) must be given together")
    ref_up, ref_down = w_up, w_down
    w_up, w_down, up_scale, down_scale, group = quantized_args(x.shape[-1], w_up, w_down)
    fused = (isinstance(shared_up, PackedLinear) and isinstance(shared_down, PackedLinear) and x.is_cpu
             and has_kernel("moe_experts", x.device))
    if shared_up is not None and not fused:   # the shared MLP first: out may be x
        shared = relu2_mlp(x, shared_up, shared_down)
        return moe_experts(x, expert_ids, expert_weights, ref_up, ref_down, out).add_(shared)
    if not has_kernel("moe_experts", x.device):
        if out is not None:
            _check_out(out, x)
        return reference.moe_experts(x, expert_ids, expert_weights, ref_up, ref_down, out)
    sh = (shared_up.data, shared_down.data, shared_up.n) if fused else (None, None, 0)
    if out is None:
        return torch.ops.twotower.moe_experts(x, expert_ids, expert_weights, w_up, w_down, up_scale, down_scale, group,
                                              *sh)
    torch.ops.twotower.moe_experts_out(x, expert_ids, expert_weights, w_up, w_down, out, up_scale, down_scale, group,
                                       *sh)
    return out


# ----------------------------------------------------------------------------------------------------
# moe_route


@torch.library.register_fake("twotower::moe_route")
def _moe_route_fake(x, router, bias, k, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0):
    torch._check(x.dim() == 2, lambda: "x must be [tokens, hidden]")
    return x.new_empty((x.shape[0], k), dtype=torch.int64), x.new_empty((x.shape[0], k), dtype=torch.float64)


def moe_route(x, router, bias, k: int, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
              scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """NVIDIA's MoE router in one call (see `reference.moe_route` and csrc/moe_router/moe_router.h for the exact
    semantics): fp64 sigmoid scores of x @ router^T, top-k experts by score + bias (grouped when n_group > 1),
    chosen with torch.topk(sorted=False)'s selection and output order (ties included), weights = the chosen scores,
    renormalised when norm_topk_prob, times scaling.

    x [T, H] fp32/bf16/fp16 (last dim contiguous); router [E, H] fp64 or fp32 (the CPU loader's: the kernel widens
    it exactly, the same logits for half the bytes) and bias [E] fp64 (another float dtype is converted here, per
    call); 1 <= k <= E; E % n_group == 0, 1 <= topk_group <= n_group. Returns
    (ids [T, k] int64, weights [T, k] fp64). NaN in x[t] gives token t NaN weights (never a plausible routing:
    every logit of t is NaN); other tokens are unaffected. The reference runs instead where the op has no
    kernel (CUDA), for fp64 x, and when autograd needs it (grad enabled and x, router or bias requiring grad:
    training differentiates through the router).
    """
    if not has_kernel("moe_route", x.device) or x.dtype == torch.float64 or _autograd_needed(x, router, bias):
        return reference.moe_route(x, router, bias, k, n_group, topk_group, norm_topk_prob, scaling)
    if router.dtype not in (torch.float64, torch.float32) and router.is_floating_point():
        router = router.double()
    if bias.dtype != torch.float64 and bias.is_floating_point():
        bias = bias.double()
    return torch.ops.twotower.moe_route.default(x, router, bias, int(k), int(n_group), int(topk_group),
                                                bool(norm_topk_prob), float(scaling))


# ----------------------------------------------------------------------------------------------------
# linear


@torch.library.register_fake("twotower::linear")
def _linear_fake(x, w, n):
    torch._check(x.dim() >= 1, lambda: "x must be [..., in_features]")
    return x.new_empty((*x.shape[:-1], n))


def linear(x, w) -> torch.Tensor:
    """F.linear(x, w) without bias: x [..., K] @ w^T -> [..., N] in x's dtype (fp32 accumulation, rounded once).

    w is a plain [N, K] tensor (then this is F.linear: CUDA, training, fp16, anything not packed) or a
    `packed.PackedLinear` (the CPU inference weights, packed at load): then x (float32 / bfloat16, w's dtype, on
    the CPU) goes through the register-blocked kernel of csrc/linear/linear.h, which picks its instruction set
    and, for many rows (prefill), the matrix library (`linear_cpu_plan`). No host synchronisation. This sits on
    every linear of a pass (over a hundred calls), so it does no more than route."""
    if not isinstance(w, PackedLinear):
        return F.linear(x, w)
    if _FORCE_REFERENCE or not x.is_cpu:   # the op has a kernel on the CPU only (test_build checks)
        return reference.linear(x, w)
    return torch.ops.twotower.linear.default(x, w.data, w.n)


# ----------------------------------------------------------------------------------------------------
# norms


@torch.library.register_fake("twotower::rms_norm")
def _rms_norm_fake(x, w, eps, shift=None, scale=None, modulate_first=False):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("twotower::add_rms_norm")
def _add_rms_norm_fake(x, add, gate, w, eps, shift=None, scale=None, modulate_first=False):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("twotower::gated_rms_norm")
def _gated_rms_norm_fake(y, z, w, group, eps):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _norm_kernel(name: str, x, *tensors) -> bool:
    """Whether a norm call takes the kernel: one dtype for every tensor (mixed dtypes, e.g. an fp32 residual
    stream, follow the reference's promotion) and no autograd (the kernels have no backward; training runs the
    reference)."""
    ts = [t for t in tensors if t is not None]
    return (has_kernel(name, x.device) and all(t.dtype == x.dtype for t in ts)
            and not _autograd_needed(x, *ts))


def rms_norm(x, w, eps: float, shift=None, scale=None, modulate_first: bool = False) -> torch.Tensor:
    """NemotronHRMSNorm of x [..., H] with weight w [H] (normalise in fp32, cast back, times w), with the
    denoiser's adaLN modulation x * (1 + scale) + shift before it (modulate_first) or after it: shift / scale
    [groups, H], row r of x (flattened to [rows, H]) using group r // (rows // groups). Exact rounding contract
    in `reference.rms_norm` and csrc/norm/norm.h (the CPU kernel: one pass over each row; the order of its
    fp32 sum of squares is its own). Returns a new tensor of x's shape."""
    if _norm_kernel("rms_norm", x, w, shift, scale):
        return torch.ops.twotower.rms_norm.default(x, w, float(eps), shift, scale, bool(modulate_first))
    return reference.rms_norm(x, w, eps, shift, scale, modulate_first)


def add_rms_norm(x, add, gate, w, eps: float, shift=None, scale=None,
                 modulate_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input from the residual stream: s = x + gate * add (gate [groups, H] as rms_norm's shift, or
    None), then rms_norm of s (cast to w's dtype, after the modulation when modulate_first). Returns (normed, s);
    see `reference.add_rms_norm`. One kernel pass on the CPU where every tensor has one dtype."""
    if _norm_kernel("add_rms_norm", x, add, gate, w, shift, scale):
        return torch.ops.twotower.add_rms_norm.default(x, add, gate, w, float(eps), shift, scale, bool(modulate_first))
    return reference.add_rms_norm(x, add, gate, w, eps, shift, scale, modulate_first)


def gated_rms_norm(y, z, w, group: int, eps: float) -> torch.Tensor:
    """Mamba-2's output norm: g = y * silu(z) in fp32, RMSNorm over groups of `group` channels, times w, rounded
    to y's dtype once (`reference.gated_rms_norm`; the CPU kernel's SiLU exp differs in the last bits)."""
    if _norm_kernel("gated_rms_norm", y, z, w):
        return torch.ops.twotower.gated_rms_norm.default(y, z, w, int(group), float(eps))
    return reference.gated_rms_norm(y, z, w, group, eps)


# ----------------------------------------------------------------------------------------------------
# tower_layers


@torch.library.register_fake("twotower::tower_layers")
def _tower_layers_fake(x, h, weights, ints, floats, states, attn_lens, seq_lens, kv_index, kv_keep, modulation, row0,
                       write):
    return torch.empty_like(x), torch.empty_like(x)


def tower_layers(x, h, weights, ints, floats, states, attn_lens, seq_lens=None, kv_index=None, kv_keep=None,
                 modulation=None, row0: int = 0, write: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A tower's layers in one call (CPU; csrc/tower/tower_torch.cpp): the loop of models/towers.py over the layer
    table (weights, ints, floats) that `models.tower_program.build` makes, calling the same ops in the same order,
    so the result is bit for bit the Python loop's; what it saves is the Python and dispatch between the ops.

    x, h [n, L, hidden]: the residual stream and layer 0's normed input. states: per Mamba layer its (conv, ssm)
    cache tensors, per attention layer its (k, v) store, whole (all cache rows); the call uses rows
    [row0, row0 + n). attn_lens int32 [n]: the context length attention reads. write (the context tower): the Mamba
    states are advanced in place, K/V written at kv_index ([n * L] int64 positions of the flattened store; where
    kv_keep [n * L, 1, 1] is False a position keeps its K/V) and attention is causal; else (the denoiser) the
    states are read only. seq_lens: the Mamba scan's per-row token counts. modulation [n, layers, 3, hidden]: the
    denoiser's per-layer (shift, scale, gate). Returns (h, x) after the last layer: with a final norm in the table
    its normed output and the residual sum, else the last layer's output and the residual sum (x + it)."""
    return torch.ops.twotower.tower_layers.default(x, h, weights, ints, floats, states, attn_lens, seq_lens, kv_index,
                                                   kv_keep, modulation, int(row0), bool(write))
