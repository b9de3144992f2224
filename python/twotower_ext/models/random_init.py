"""Random-weight checkpoints in NVIDIA's format, for benchmarks and tests at any width.

`scaled_config` shrinks config.REAL_CONFIG (Nemotron-TwoTower-30B-A3B's config): its
widths and/or layer count while keeping the layer pattern's structure. The weights are scaled so
activations stay O(1) through many layers (like an initialised model, not a trained one).
"""
from __future__ import annotations

import json
import math
import os

import torch

from .config import REAL_CONFIG, REAL_PATTERN, NemotronHConfig
from .safetensors_io import save_file
from .weights import build_weights

def scaled_config(width: float = 1.0, layers: int | None = None, vocab: int | None = None, **over) -> dict:
    """REAL_CONFIG with hidden/head counts/expert widths times `width`, the first `layers` layers of the
    pattern (None: all 52) and an optional vocab size."""
    c = dict(REAL_CONFIG)
    s = lambda v, q=1: max(q, int(round(v * width / q)) * q)  # noqa: E731
    c.update(hidden_size=s(2688, 64), num_attention_heads=s(32, 2), mamba_num_heads=s(64, 8), n_groups=s(8, 1),
             moe_intermediate_size=s(1856, 16), moe_shared_expert_intermediate_size=s(3712, 16),
             n_routed_experts=s(128, 8))
    c["num_experts_per_tok"] = min(c["num_experts_per_tok"], c["n_routed_experts"])
    while c["mamba_num_heads"] % c["n_groups"]:
        c["n_groups"] -= 1
    if layers is not None:
        c["hybrid_override_pattern"] = REAL_PATTERN[:layers]
        c["num_hidden_layers"] = layers
    if vocab is not None:
        c["vocab_size"] = vocab
    c.update(over)
    return c


def random_weights(cfg: NemotronHConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{NVIDIA name: tensor} with an initialisation that keeps a deep stack numerically tame."""
    _, targets = build_weights(cfg, torch.float32, "meta", "meta")
    g = torch.Generator().manual_seed(seed)
    out = {}
    depth = math.sqrt(2 * cfg.num_hidden_layers)
    for name, meta in targets.items():
        shape = tuple(meta.shape)
        leaf = name.rsplit(".", 1)[-1] if not name.startswith("scale_shift_tables") else "table"
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            t = torch.ones(shape)
        elif leaf == "A_log":
            t = torch.log(torch.empty(shape).uniform_(1, 16, generator=g))
        elif leaf == "D":
            t = torch.ones(shape)
        elif leaf == "dt_bias":
            dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
            t = dt + torch.log(-torch.expm1(-dt))          # inverse softplus
        elif leaf == "e_score_correction_bias" or leaf == "bias":
            t = torch.zeros(shape)
        elif leaf == "table":
            t = torch.randn(shape, generator=g) * 0.02
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if "out_proj" in name or "o_proj" in name or "down_proj" in name:
                t /= depth
        out[name] = t.to(torch.float32 if leaf in ("A_log", "D", "dt_bias", "e_score_correction_bias")
                         or ".gate." in name else dtype)
    return out


def write_checkpoint(path: str, config: dict, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """Write model.safetensors (atomically: a crash never leaves a half file) and config.json (NVIDIA's
    keys; `Infinity` as NVIDIA writes it) into the directory `path`."""
    os.makedirs(path, exist_ok=True)
    NemotronHConfig.from_dict(config)  # validate before writing
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, {"format": "pt", **(metadata or {})})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)  # json writes math.inf as Infinity, like NVIDIA's file
        f.write("\n")
    return path


def random_checkpoint(path: str, config: dict, seed: int = 0, dtype=torch.float32) -> str:
    """A random-weight checkpoint directory for `config` (a dict of NVIDIA config keys)."""
    cfg = NemotronHConfig.from_dict(config)
    return write_checkpoint(path, config, random_weights(cfg, seed, dtype))
