"""The two-tower model's weights by NVIDIA's names, and loading them from safetensors checkpoints.

Loading: the expected tensors are first laid out on the meta device (no memory) and checked against the
checkpoint's headers, so a wrong checkpoint fails before anything is allocated, with every missing,
unexpected and mis-shaped name listed. Then each tensor is allocated once on its target device in its
target dtype and streamed from the memory-mapped file (see safetensors_io.copy_into); routed experts go
straight into stacked [E, out, in] tensors. A_log, D, dt_bias, the router weight and its correction bias
stay fp32 whatever the model dtype; the router computes in fp64 (layers.route, as NVIDIA's reference does), so
`load_weights` keeps the bias in fp64, and the router weight too where the plain-PyTorch router runs (CUDA: converting
it at every MoE layer of every pass was ~10% of a width-1/8 bf16 AR step when measured on the CPU). On the CPU the
router op (ops.moe_route) widens the fp32 weight in registers, exactly, and so reads half the bytes (an AR step
reads it from memory once per MoE layer).

With `experts="fp8" | "int4"` the routed experts of both towers are quantised while loading (quant.py has the
formats): their stacks are preallocated in the quantised format (quant.empty) and each checkpoint expert
matrix is streamed into a small scratch one expert big, rounded to the model dtype there, and quantised
straight into its slot (quant.quantize_into), so host memory never holds the unquantised stack. The result
equals quant.quantize of the experts `experts=None` loads in the same dtype, bit for bit. Everything else
(shared experts, attention, Mamba, embeddings, heads) stays in the model dtype.

On the CPU (float32 / bfloat16) `load_weights` packs the dense linear weights (Mamba in/out projections,
attention q/k/v/o, shared-expert and MLP up/down, both LM heads) for `ops.linear` (packed.py): each is
allocated packed (packed.empty) and filled from the checkpoint a block of rows at a time (pack_rows_into), so
the unpacked weight never exists in memory beside it. `build_weights` alone (training, hf.patch, the expected
shapes) keeps plain tensors.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass

import torch

from .. import hugepages, packed, quant
from .config import NemotronHConfig
from .safetensors_io import SafetensorsFile, TensorInfo, read_header

T_FREQ_DIM = 256  # sinusoidal timestep embedding width (t_embedder.mlp.0 input)


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match what the config describes."""


# Dense linear weights [out, in] (Linear below) are packed.PackedLinear when load_weights packs them (CPU).
Linear = torch.Tensor | packed.PackedLinear


@dataclass
class MambaWeights:
    in_proj: Linear           # [d_inner + conv_dim + H, hidden]
    conv_w: torch.Tensor      # [conv_dim, K]
    conv_b: torch.Tensor | None
    dt_bias: torch.Tensor     # [H] fp32
    A_log: torch.Tensor       # [H] fp32
    D: torch.Tensor           # [H] fp32
    norm: torch.Tensor        # [d_inner]
    out_proj: Linear          # [hidden, d_inner]


@dataclass
class AttentionWeights:
    q: Linear
    k: Linear
    v: Linear
    o: Linear


@dataclass
class MLPWeights:
    up: Linear                # [I, hidden]
    down: Linear              # [hidden, I]


@dataclass
class MoEWeights:
    router: torch.Tensor      # [E, hidden] fp32 (fp64 off the CPU once load_weights returns)
    bias: torch.Tensor        # [E] fp32 (e_score_correction_bias; fp64 once load_weights returns)
    up: torch.Tensor          # [E, I, hidden] (a quant.QuantizedExperts when loaded with experts=fp8/int4)
    down: torch.Tensor        # [E, hidden, I] (likewise)
    shared: MLPWeights


@dataclass
class Layer:
    kind: str                 # "mamba" | "attention" | "moe" | "mlp"
    norm: torch.Tensor
    mixer: object


@dataclass
class TowerWeights:
    embeddings: torch.Tensor
    layers: list
    norm_f: torch.Tensor
    lm_head: Linear


@dataclass
class TimeWeights:
    emb0_w: torch.Tensor      # t_embedder.mlp.0 [hidden, 256]
    emb0_b: torch.Tensor
    emb2_w: torch.Tensor      # t_embedder.mlp.2 [hidden, hidden]
    emb2_b: torch.Tensor
    block_w: torch.Tensor     # t_block.1 [3*hidden, hidden]
    block_b: torch.Tensor
    tables: torch.Tensor      # scale_shift_tables stacked [layers, 3, hidden]


@dataclass
class TwoTowerWeights:
    context: TowerWeights
    denoiser: TowerWeights
    time: TimeWeights


def expert_format(experts, name: str = "experts") -> str | None:
    """The routed-expert storage format for an `experts=` argument: None (unquantised; "bf16" means the
    same: the experts stay in the model dtype) or one of quant.FORMATS; anything else is a ValueError
    naming `name`."""
    if experts is None or experts == "bf16":
        return None
    if isinstance(experts, str) and experts in quant.FORMATS:
        return experts
    raise ValueError(f"{name} must be None, 'bf16', 'fp8' or 'int4', got {experts!r}")


@dataclass(frozen=True)
class QuantSlot:
    """A checkpoint tensor that is quantised into expert e of a QuantizedExperts stack while loading."""
    q: quant.QuantizedExperts
    e: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.q.shape[1:])


@dataclass(frozen=True)
class PackSlot:
    """A checkpoint tensor that is packed into a PackedLinear while loading."""
    p: packed.PackedLinear

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.p.shape)


class _Allocator:
    """Creates tensors on one device and records which checkpoint name fills each one (as a view in the
    checkpoint's own shape, a QuantSlot for quantised routed experts, or a PackSlot for packed linears)."""

    def __init__(self, dtype: torch.dtype, device, targets: dict, experts: str | None = None, pack: bool = False):
        self.dtype, self.device, self.targets = dtype, torch.device(device), targets
        self.experts = experts
        self.pack = pack and packed.packable((1, 1), dtype, device)

    def __call__(self, name: str, shape, fp32: bool = False, ckpt_shape=None) -> torch.Tensor:
        t = hugepages.empty(shape, torch.float32 if fp32 else self.dtype, self.device)
        self.targets[name] = t.view(ckpt_shape) if ckpt_shape is not None else t
        return t

    def linear(self, name: str, shape):
        """A dense linear weight [out, in]: packed for ops.linear when this allocator packs, else plain."""
        if not self.pack:
            return self(name, shape)
        p = packed.empty(*shape, self.dtype, self.device)
        self.targets[name] = PackSlot(p)
        return p

    def stacked(self, names: list[str], shape, fp32: bool = False) -> torch.Tensor:
        t = hugepages.empty((len(names), *shape), torch.float32 if fp32 else self.dtype, self.device)
        for i, name in enumerate(names):
            self.targets[name] = t[i]
        return t

    def experts_stack(self, names: list[str], shape):
        """A routed-expert stack [E, *shape]: dense in the model dtype, or quantised (QuantSlot targets).
        int4 scales are fp16 for an fp16 model, else bf16."""
        if self.experts is None:
            return self.stacked(names, shape)
        scale_dtype = torch.float16 if self.dtype == torch.float16 else torch.bfloat16
        q = quant.empty(self.experts, (len(names), *shape), self.device, scale_dtype=scale_dtype)
        for i, name in enumerate(names):
            self.targets[name] = QuantSlot(q, i)
        return q


def _build_tower(cfg: NemotronHConfig, a: _Allocator, prefix: str, head: str) -> TowerWeights:
    H = cfg.hidden_size
    layers = []
    for i, kind in enumerate(cfg.layer_kinds):
        m = f"{prefix}.layers.{i}.mixer"
        norm = a(f"{prefix}.layers.{i}.norm.weight", (H,))
        if kind == "mamba":
            C, K, nh = cfg.conv_dim, cfg.conv_kernel, cfg.mamba_num_heads
            mixer = MambaWeights(
                in_proj=a.linear(f"{m}.in_proj.weight", (cfg.in_proj_dim, H)),
                conv_w=a(f"{m}.conv1d.weight", (C, K), ckpt_shape=(C, 1, K)),
                conv_b=a(f"{m}.conv1d.bias", (C,)) if cfg.use_conv_bias else None,
                dt_bias=a(f"{m}.dt_bias", (nh,), fp32=True),
                A_log=a(f"{m}.A_log", (nh,), fp32=True),
                D=a(f"{m}.D", (nh,), fp32=True),
                norm=a(f"{m}.norm.weight", (cfg.d_inner,)),
                out_proj=a.linear(f"{m}.out_proj.weight", (H, cfg.d_inner)))
        elif kind == "attention":
            qd, kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            mixer = AttentionWeights(q=a.linear(f"{m}.q_proj.weight", (qd, H)), k=a.linear(f"{m}.k_proj.weight", (kd, H)),
                                     v=a.linear(f"{m}.v_proj.weight", (kd, H)), o=a.linear(f"{m}.o_proj.weight", (H, qd)))
        elif kind == "moe":
            E, I, Is = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size
            mixer = MoEWeights(
                router=a(f"{m}.gate.weight", (E, H), fp32=True),
                bias=a(f"{m}.gate.e_score_correction_bias", (E,), fp32=True),
                up=a.experts_stack([f"{m}.experts.{e}.up_proj.weight" for e in range(E)], (I, H)),
                down=a.experts_stack([f"{m}.experts.{e}.down_proj.weight" for e in range(E)], (H, I)),
                shared=MLPWeights(up=a.linear(f"{m}.shared_experts.up_proj.weight", (Is, H)),
                                  down=a.linear(f"{m}.shared_experts.down_proj.weight", (H, Is))))
        else:
            I = cfg.intermediate_size
            mixer = MLPWeights(up=a.linear(f"{m}.up_proj.weight", (I, H)), down=a.linear(f"{m}.down_proj.weight", (H, I)))
        layers.append(Layer(kind, norm, mixer))
    return TowerWeights(embeddings=a(f"{prefix}.embeddings.weight", (cfg.vocab_size, H)), layers=layers,
                        norm_f=a(f"{prefix}.norm_f.weight", (H,)), lm_head=a.linear(head, (cfg.vocab_size, H)))


def build_weights(cfg: NemotronHConfig, dtype: torch.dtype, ctx_device, den_device,
                  experts: str | None = None, pack: bool = False) -> tuple[TwoTowerWeights, dict]:
    """Uninitialised weights (context tower + context_lm_head on ctx_device; denoiser, lm_head and the
    time conditioning on den_device) and {checkpoint name: tensor view to fill, a QuantSlot for a routed
    expert when `experts` is a quant format, or a PackSlot for a dense linear packed with `pack` (on the CPU,
    float32 / bfloat16)}."""
    targets: dict[str, torch.Tensor | QuantSlot | PackSlot] = {}
    experts = expert_format(experts)
    ctx = _Allocator(dtype, ctx_device, targets, experts, pack)
    den = _Allocator(dtype, den_device, targets, experts, pack)
    H = cfg.hidden_size
    time = TimeWeights(
        emb0_w=den("t_embedder.mlp.0.weight", (H, T_FREQ_DIM)), emb0_b=den("t_embedder.mlp.0.bias", (H,)),
        emb2_w=den("t_embedder.mlp.2.weight", (H, H)), emb2_b=den("t_embedder.mlp.2.bias", (H,)),
        block_w=den("t_block.1.weight", (3 * H, H)), block_b=den("t_block.1.bias", (3 * H,)),
        tables=den.stacked([f"scale_shift_tables.{i}" for i in range(cfg.num_hidden_layers)], (3, H)))
    weights = TwoTowerWeights(context=_build_tower(cfg, ctx, "context_tower", "context_lm_head.weight"),
                              denoiser=_build_tower(cfg, den, "denoiser_tower", "lm_head.weight"), time=time)
    return weights, targets


def expected_tensors(cfg: NemotronHConfig) -> dict[str, tuple[int, ...]]:
    """{NVIDIA name: shape} of every tensor a checkpoint for this config holds."""
    _, targets = build_weights(cfg, torch.float32, "meta", "meta")
    return {k: tuple(v.shape) for k, v in targets.items()}


# ----------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: a file, or a directory with model.safetensors.index.json
    (sharded) or model.safetensors."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def checkpoint_index(path: str) -> dict[str, tuple[str, TensorInfo]]:
    """{tensor name: (file, header entry)} over all shards; a name in two shards is an error."""
    out: dict[str, tuple[str, TensorInfo]] = {}
    index_path = os.path.join(path, "model.safetensors.index.json") if os.path.isdir(path) else None
    for file in checkpoint_files(path):
        infos, _, _ = read_header(file)
        for name, info in infos.items():
            if name in out:
                raise CheckpointError(f"tensor {name} is in both {out[name][0]} and {file}")
            out[name] = (file, info)
    if index_path and os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        wrong = [n for n, f in weight_map.items() if n not in out or os.path.basename(out[n][0]) != f]
        if wrong:
            raise CheckpointError(f"{index_path} lists tensors its shards do not hold where it says: "
                                  f"{_names(wrong)}")
    return out


def _names(names, limit: int = 40) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_checkpoint(index: dict[str, tuple[str, TensorInfo]], expected: dict[str, tuple[int, ...]],
                     where: str) -> None:
    """Raise CheckpointError listing every missing, unexpected, mis-shaped or non-float tensor."""
    missing = [n for n in expected if n not in index]
    unexpected = [n for n in index if n not in expected]
    misshaped = [f"{n} (checkpoint {list(index[n][1].shape)}, expected {list(s)})"
                 for n, s in expected.items() if n in index and index[n][1].shape != s]
    badtype = [f"{n} ({index[n][1].dtype})" for n in expected if n in index and not index[n][1].dtype.is_floating_point]
    if missing or unexpected or misshaped or badtype:
        parts = [f"checkpoint {where} does not match the config ({len(missing)} missing, {len(unexpected)} "
                 f"unexpected, {len(misshaped)} mis-shaped, {len(badtype)} not floating point tensors)"]
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("not floating point", badtype)):
            if names:
                parts.append(f"  {label}: {_names(names)}")
        raise CheckpointError("\n".join(parts))


def load_weights(path: str, cfg: NemotronHConfig, dtype: torch.dtype = torch.bfloat16, ctx_device="cpu",
                 den_device=None, experts: str | None = None, pack: bool = True) -> TwoTowerWeights:
    """Load a checkpoint (file, or directory: single-file or sharded) by NVIDIA's names. experts: None or
    "bf16" (the routed experts unquantised, in `dtype` like every other weight), "fp8" or "int4" (quantised
    while streaming, see the module docstring). pack: the dense linears of a tower on the CPU packed for
    ops.linear (see the module docstring); False keeps them plain tensors."""
    den_device = ctx_device if den_device is None else den_device
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    experts = expert_format(experts)
    index = checkpoint_index(path)
    check_checkpoint(index, expected_tensors(cfg), path)
    weights, targets = build_weights(cfg, dtype, ctx_device, den_device, experts, pack)
    by_file = defaultdict(list)
    for name, (file, info) in index.items():
        by_file[file].append((info.begin, name))
    scratch: dict = {}   # (shape, device) -> one expert matrix in the model dtype, reused for every expert
    for file, entries in by_file.items():
        with SafetensorsFile(file) as f:
            for _, name in sorted(entries):  # file order: sequential reads
                t = targets[name]
                if isinstance(t, QuantSlot):
                    key = (tuple(t.shape), t.q.device)
                    if key not in scratch:
                        scratch[key] = torch.empty(t.shape, dtype=dtype, device=t.q.device)
                    f.copy_to(name, scratch[key])
                    quant.quantize_into(t.q, t.e, scratch[key])
                elif isinstance(t, PackSlot):
                    for row0, rows in f.row_chunks(name, packed.PANEL):
                        packed.pack_rows_into(t.p, row0, rows)
                else:
                    f.copy_to(name, t)
    for tower in (weights.context, weights.denoiser):
        for layer in tower.layers:
            if isinstance(layer.mixer, MoEWeights):
                m = layer.mixer
                m.bias = m.bias.double()
                if m.router.device.type != "cpu":
                    m.router = m.router.double()
    return weights
