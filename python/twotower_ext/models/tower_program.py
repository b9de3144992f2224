"""The layer table of a tower for `ops.tower_layers` (csrc/tower/tower_torch.cpp): the CPU runs a decode pass's
layer loop (models/towers.py) as one op, calling the same ops in the same order from C++, because from Python the
glue between ~250 small ops was ~45% of a 2-thread AR step (the op's file says more). Built once per tower.

Three streams, read in order by the op (keep the two in step):

- ints: [layers], then per layer [kind, modulate_first of the next norm] and the kind's ints;
- floats: [eps], then per layer the kind's floats;
- weights (tensor or None): per layer the kind's weights, then the norm after it (the next layer's; the last layer's
  the final norm, or None where the tower adds its last output without one: the context tower).

Per kind (the op's `states` list, CacheStore.layer_states, holds each layer's cache tensors in the same order):

- mamba (kind 0): weights in_proj, out_proj, conv_w [C, K], conv_b or None, dt_bias, A_log, D, norm; ints in_proj n,
  out_proj n, d_inner, conv_dim, heads, norm group; floats dt_min, dt_max. States: conv, ssm.
- attention (1): weights q, k, v, o; ints q n, k n, v n, o n, q heads, kv heads, head_dim; floats scale. States: the
  k and v stores.
- moe (2): weights router, bias (fp64), up, down, up scale or None, down scale or None, shared up, shared down; ints
  k, n_group, topk_group, norm_topk_prob, group_size, shared inter; floats routed_scaling_factor.
- mlp (3): weights up, down; ints up n, down n.

Linear weights are the PackedLinear's data (n in the ints); the experts as `ops.quantized_args` gives them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..packed import PackedLinear
from .config import NemotronHConfig
from .layers import modulates_first

KINDS = {"mamba": 0, "attention": 1, "moe": 2, "mlp": 3}
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class TowerProgram:
    weights: list
    ints: list
    floats: list


def _packed(w, dtype) -> bool:
    return isinstance(w, PackedLinear) and w.dtype == dtype and w.device.type == "cpu"


def _plain(t, dtype) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == dtype and t.device.type == "cpu"


def eligible(layers, dtype: torch.dtype, final_norm=None) -> str | None:
    """Why these layers cannot run as one op (a short reason), or None when they can: the CPU kernels' inputs
    throughout (model dtype float32 / bfloat16, every linear packed in it, every norm weight in it, the shared
    experts packed), the cases where towers.py's loop calls each op's kernel, so the op's calls are the loop's."""
    if dtype not in DTYPES:
        return f"dtype {dtype} (the op takes float32 / bfloat16)"
    norms = [layer.norm for layer in layers] + ([] if final_norm is None else [final_norm])
    if not all(_plain(t, dtype) for t in norms):
        return "a norm weight off the CPU or in another dtype"
    for i, layer in enumerate(layers):
        w = layer.mixer
        if layer.kind not in KINDS:
            return f"layer {i} of kind {layer.kind!r}"
        if layer.kind == "mamba":
            linears, plain = (w.in_proj, w.out_proj), (w.conv_w, w.norm)
        elif layer.kind == "attention":
            linears, plain = (w.q, w.k, w.v, w.o), ()
        elif layer.kind == "moe":
            linears, plain = (w.shared.up, w.shared.down), ()
            if not (isinstance(w.router, torch.Tensor) and w.router.dtype in (torch.float32, torch.float64)
                    and w.router.device.type == "cpu"):
                return f"layer {i}'s router is not an fp32 / fp64 CPU tensor"
        else:
            linears, plain = (w.up, w.down), ()
        if not all(_packed(lin, dtype) for lin in linears):
            return f"layer {i} ({layer.kind}) has a linear weight that is not packed in {dtype} on the CPU"
        if not all(_plain(t, dtype) for t in plain):
            return f"layer {i} ({layer.kind}) has a weight off the CPU or in another dtype"
    return None


def build(layers, cfg: NemotronHConfig, dtype: torch.dtype, final_norm=None,
          modulate_first: bool = False) -> TowerProgram | None:
    """The table of `layers` (weights.Layer list) in the layout above, or None when `eligible` says no (the tower then
    runs towers.py's loop). final_norm: the norm after the last layer (None: a plain add). modulate_first: the
    denoiser's rule, the adaLN modulation before the norm of Mamba and attention layers (the context tower: False)."""
    if eligible(layers, dtype, final_norm) is not None:
        return None
    weights, ints, floats = [], [len(layers)], [float(cfg.layer_norm_epsilon)]
    for i, layer in enumerate(layers):
        w = layer.mixer
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        ints += [KINDS[layer.kind], int(modulate_first and nxt is not None and modulates_first(nxt.kind))]
        if layer.kind == "mamba":
            conv_w = w.conv_w.squeeze(1) if w.conv_w.dim() == 3 else w.conv_w
            weights += [w.in_proj.data, w.out_proj.data, conv_w, w.conv_b, w.dt_bias, w.A_log, w.D, w.norm]
            ints += [w.in_proj.n, w.out_proj.n, cfg.d_inner, cfg.conv_dim, cfg.mamba_num_heads,
                     cfg.d_inner // cfg.n_groups]
            floats += [float(v) for v in cfg.time_step_limit]
        elif layer.kind == "attention":
            weights += [w.q.data, w.k.data, w.v.data, w.o.data]
            ints += [w.q.n, w.k.n, w.v.n, w.o.n, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim]
            floats += [cfg.head_dim ** -0.5]
        elif layer.kind == "moe":
            up, down, up_scale, down_scale, group = ops.quantized_args(cfg.hidden_size, w.up, w.down)
            bias = w.bias if w.bias.dtype == torch.float64 else w.bias.double()
            weights += [w.router, bias, up, down, up_scale, down_scale, w.shared.up.data, w.shared.down.data]
            ints += [cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, int(bool(cfg.norm_topk_prob)), group,
                     w.shared.up.n]
            floats += [float(cfg.routed_scaling_factor)]
        else:
            weights += [w.up.data, w.down.data]
            ints += [w.up.n, w.down.n]
        weights.append(nxt.norm if nxt is not None else final_norm)
    return TowerProgram(weights, ints, floats)
