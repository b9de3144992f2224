"""Device memory of a two-tower model per routed-expert format, and which GPUs it fits on (`twotower info`).

For a config and each expert format (bf16 = unquantised in the model dtype, fp8, int4; quant.py) it counts,
exactly as the loader lays them out (models/weights.py):
- routed experts: both towers' [E, I, H] up and [E, H, I] down stacks, quant.expert_bytes per matrix;
- other weights: everything else (attention, Mamba, shared experts, routers, norms, embeddings, both LM
  heads, time conditioning) in the model dtype, with the tensors the loader keeps in fp32 (router, its
  correction bias, A_log, D, dt_bias) counted at 4 bytes (the bias, and off the CPU the router, are held in fp64:
  under 0.5% more);
- the context cache of one row of `row_tokens` tokens: K/V of every attention layer for those tokens plus the
  Mamba conv + fp32 SSM state (models/cache.cache_row_bytes; the denoiser reads the same cache when both
  towers share the device, mock-AR's snapshot would add one more Mamba state per row).
A GPU fits the model when its memory, less a reserve for the CUDA context, kernels' workspaces, logits and
allocator slack (RESERVE_FRACTION of it + RESERVE_BYTES, plus the OS and host process on unified-memory
machines), holds the weights; the rest is shown as how many cache rows fit.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
MIB = 1 << 20
ROW_TOKENS = 4096
RESERVE_FRACTION = 0.05                # of the device memory: allocator fragmentation, graph pools
RESERVE_BYTES = 2 * GIB                # CUDA context + cuBLAS / kernel workspaces + a pass's logits


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int              # bytes as the driver reports them (nvidia-smi's total)
    host_share: int = 0      # unified memory: what the OS and the host process keep for themselves

    def usable(self) -> int:
        return int(self.memory - self.memory * RESERVE_FRACTION - RESERVE_BYTES - self.host_share)


GPUS = (
    Gpu("H100 80 GB", 81559 * MIB),
    Gpu("A100 80 GB", 81920 * MIB),
    Gpu("H200 141 GB", 143771 * MIB),
    Gpu("L40S 48 GB", 46068 * MIB),
    Gpu("GB10 / DGX Spark 128 GB unified", 128 * GIB, host_share=8 * GIB),
    Gpu("RTX 4090 24 GB", 24564 * MIB),
)


def routed_expert_bytes(cfg, fmt: str, dtype_bytes: int = 2) -> int:
    """Bytes of the routed experts of both towers stored in `fmt` (bf16: unquantised, dtype_bytes each)."""
    from ..quant import expert_pair_bytes

    per_expert = expert_pair_bytes(fmt, cfg.hidden_size, cfg.moe_intermediate_size, dtype_bytes)
    return 2 * cfg.layer_kinds.count("moe") * cfg.n_routed_experts * per_expert


def other_weight_bytes(cfg, dtype_bytes: int = 2) -> int:
    """Bytes of every weight besides the routed experts, both towers and the time conditioning, in the
    loader's own layout (laid out on the meta device: nothing is allocated)."""
    import torch

    from ..models.weights import build_weights

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    _, targets = build_weights(cfg, dtype, "meta", "meta")
    return sum(t.numel() * t.element_size() for name, t in targets.items() if ".mixer.experts." not in name)


def memory_rows(cfg, dtype_bytes: int = 2, row_tokens: int = ROW_TOKENS, gpus=GPUS) -> list[dict]:
    """One row per expert format: weight bytes (routed experts, other, total), one cache row's bytes and,
    per GPU, how many cache rows fit beside the weights (-1: the weights alone do not fit). dtype_bytes:
    the model dtype (2: bf16, 4: fp32) of the unquantised experts, every other weight and the cache."""
    from ..models.cache import cache_row_bytes
    from ..quant import CHOICES

    kv, state = cache_row_bytes(cfg, dtype_bytes)
    row = kv * row_tokens + state
    other = other_weight_bytes(cfg, dtype_bytes)
    rows = []
    for fmt in CHOICES:
        routed = routed_expert_bytes(cfg, fmt, dtype_bytes)
        total = routed + other
        fits = {g.name: (g.usable() - total) // row if g.usable() >= total else -1 for g in gpus}
        label = fmt if fmt != "bf16" else {2: "bf16", 4: "fp32"}[dtype_bytes] + " (unquantised)"
        rows.append({"experts": label, "routed_bytes": routed, "other_bytes": other, "weights_bytes": total,
                     "row_bytes": row, "fits": fits})
    return rows


def format_memory_table(rows: list[dict], row_tokens: int = ROW_TOKENS) -> str:
    """The rows of memory_rows as a markdown table (GiB; per GPU: the cache rows that fit, or 'no')."""
    gpus = list(rows[0]["fits"])
    cols = ["experts", "routed experts GiB", "other weights GiB", "weights GiB",
            f"cache / {row_tokens // 1024}K row MiB"] + gpus
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [r["experts"], *(_gib(r[k]) for k in ("routed_bytes", "other_bytes", "weights_bytes")),
                 f"{r['row_bytes'] / MIB:.1f}"]
        cells += [f"{n} rows" if n >= 0 else "no" for n in r["fits"].values()]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _gib(n: int) -> str:
    v = n / GIB
    return f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def reserve_note(row_tokens: int = ROW_TOKENS, gpus=GPUS) -> str:
    unified = [g for g in gpus if g.host_share]
    extra = "".join(f"; {g.name}: {g.host_share / GIB:.0f} GiB more for the OS and host process"
                    for g in unified)
    return (f"rows = {row_tokens}-token cache rows that fit beside the weights after reserving {RESERVE_FRACTION:.0%} of the "
            f"memory + {RESERVE_BYTES / GIB:.0f} GiB (CUDA context, workspaces, logits, allocator slack){extra}; "
            f"'no': the weights alone do not fit")
