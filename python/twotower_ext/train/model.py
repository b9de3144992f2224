"""The NemotronH two-tower model in differentiable PyTorch, for training.

The weights are the inference model's own `TwoTowerWeights` (models/weights.py, laid out by NVIDIA's
names) with every tensor turned into a trainable `nn.Parameter` in place: the checkpoint name -> tensor
map of `build_weights` keeps pointing at them, so saving writes exactly the names and shapes
`expected_tensors` lists and `tt.load` reads the result like NVIDIA's checkpoint. Layer math reuses the
inference functions (ops.rms_norm, ops.gated_rms_norm, moe, time_modulation: the ops take their plain PyTorch
reference under autograd); only what inference does
with non-differentiable ops or sequentially is written here:

- Mamba-2: the chunked (SSD) form of the same recurrence (models/ssd.py, the function the inference model's
  long prefill uses, differentiable when autograd is on), parallel inside chunks of `chunk` tokens with a
  short state-passing loop between chunks. It returns the conv and SSM states at every chunk boundary:
  with chunk = block size these are exactly the states the denoiser is seeded with at each block.
- attention: scaled_dot_product_attention, causal for the context tower; for the denoiser every block of
  a sequence is trained at once with one block-structured mask over [context K/V | block K/V].
"""
from __future__ import annotations

import math
import os
from dataclasses import fields, is_dataclass

import torch
import torch.nn.functional as F

from .. import ops, reference
from ..models.config import NemotronHConfig
from ..models.layers import mlp, modulates_first, moe, route, time_modulation
from ..models.random_init import write_checkpoint
from ..models.safetensors_io import SafetensorsFile
from ..models.ssd import ssd_chunked_scan
from ..models.weights import (AttentionWeights, MambaWeights, MoEWeights, TwoTowerWeights,
                              build_weights, checkpoint_index, check_checkpoint, expected_tensors)

# config.json keys NVIDIA's checkpoints carry beyond NemotronHConfig's fields (values as theirs)
_NVIDIA_EXTRA = {
    "architectures": ["NemotronHTwoTowerForCausalLM"], "model_type": "nemotron_h", "attention_bias": False,
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "mamba_hidden_act": "silu", "mamba_proj_bias": False,
    "mlp_bias": False, "mlp_hidden_act": "relu2", "n_shared_experts": 1, "tie_word_embeddings": False,
    "use_bias": False, "use_cache": True, "rope_theta": 10000, "initializer_range": 0.02,
    "rescale_prenorm_residual": True, "num_logits_to_keep": 1, "sliding_window": None,
}


# ----------------------------------------------------------------------------------------------------
# configs and checkpoints


def make_config(**kw) -> NemotronHConfig:
    """A NemotronHConfig from keyword fields (validated)."""
    kw.setdefault("num_hidden_layers", len(kw.get("hybrid_override_pattern", "")))
    return NemotronHConfig.from_dict(kw)


def config_dict(cfg: NemotronHConfig, max_position_embeddings: int = 4096) -> dict:
    """config.json content in NVIDIA's layout (their keys; `time_step_limit` written as [0.0, Infinity])."""
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("extra", "unset")}   # bookkeeping
    d["time_step_limit"] = list(cfg.time_step_limit)
    d["norm_eps"] = cfg.layer_norm_epsilon
    d["expand"] = cfg.d_inner // cfg.hidden_size if cfg.d_inner % cfg.hidden_size == 0 else cfg.d_inner / cfg.hidden_size
    d["max_position_embeddings"] = max_position_embeddings
    d.update(_NVIDIA_EXTRA)
    d.update({k: v for k, v in cfg.extra.items() if k not in d})
    return dict(sorted(d.items()))


class TrainModel:
    """TwoTowerWeights as trainable parameters, plus the checkpoint name map. `context_params()` /
    `denoiser_params()` split them into the context tower + context_lm_head and the denoiser tower +
    lm_head + time conditioning."""

    def __init__(self, cfg: NemotronHConfig):
        self.cfg = cfg
        self.w, self.targets = build_weights(cfg, torch.float32, "cpu", "cpu")
        self._params = {}
        for owner in (self.w.context, self.w.denoiser, self.w.time):
            self._parametrize(owner)
        self._ctx = self._collect(self.w.context)
        self._den = self._collect(self.w.denoiser) + self._collect(self.w.time)

    # every tensor field of the (nested) weight dataclasses becomes a Parameter sharing its storage
    def _parametrize(self, obj):
        for f in fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, torch.Tensor):
                key = id(v)
                if key not in self._params:
                    self._params[key] = torch.nn.Parameter(v)
                setattr(obj, f.name, self._params[key])
            elif is_dataclass(v):
                self._parametrize(v)
            elif isinstance(v, list):
                for item in v:
                    self._parametrize(item)

    def _collect(self, obj) -> list[torch.nn.Parameter]:
        out = []
        for f in fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, torch.nn.Parameter):
                out.append(v)
            elif is_dataclass(v):
                out += self._collect(v)
            elif isinstance(v, list):
                for item in v:
                    out += self._collect(item)
        return out

    def context_params(self) -> list[torch.nn.Parameter]:
        return self._ctx

    def denoiser_params(self) -> list[torch.nn.Parameter]:
        return self._den

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._ctx + self._den

    def no_decay_ids(self) -> set[int]:
        """ids of the parameters weight decay must skip: vectors, depthwise conv kernels, adaLN tables."""
        out = {id(p) for p in self.parameters() if p.dim() < 2}
        out.add(id(self.w.time.tables))
        for tower in (self.w.context, self.w.denoiser):
            out |= {id(l.mixer.conv_w) for l in tower.layers if l.kind == "mamba"}
        return out

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """{NVIDIA name: tensor} (views of the parameters)."""
        return {k: v.detach() for k, v in self.targets.items()}

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Initialisation: normal(std) matrices and embeddings, residual output projections scaled by
        1/sqrt(2 layers), norms 1, Mamba A in [1, 16], dt in [1e-3, 1e-1] through dt_bias, D = 1. The time
        conditioning starts neutral (shift 0, scale 0, gate 1, t_block 0) so a denoiser copied from the
        context tower starts out computing the context tower's function."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)

        def normal(t, s=std):
            t.copy_(torch.randn(t.shape, generator=g) * s)

        def uniform(t, lo, hi):
            t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

        for tower in (self.w.context, self.w.denoiser):
            normal(tower.embeddings)
            normal(tower.lm_head)
            tower.norm_f.fill_(1.0)
            for layer in tower.layers:
                layer.norm.fill_(1.0)
                m = layer.mixer
                if isinstance(m, MambaWeights):
                    normal(m.in_proj)
                    normal(m.out_proj, out_std)
                    bound = 1.0 / math.sqrt(cfg.conv_kernel)
                    uniform(m.conv_w, -bound, bound)
                    if m.conv_b is not None:
                        uniform(m.conv_b, -bound, bound)
                    m.A_log.copy_(torch.log(torch.rand(m.A_log.shape, generator=g) * 15 + 1))
                    dt = torch.exp(torch.rand(m.dt_bias.shape, generator=g) * (math.log(0.1) - math.log(1e-3))
                                   + math.log(1e-3))
                    m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
                    m.D.fill_(1.0)
                    m.norm.fill_(1.0)
                elif isinstance(m, AttentionWeights):
                    for t in (m.q, m.k, m.v):
                        normal(t)
                    normal(m.o, out_std)
                elif isinstance(m, MoEWeights):
                    normal(m.router)
                    m.bias.zero_()
                    normal(m.up)
                    normal(m.down, out_std)
                    normal(m.shared.up)
                    normal(m.shared.down, out_std)
                else:
                    normal(m.up)
                    normal(m.down, out_std)
        t = self.w.time
        for x in (t.emb0_w, t.emb2_w):
            normal(x)
        for x in (t.emb0_b, t.emb2_b, t.block_w, t.block_b):
            x.zero_()
        t.tables.zero_()
        t.tables[:, 2].fill_(1.0)   # gate

    @torch.no_grad()
    def copy_context_to_denoiser(self) -> None:
        """Start the denoiser as a copy of the (trained) context tower, lm_head from context_lm_head."""
        for name, t in self.targets.items():
            if name.startswith("denoiser_tower."):
                t.copy_(self.targets["context_tower." + name[len("denoiser_tower."):]])
        self.targets["lm_head.weight"].copy_(self.targets["context_lm_head.weight"])

    # ------------------------------------------------------------------------------------------------
    def save(self, out_dir: str, dtype: torch.dtype = torch.float32, metadata: dict | None = None,
             tokenizer: str | None = None) -> None:
        """Write config.json + model.safetensors (NVIDIA's names) [+ tokenizer.json] into out_dir.
        Mamba A_log / D / dt_bias and the router stay fp32 whatever `dtype` (as NVIDIA ships them)."""
        keep32 = (".A_log", ".D", ".dt_bias", ".gate.weight", ".gate.e_score_correction_bias")
        tensors = {k: (v if k.endswith(keep32) else v.to(dtype)).contiguous().clone()
                   for k, v in self.named_tensors().items()}
        cfg = config_dict(self.cfg)
        cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
        write_checkpoint(out_dir, cfg, tensors, metadata)
        if tokenizer is not None:
            with open(tokenizer) as src, open(os.path.join(out_dir, "tokenizer.json"), "w") as dst:
                dst.write(src.read())

    @torch.no_grad()
    def load(self, path: str) -> None:
        """Fill the parameters from an NVIDIA-format checkpoint of this config."""
        index = checkpoint_index(path)
        check_checkpoint(index, expected_tensors(self.cfg), path)
        for file in sorted({f for f, _ in index.values()}):
            with SafetensorsFile(file) as f:
                for name in f.keys():
                    self.targets[name].copy_(f.get(name))


# ----------------------------------------------------------------------------------------------------
# Mamba-2


def mamba_train(h: torch.Tensor, w: MambaWeights, cfg: NemotronHConfig, chunk: int, conv_state=None,
                ssm_state=None, states: bool = False):
    """The Mamba-2 mixer of layers.mamba_mixer (same function) over h [B, L, hidden], seeded from conv_state [B, K-1, conv_dim] / ssm_state [B, H, P, N] (zeros when None). With
    states=True also returns (conv [B, L/chunk, K-1, conv_dim], ssm [B, L/chunk, H, P, N]): the states
    before every chunk, i.e. what a denoiser block starting there is seeded with; L a multiple of chunk)."""
    B, L, _ = h.shape
    K, C, H, P = cfg.conv_kernel, cfg.conv_dim, cfg.mamba_num_heads, cfg.mamba_head_dim
    G, N = cfg.n_groups, cfg.ssm_state_size
    z, xbc, dt = ops.linear(h, w.in_proj).split([cfg.d_inner, C, H], dim=-1)
    if conv_state is None:
        conv_state = xbc.new_zeros(B, K - 1, C)
    raw = torch.cat([conv_state.to(xbc.dtype), xbc], dim=1)                 # [B, K-1+L, C]
    # depthwise causal conv as K shifted multiply-adds: same sums as F.conv1d, ~5x cheaper backward on CPU
    cw = w.conv_w.view(C, K)
    conv = raw[:, :L] * cw[:, 0]
    for k in range(1, K):
        conv = conv + raw[:, k:k + L] * cw[:, k]
    if w.conv_b is not None:
        conv = conv + w.conv_b
    act = F.silu(conv)
    x, Bm, Cm = act.split([cfg.d_inner, G * N, G * N], dim=-1)
    lo, hi = cfg.time_step_limit
    dt = F.softplus(dt.float() + w.dt_bias).clamp(lo, hi)
    A = -torch.exp(w.A_log)
    x4 = x.reshape(B, L, H, P)
    y, _, ssm = ssd_chunked_scan(x4.float(), dt, A, Bm.reshape(B, L, G, N).float(), Cm.reshape(B, L, G, N).float(),
                                 w.D, ssm_state, chunk, return_chunk_states=True)
    y = y.reshape(B, L, -1).to(h.dtype)
    out = ops.linear(ops.gated_rms_norm(y, z, w.norm, cfg.d_inner // cfg.n_groups, cfg.layer_norm_epsilon), w.out_proj)
    if not states:
        return out
    conv_states = raw[:, :L].unfold(1, K - 1, chunk).transpose(-1, -2)      # [B, L/chunk, K-1, C]
    return out, (conv_states, ssm)


# ----------------------------------------------------------------------------------------------------
# towers


def _qkv(h, a: AttentionWeights, cfg: NemotronHConfig):
    B, L, _ = h.shape
    q = ops.linear(h, a.q).view(B, L, cfg.num_attention_heads, cfg.head_dim)
    k = ops.linear(h, a.k).view(B, L, cfg.num_key_value_heads, cfg.head_dim)
    v = ops.linear(h, a.v).view(B, L, cfg.num_key_value_heads, cfg.head_dim)
    return q, k, v


def _attend(q, k, v, a: AttentionWeights, cfg: NemotronHConfig, mask=None, causal=False):
    B, L = q.shape[:2]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal, scale=cfg.head_dim ** -0.5, enable_gqa=True)
    return ops.linear(o.transpose(1, 2).reshape(B, L, -1), a.o)


def context_forward(w: TwoTowerWeights, cfg: NemotronHConfig, ids: torch.Tensor, block: int = 16,
                    collect: bool = False, loads: dict | None = None):
    """The context tower as a causal LM over ids [B, L] (fresh state). Returns
    context_lm_head logits [B, L, V] fp32 (position i predicts token i+1); with collect=True also
    {layer: (k, v)} for attention layers ([B, L, Hkv, D]) and {layer: (conv, ssm)} block-boundary Mamba
    states for Mamba layers (see mamba_train; L a multiple of block), which is everything the denoiser reads. `loads`, when
    given, accumulates {MoE layer: tokens per expert}."""
    tw, eps = w.context, cfg.layer_norm_epsilon
    kv, mstates = {}, {}
    x = F.embedding(ids, tw.embeddings)
    for i, layer in enumerate(tw.layers):
        h = ops.rms_norm(x, layer.norm, eps)
        if layer.kind == "mamba":
            out = mamba_train(h, layer.mixer, cfg, block, states=collect)
            if collect:
                out, mstates[i] = out
        elif layer.kind == "attention":
            q, k, v = _qkv(h, layer.mixer, cfg)
            out = _attend(q, k, v, layer.mixer, cfg, causal=True)
            if collect:
                kv[i] = (k, v)
        elif layer.kind == "moe":
            out = _moe(h, layer.mixer, cfg, loads, i)
        else:
            out = mlp(h, layer.mixer)
        x = x + out
    logits = ops.linear(ops.rms_norm(x, tw.norm_f, eps), tw.lm_head).float()
    return (logits, kv, mstates) if collect else logits


def block_mask(L: int, block: int, device=None) -> torch.Tensor:
    """[L, 2L] bool: query i (in block b = i // block) sees context keys j < b*block and the block keys of
    its own block (bidirectional) - the denoiser's attention for every block of a sequence at once."""
    i = torch.arange(L, device=device)
    qb = i // block
    ctx = i[None, :] < (qb * block)[:, None]
    own = qb[:, None] == qb[None, :]
    return torch.cat([ctx, own], dim=1)


def denoiser_forward(w: TwoTowerWeights, cfg: NemotronHConfig, noisy: torch.Tensor, t: torch.Tensor, kv: dict,
                     mstates: dict, block: int = 16, loads: dict | None = None) -> torch.Tensor:
    """Every block of noisy [B, L] at once: block b (tokens [b*block, (b+1)*block)) at time t[B, b],
    attending to the context tower's K/V of the tokens before it plus its own block, Mamba seeded with the
    context states at its start (kv, mstates from context_forward(collect=True)). Returns lm_head logits
    [B, L, V] fp32 (position j predicts the token at j)."""
    dw, tables, eps = w.denoiser, w.time.tables, cfg.layer_norm_epsilon
    B, L = noisy.shape
    nb = L // block
    mod = time_modulation(t.reshape(-1), w.time, torch.float32)             # [B*nb, 3, H]
    mask = block_mask(L, block, noisy.device)
    x = F.embedding(noisy, dw.embeddings).view(B * nb, block, -1)
    for i, layer in enumerate(dw.layers):
        shift, scale, gate = (tables[i][None] + mod).unbind(1)
        if modulates_first(layer.kind):       # modulate, then norm (as the inference denoiser)
            h = ops.rms_norm(x, layer.norm, eps, shift, scale, modulate_first=True)
        else:
            h = ops.rms_norm(x, layer.norm, eps, shift, scale)
        if layer.kind == "mamba":
            conv, ssm = mstates[i]
            out = mamba_train(h, layer.mixer, cfg, block, conv.reshape(B * nb, *conv.shape[2:]),
                              ssm.reshape(B * nb, *ssm.shape[2:]))
        elif layer.kind == "attention":
            q, k, v = _qkv(h.reshape(B, L, -1), layer.mixer, cfg)
            ck, cv = kv[i]
            out = _attend(q, torch.cat([ck, k], 1), torch.cat([cv, v], 1), layer.mixer, cfg, mask=mask)
            out = out.view(B * nb, block, -1)
        elif layer.kind == "moe":
            out = _moe(h, layer.mixer, cfg, loads, i)
        else:
            out = mlp(h, layer.mixer)
        x = x + gate.unsqueeze(1) * out
    return ops.linear(ops.rms_norm(x, dw.norm_f, eps), dw.lm_head).float().view(B, L, -1)


def _moe(h, w: MoEWeights, cfg: NemotronHConfig, loads: dict | None, i: int) -> torch.Tensor:
    if loads is not None:   # tokens per expert, for the bias balancing of the trainer
        with torch.no_grad():
            idx, _ = route(h.reshape(-1, h.shape[-1]), w, cfg)
            loads[i] = loads.get(i, 0) + torch.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts)
    if torch.is_grad_enabled() and not isinstance(w.up, torch.Tensor):   # a QuantizedExperts has no gradient
        raise ValueError("training needs unquantised routed experts: load the checkpoint with experts=None "
                         "(fp8 / int4 experts are for inference only)")
    return moe(h, w, cfg, experts=reference.moe_experts)   # differentiable (the kernel op has no backward)
