"""NemotronH / Nemotron-TwoTower configuration: parsing NVIDIA's config.json and validating it.

NVIDIA's config.json is not strict JSON (`"time_step_limit": [0.0, Infinity]`); Python's json module reads
it. Every problem found is reported at once in a `ConfigError` naming the field.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields

# hybrid_override_pattern characters -> mixer kind
MIXERS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


# Nemotron-TwoTower-30B-A3B's config (the real model: the cost model, `twotower info --real-config`, and
# random_init.scaled_config's starting point).
REAL_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
REAL_CONFIG = {
    "architectures": ["NemotronHTwoTowerForCausalLM"], "model_type": "nemotron_h",
    "hidden_size": 2688, "num_hidden_layers": 52, "hybrid_override_pattern": REAL_PATTERN,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 128, "conv_kernel": 4,
    "chunk_size": 128, "use_conv_bias": True, "n_routed_experts": 128, "num_experts_per_tok": 6,
    "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "layer_norm_epsilon": 1e-5, "vocab_size": 131072,
    "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0, "time_step_limit": [0.0, math.inf],
    "residual_in_fp32": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

class ConfigError(ValueError):
    """config.json is missing fields or its fields are inconsistent."""


@dataclass(frozen=True)
class NemotronHConfig:
    hidden_size: int
    num_hidden_layers: int
    hybrid_override_pattern: str
    vocab_size: int
    layer_norm_epsilon: float = 1e-5
    # attention
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    # Mamba-2
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    n_groups: int = 1
    ssm_state_size: int = 0
    conv_kernel: int = 4
    use_conv_bias: bool = True
    chunk_size: int = 128
    time_step_limit: tuple = (0.0, math.inf)
    # MoE
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    # dense MLP layers ("-")
    intermediate_size: int = 0
    # misc
    residual_in_fp32: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    # fields config.json left out or set to null ({name: "absent" | "null"}), for the validation messages
    unset: dict = field(default_factory=dict, compare=False, repr=False)

    # -------------------------------------------------------------------- derived sizes
    @property
    def layer_kinds(self) -> list[str]:
        return [MIXERS[c] for c in self.hybrid_override_pattern]

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == kind]

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    # -------------------------------------------------------------------- parsing
    @classmethod
    def from_dict(cls, d: dict) -> "NemotronHConfig":
        problems = []
        names = {f.name for f in fields(cls)} - {"extra", "unset"}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        unset = {k: "null" if k in d else "absent" for k in names if k not in kw}
        for req in ("hidden_size", "num_hidden_layers", "hybrid_override_pattern", "vocab_size"):
            if req not in kw:
                problems.append(f"missing required field '{req}'" + (" (it is null)" if req in d else ""))
        problems += _type_problems(cls, kw)
        if "layer_norm_epsilon" not in kw and "norm_eps" in d:
            kw["layer_norm_epsilon"] = d["norm_eps"]
        if isinstance(kw.get("time_step_limit"), (list, tuple)):
            try:
                kw["time_step_limit"] = tuple(float(v) for v in kw["time_step_limit"])
            except (TypeError, ValueError):
                problems.append(f"time_step_limit must be [min, max] numbers, got {d['time_step_limit']!r}")
                kw.pop("time_step_limit")
        if problems:
            raise ConfigError("invalid NemotronH config: " + "; ".join(problems))
        pattern = kw["hybrid_override_pattern"]
        if "head_dim" not in kw and "num_attention_heads" in kw and "*" in str(pattern):
            kw["head_dim"] = kw["hidden_size"] // max(1, int(kw["num_attention_heads"]))
        # "unset" in a config.json is this class's own bookkeeping field, leaked by earlier saves: not an extra.
        cfg = cls(**kw, extra={k: v for k, v in d.items() if k not in names and k != "unset"}, unset=unset)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str) -> "NemotronHConfig":
        """Read config.json (a file, or a checkpoint directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)  # accepts NVIDIA's Infinity
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    # -------------------------------------------------------------------- validation
    def validate(self) -> None:
        p = []

        def positive(*names):
            for n in names:
                v = getattr(self, n)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    got = f"config.json has it {self.unset[n]}" if n in self.unset else f"got {v!r}"
                    p.append(f"{n} must be a positive integer, {got}")

        positive("hidden_size", "num_hidden_layers", "vocab_size")
        pat = self.hybrid_override_pattern
        if not isinstance(pat, str):
            p.append(f"hybrid_override_pattern must be a string, got {pat!r}")
            raise ConfigError("invalid NemotronH config: " + "; ".join(p))
        bad = sorted(set(pat) - set(MIXERS))
        if bad:
            p.append(f"hybrid_override_pattern has unknown mixer characters {bad} (known: {''.join(MIXERS)})")
        if isinstance(self.num_hidden_layers, int) and len(pat) != self.num_hidden_layers:
            p.append(f"hybrid_override_pattern has {len(pat)} layers but num_hidden_layers = {self.num_hidden_layers}")
        if not self.layer_norm_epsilon > 0:
            p.append(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        if "*" in pat:
            positive("num_attention_heads", "num_key_value_heads", "head_dim")
            if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
                p.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({self.num_key_value_heads})")
        if "M" in pat:
            positive("mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel")
            if self.n_groups > 0 and self.mamba_num_heads % self.n_groups:
                p.append(f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
            d_inner = self.extra.get("mamba_d_inner", self.extra.get("d_inner"))
            if d_inner is not None and d_inner != self.d_inner:
                p.append(f"mamba_num_heads x mamba_head_dim = {self.d_inner} but d_inner = {d_inner}")
            lo, hi = self.time_step_limit if len(self.time_step_limit) == 2 else (None, None)
            if lo is None or not lo <= hi:
                p.append(f"time_step_limit must be [min, max] with min <= max, got {list(self.time_step_limit)}")
            act = self.extra.get("mamba_hidden_act", "silu")
            if act not in ("silu", "swish"):
                p.append(f"mamba_hidden_act {act!r} is not supported (only silu)")
            if self.extra.get("use_bias"):
                p.append("use_bias=true (Mamba in/out projection bias) is not supported")
        if "E" in pat:
            positive("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "moe_shared_expert_intermediate_size", "n_group", "topk_group")
            if self.num_experts_per_tok > self.n_routed_experts:
                p.append(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                         f"({self.n_routed_experts})")
            if self.n_group > 0 and self.n_routed_experts % self.n_group:
                p.append(f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                p.append(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                p.append("grouped routing (n_group > 1) needs at least 2 experts per group")
            if self.extra.get("moe_latent_size") is not None:
                p.append("moe_latent_size (latent MoE projections) is not supported")
        if "-" in pat:
            positive("intermediate_size")
        if ("E" in pat or "-" in pat) and self.extra.get("mlp_hidden_act", "relu2") != "relu2":
            p.append(f"mlp_hidden_act {self.extra['mlp_hidden_act']!r} is not supported (only relu2)")
        for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if self.extra.get(flag):
                p.append(f"{flag}=true is not supported")
        if p:
            raise ConfigError("invalid NemotronH config: " + "; ".join(p))


_JSON_TYPES = {"int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
               "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
               "bool": ("true or false", lambda v: isinstance(v, bool)),
               "str": ("a string", lambda v: isinstance(v, str)),
               "tuple": ("a list", lambda v: isinstance(v, (list, tuple)))}


def _type_problems(cls, kw: dict) -> list[str]:
    """'<field> must be <type>, got <value>' for every given field whose JSON type is wrong (so that the
    checks after it compare numbers with numbers)."""
    out = []
    for f in fields(cls):
        want = _JSON_TYPES.get(f.type)
        if f.name in kw and want is not None and not want[1](kw[f.name]):
            out.append(f"{f.name} must be {want[0]}, got {kw[f.name]!r}")
    return out
