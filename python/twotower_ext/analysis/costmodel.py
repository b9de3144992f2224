"""A roofline cost model of the three passes of two-tower decoding, and when diffusion beats AR.

For a config, batch, context length, block size and weight dtype it counts what each pass must move and
compute at the least:
- AR step: the context tower over one token per row, then `context_lm_head` (the AR baseline);
- denoiser pass (NFE): the denoiser tower over a block of `block_size` tokens per row, then `lm_head`;
- block extension: the context tower over a committed block per row, no logits.

Bytes (each read once per pass, as an ideal engine would):
- weights: every dense weight of the tower (Mamba, attention, shared experts, routers, norms) plus the
  routed experts the tokens choose; with T tokens in the pass (all rows together) and uniform top-k routing
  a MoE layer touches E(1-(1-k/E)^T) distinct experts in expectation;
- embeddings: one row per token; the LM head: the whole [vocab, hidden] matrix when the pass has logits;
- KV: the context K/V of every attention layer (ctx_len per row), plus the new tokens' K/V written;
- Mamba: conv + fp32 SSM state read (and written back by the context tower);
- activations: every matmul reads its input and writes its output once; logits are written in fp32.
FLOPs: 2 per multiply-add of every matmul (k experts per token, not the distinct ones), attention
(QK^T and PV over ctx_len + the block), the Mamba conv and SSM recurrence.

Time on a device is the roofline max(bytes / bandwidth, FLOPs / matmul rate): a lower bound that a real
engine approaches only when every pass streams its weights at full bandwidth (no per-op overhead, no
host syncs, no expert read twice). Diffusion commits a block of S tokens in S/tau passes plus one
extension; AR spends S steps; so it wins when tau > S t_nfe / (S t_ar - t_ext), the break-even tokens per
pass (infinite when an extension alone costs S AR steps).

`distinct_experts` counts the experts a pass actually touched, on the device (see its docstring).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

DEVICE_NAMES = ("h100", "h200", "cpu")
BATCHES = (1, 2, 4, 8, 16, 32, 64)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float        # bytes/s
    flops: float            # FLOP/s of a large matmul in the weight dtype
    source: str             # where the numbers come from


# Datasheet numbers, not measurements: times derived from them are predictions. Dense (not 2:4 sparse)
# bf16 tensor-core peak; HBM bandwidth as NVIDIA states it (a real copy reaches less).
PRESETS = {
    "h100": Device("H100 SXM", 3.35e12, 989e12, "datasheet (HBM3 3.35 TB/s, bf16 dense 989 TFLOP/s): predicted"),
    "h200": Device("H200 SXM", 4.8e12, 989e12, "datasheet (HBM3e 4.8 TB/s, bf16 dense 989 TFLOP/s): predicted"),
}


def measure_device(device: str = "cpu", dtype=None, nbytes: int = 256 << 20, reps: int = 5) -> Device:
    """This machine's copy bandwidth (bytes read + written per second by a large tensor copy, the same
    measure as bench/harness.py's) and matmul rate (1024^3 in `dtype`, default fp32), medians of `reps`
    runs. The package cannot import bench/, so this is its own small measurement."""
    import torch

    dtype = dtype or torch.float32
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def median_s(fn):
        fn()
        sync()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - t0)
        return sorted(samples)[len(samples) // 2]

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bw = 2 * nbytes / median_s(lambda: dst.copy_(src))
    a = torch.randn(1024, 1024, device=device).to(dtype)
    rate = 2 * 1024 ** 3 / median_s(lambda: a @ a)
    return Device(f"this machine ({device})", bw, rate, f"measured now: copy bandwidth, {dtype} 1024^3 matmul")


def device_preset(name: str, dtype=None) -> Device:
    """The H100 / H200 datasheet preset, or 'cpu': this machine measured now (see measure_device)."""
    if name not in DEVICE_NAMES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_NAMES)}, got {name!r}")
    return measure_device("cpu", dtype) if name == "cpu" else PRESETS[name]


# ----------------------------------------------------------------------------------------------------
# weights of the model, by layer


def _config(config):
    from ..models.config import NemotronHConfig

    if isinstance(config, NemotronHConfig):
        return config
    if isinstance(config, dict):
        return NemotronHConfig.from_dict(config)
    raise ValueError(f"config must be a NemotronHConfig or a config dict, got {type(config).__name__}")


def _mixer_weights(cfg, kind: str) -> tuple[list, list]:
    """One layer's weights besides the routed experts: matmuls [(out, in, fp32)] applied to every token
    and vectors [(size, fp32)] read once (norm, conv, Mamba scalars, biases)."""
    H = cfg.hidden_size
    mats, vecs = [], [(H, False)]                           # the layer's pre-norm
    if kind == "mamba":
        mats += [(cfg.in_proj_dim, H, False), (H, cfg.d_inner, False)]
        vecs += [(cfg.conv_dim * cfg.conv_kernel, False), (cfg.conv_dim if cfg.use_conv_bias else 0, False),
                 (3 * cfg.mamba_num_heads, True), (cfg.d_inner, False)]    # dt_bias, A_log, D (fp32); norm
    elif kind == "attention":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        mats += [(q, H, False), (kv, H, False), (kv, H, False), (H, q, False)]
    elif kind == "moe":
        Is = cfg.moe_shared_expert_intermediate_size
        mats += [(cfg.n_routed_experts, H, True), (Is, H, False), (H, Is, False)]   # router (fp32 on the CPU; fp64 off it: +0.5%, left out), shared
        vecs += [(cfg.n_routed_experts, True)]                                     # correction bias
    else:
        mats += [(cfg.intermediate_size, H, False), (H, cfg.intermediate_size, False)]
    return mats, vecs


def _expert_params(cfg) -> int:
    return 2 * cfg.moe_intermediate_size * cfg.hidden_size          # up [I, H] + down [H, I]


def expert_bytes_per_pass(cfg, experts: str, weight_bytes: float) -> float:
    """Stored bytes of one routed expert (up + down, data + scales) in `experts` format (quant.expert_pair_bytes;
    bf16 = unquantised: weight_bytes per weight)."""
    from ..quant import expert_pair_bytes

    return float(expert_pair_bytes(experts, cfg.hidden_size, cfg.moe_intermediate_size, weight_bytes))


def _time_weights(cfg) -> tuple[list, list]:
    """adaLN-single time conditioning of the denoiser: t_embedder (256 -> H -> H), t_block (H -> 3H), tables."""
    from ..models.weights import T_FREQ_DIM

    H = cfg.hidden_size
    return ([(H, T_FREQ_DIM, False), (H, H, False), (3 * H, H, False)],
            [(H, False), (H, False), (3 * H, False), (cfg.num_hidden_layers * 3 * H, False)])


def param_counts(config) -> dict:
    """Parameters per tower (its layers, embeddings, norm_f and LM head), of the time conditioning, in
    total, and active per AR token: the tower with one embedding row instead of the table and k routed
    experts instead of E per MoE layer (the usual 'active parameters', embeddings excluded)."""
    cfg = _config(config)
    H, V = cfg.hidden_size, cfg.vocab_size
    n_moe = cfg.layer_kinds.count("moe")
    layers = 0
    for kind in cfg.layer_kinds:
        mats, vecs = _mixer_weights(cfg, kind)
        layers += sum(o * i for o, i, _ in mats) + sum(n for n, _ in vecs)
    routed = n_moe * cfg.n_routed_experts * _expert_params(cfg)
    tower = layers + routed + 2 * V * H + H                         # + embeddings, LM head, norm_f
    mats, vecs = _time_weights(cfg)
    time_cond = sum(o * i for o, i, _ in mats) + sum(n for n, _ in vecs)
    active = tower - V * H - n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * _expert_params(cfg)
    return {"tower": tower, "routed_experts": routed, "embeddings": V * H, "lm_head": V * H,
            "time_conditioning": time_cond, "total": 2 * tower + time_cond, "active_per_token": active}


def expected_distinct_experts(n_experts: int, top_k: int, tokens: float) -> float:
    """Expected number of distinct experts chosen by `tokens` tokens, each picking top_k of n_experts
    uniformly at random (without replacement): E (1 - (1 - k/E)^T)."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


# ----------------------------------------------------------------------------------------------------
# one pass

PARTS = ("weights", "experts", "embeddings", "lm_head", "kv", "mamba_state", "activations", "logits")


def pass_cost(cfg, batch: int, new: int, ctx_len: int, weight_bytes: float, *, logits_per_row: int,
              time_cond: bool, writes_cache: bool, causal: bool, experts: str = "bf16") -> dict:
    """Bytes by part (PARTS), total bytes, FLOPs and distinct experts per MoE layer of one pass over `new`
    tokens per row of `batch` rows, after `ctx_len` context tokens. K/V, conv state and activations are
    stored in the model dtype (at least 2 bytes), the SSM state in fp32; routed experts in `experts`
    (bf16 | fp8 | int4, see expert_bytes_per_pass)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    T = batch * new
    act = max(2, weight_bytes)
    b = dict.fromkeys(PARTS, 0.0)
    flops = 0.0

    def read(mats, vecs, rows):
        nonlocal flops
        for o, i, fp32 in mats:
            b["weights"] += o * i * (4 if fp32 else weight_bytes)
            b["activations"] += rows * (i + o) * act
            flops += 2 * rows * o * i
        b["weights"] += sum(n * (4 if fp32 else weight_bytes) for n, fp32 in vecs)

    has_moe = "moe" in cfg.layer_kinds
    per_expert = expert_bytes_per_pass(cfg, experts, weight_bytes) if has_moe else 0.0
    distinct = expected_distinct_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, T) if has_moe else 0.0
    for kind in cfg.layer_kinds:
        read(*_mixer_weights(cfg, kind), T)
        if kind == "mamba":
            P, N, Hm, K = cfg.mamba_head_dim, cfg.ssm_state_size, cfg.mamba_num_heads, cfg.conv_kernel
            state = batch * ((K - 1) * cfg.conv_dim * act + Hm * P * N * 4)
            b["mamba_state"] += state * (2 if writes_cache else 1)
            flops += T * (2 * K * cfg.conv_dim + 5 * Hm * P * N)       # depthwise conv; decay, outer product, C.S
        elif kind == "attention":
            kv = cfg.num_key_value_heads * cfg.head_dim
            b["kv"] += batch * ctx_len * 2 * kv * act + (T * 2 * kv * act if writes_cache else 0)
            keys = ctx_len + ((new + 1) / 2 if causal else new)         # mean keys per query
            flops += 4 * cfg.num_attention_heads * cfg.head_dim * T * keys
        elif kind == "moe":
            k, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
            b["experts"] += distinct * per_expert
            b["activations"] += 2 * T * k * (H + I) * act
            flops += 2 * T * k * _expert_params(cfg)
    b["embeddings"] += T * H * weight_bytes
    b["weights"] += H * weight_bytes                                    # norm_f
    if time_cond:
        read(*_time_weights(cfg), batch)
    if logits_per_row:
        rows = batch * logits_per_row
        b["lm_head"] += V * H * weight_bytes
        b["activations"] += rows * H * act
        b["logits"] += rows * V * 4                                     # fp32 logits written
        flops += 2 * rows * V * H
    return {"bytes": sum(b.values()), "parts": b, "flops": flops, "distinct_experts": distinct}


def _positive_int(name: str, v, lo: int = 1, where: str = "estimate: ") -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{where}{name} must be an int >= {lo}, got {v!r}")
    return v


def _positive(name: str, v, optional: bool = True):
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"estimate: {name} must be a positive number{' or None' if optional else ''}, got {v!r}")
    return float(v)


def estimate(config, batch=1, ctx_len=4096, block_size=16, weight_bytes=2, bandwidth=None, flops=None,
             experts: str = "bf16") -> dict:
    """Bytes and FLOPs of an AR step (`ar_step_*`), a denoiser pass (`nfe_*`), a block extension
    (`extension_*`) and a mock-AR token (`mock_ar_token_*`: the denoiser over one token plus a one-token
    extension), for `batch` rows after `ctx_len` context tokens, with `weight_bytes` per weight (2: bf16).
    `*_parts` break the bytes down (PARTS); `distinct_experts_*` is the expected distinct experts per MoE
    layer. `experts`: the routed experts' storage (bf16 = unquantised, fp8, int4). Given `bandwidth` (bytes/s), and optionally `flops` (FLOP/s), also the roofline `*_ms`, which
    limit binds (`*_bound`), and `break_even_tokens_per_nfe` (inf: diffusion never wins)."""
    cfg = _config(config)
    batch = _positive_int("batch", batch)
    ctx_len = _positive_int("ctx_len", ctx_len, 0)
    S = _positive_int("block_size", block_size)
    weight_bytes = _positive("weight_bytes", weight_bytes, optional=False)
    bandwidth, flops = _positive("bandwidth", bandwidth), _positive("flops", flops)
    ctx = dict(time_cond=False, writes_cache=True, causal=True, experts=experts)
    passes = {
        "ar_step": pass_cost(cfg, batch, 1, ctx_len, weight_bytes, logits_per_row=1, **ctx),
        "nfe": pass_cost(cfg, batch, S, ctx_len, weight_bytes, logits_per_row=S, time_cond=True,
                         writes_cache=False, causal=False, experts=experts),
        "extension": pass_cost(cfg, batch, S, ctx_len, weight_bytes, logits_per_row=0, **ctx),
        "mock_ar_denoiser": pass_cost(cfg, batch, 1, max(0, ctx_len - 1), weight_bytes, logits_per_row=1,
                                      time_cond=False, writes_cache=False, causal=True, experts=experts),
        "mock_ar_extension": pass_cost(cfg, batch, 1, ctx_len, weight_bytes, logits_per_row=0, **ctx),
    }
    out = {"batch": batch, "ctx_len": ctx_len, "block_size": S, "weight_bytes": weight_bytes, "experts": experts,
           **{f"params_{k}": v for k, v in param_counts(cfg).items()}}
    for name in ("ar_step", "nfe", "extension"):
        p = passes[name]
        out.update({f"{name}_bytes": p["bytes"], f"{name}_flops": p["flops"], f"{name}_parts": p["parts"],
                    f"distinct_experts_{name}": p["distinct_experts"]})
    m1, m2 = passes["mock_ar_denoiser"], passes["mock_ar_extension"]
    out.update(mock_ar_token_bytes=m1["bytes"] + m2["bytes"], mock_ar_token_flops=m1["flops"] + m2["flops"])
    if bandwidth is None:
        return out
    out.update(bandwidth=bandwidth, flops_rate=flops)
    for name in ("ar_step", "nfe", "extension"):
        out[f"{name}_ms"], out[f"{name}_bound"] = roofline_ms(out[f"{name}_bytes"], out[f"{name}_flops"], bandwidth, flops)
    out["mock_ar_token_ms"] = sum(roofline_ms(p["bytes"], p["flops"], bandwidth, flops)[0] for p in (m1, m2))
    out["break_even_tokens_per_nfe"] = break_even(out["ar_step_ms"], out["nfe_ms"], out["extension_ms"], S)
    return out


def roofline_ms(nbytes: float, nflops: float, bandwidth: float, flops: float | None) -> tuple[float, str]:
    """(ms, 'memory' | 'compute'): the larger of the time to move the bytes and to do the FLOPs."""
    t_mem = nbytes / bandwidth
    t_fl = nflops / flops if flops else 0.0
    return max(t_mem, t_fl) * 1e3, "compute" if t_fl > t_mem else "memory"


def break_even(ar_ms: float, nfe_ms: float, ext_ms: float, block_size: int) -> float:
    """Tokens per denoiser pass at which a block (block_size / tau passes + one extension) costs as much
    as block_size AR steps; inf when the extension alone costs that much. Above block_size diffusion
    cannot win at all (a block needs at least one pass)."""
    room = block_size * ar_ms - ext_ms
    return block_size * nfe_ms / room if room > 0 else math.inf


def speedup_over_ar(est: dict, tokens_per_nfe: float) -> float:
    """Predicted wall-clock speed-up of diffusion over AR at `tokens_per_nfe` (an `estimate` with bandwidth)."""
    S = est["block_size"]
    tau = min(float(tokens_per_nfe), S)
    return S * est["ar_step_ms"] / (S / tau * est["nfe_ms"] + est["extension_ms"])


# ----------------------------------------------------------------------------------------------------
# distinct experts actually touched


def distinct_experts(expert_ids, n_experts: int):
    """Number of distinct expert ids in `expert_ids` (any integer tensor, e.g. the router's [T, k]
    choice), as a 0-dim int64 tensor on its device: no host read, fixed shapes, so it can sit inside a
    captured CUDA graph. Ids must lie in [0, n_experts) (checked by index_fill_; not on the host).

    Wiring, one line after routing in a MoE layer and one read at the end of a run:
        tally = torch.zeros(n_layers, dtype=torch.long, device=dev)       # per run
        tally[layer] += distinct_experts(idx, cfg.n_routed_experts)       # per pass, per MoE layer
        touched = tally.tolist()                                          # once, after the run
    Divided by the passes, that is the measured counterpart of `distinct_experts_nfe`."""
    import torch

    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise ValueError(f"distinct_experts: expert_ids must be an integer tensor, got "
                         f"{getattr(expert_ids, 'dtype', type(expert_ids).__name__)}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"distinct_experts: n_experts must be an int >= 1, got {n_experts!r}")
    seen = torch.zeros(n_experts, dtype=torch.bool, device=expert_ids.device)
    return seen.index_fill_(0, expert_ids.reshape(-1).long(), True).sum()


# ----------------------------------------------------------------------------------------------------
# the table and the CLI


def roofline_rows(config, device: Device, weight_bytes: float = 2, ctx_len: int = 4096, block_size: int = 16,
                  batches=BATCHES, tokens_per_nfe: float = 3.0, experts: str = "bf16") -> list[dict]:
    """One row per batch: bytes and predicted ms of each pass, the binding limit, the break-even tokens per
    pass and the predicted speed-up over AR at `tokens_per_nfe`."""
    rows = []
    for b in batches:
        e = estimate(config, b, ctx_len, block_size, weight_bytes, device.bandwidth, device.flops, experts)
        be = e["break_even_tokens_per_nfe"]
        rows.append({"batch": b, "AR step GB": e["ar_step_bytes"] / 1e9, "AR ms": e["ar_step_ms"],
                     "pass GB": e["nfe_bytes"] / 1e9, "pass ms": e["nfe_ms"],
                     "ext GB": e["extension_bytes"] / 1e9, "ext ms": e["extension_ms"],
                     "bound (AR/pass/ext)": "/".join(e[f"{p}_bound"][0] for p in ("ar_step", "nfe", "extension")),
                     "experts/layer (AR/pass)": f"{e['distinct_experts_ar_step']:.1f}/{e['distinct_experts_nfe']:.1f}",
                     "break-even tok/pass": be if be <= block_size else "never",
                     f"x AR at {tokens_per_nfe:g} tok/pass": speedup_over_ar(e, tokens_per_nfe)})
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table (numbers to 3 significant digits)."""
    fmt = lambda v: (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}") if isinstance(v, float) else str(v)  # noqa: E731
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
