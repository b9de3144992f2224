"""NVIDIA's Nemotron-TwoTower (NemotronH hybrid backbones) as a model the decode engine drives.

Loading
    model = TwoTowerModel.from_pretrained(ckpt_dir, dtype=torch.bfloat16, device="cuda:0",
                                          denoiser_device=None)   # or "cuda:1": denoiser elsewhere
  reads config.json (`NemotronHConfig.from_json`, validated) and model.safetensors or the sharded
  model-*.safetensors + model.safetensors.index.json by NVIDIA's names, memory-mapped, each tensor
  allocated once on its device in its dtype (A_log, D, dt_bias fp32; router weight and correction bias fp64).
  A checkpoint that does not match the config raises CheckpointError listing the names.

State
    cache = model.new_cache(batch, capacity, snapshot=False)
  preallocates, per row: KV [capacity] per attention layer, conv + SSM state per Mamba layer, and the
  length (`cache.lens`, int32 on the device; `cache.lens_host` on the host). `snapshot=True` adds the
  "before the last extension" Mamba states mock-AR needs. Rows are independent: any call takes `rows`
  (None = all, a slice, or indices) and touches only those rows; in fp32 a row's result does not depend
  on the other rows of the batch (up to matmul blocking).

Context tower (causal; writes the cache in place)
    logits = model.prefill(prompts, cache, rows)        # ragged prompts -> [n, V] last-token logits
    model.prefill(prompts, cache, rows, start=[...])    # rows already holding a prompt's first segments
    model.extend(block [n, S], cache, rows)             # committed tokens: KV appended, states advanced
    logits = model.decode(tokens [n], cache, rows)      # AR step: extend by 1, context_lm_head logits
  `snapshot=True` on prefill / extend / decode keeps the Mamba states before the (last) new token.

Denoiser tower (reads the cache, never writes it)
    logits = model.denoise(x [B, S], cache, t, rows)    # [B, S, V] fp32; t: [B] (or a float) per row
    counts, done, _ = model.denoise_commit(x, cache, t, rows, mask_id=..., gamma=..., ...)  # the pass + the
                                                        # commit step on x in place, LM head fused (lm_head_unmask)
    logits = model.mock_ar(last_tokens [B], cache, rows)  # [B, V]: no time conditioning, KV[:-1], snapshot
  NVIDIA-compat mode passes the batch-mean t broadcast to every row. CUDA-graph capture: call decode /
  extend (through `model.extend_step`, which leaves the host length count to the caller; `active=` makes
  rows inert, for padded batch buckets) / denoise / mock_ar with contiguous rows (a slice): then no host
  sync and no data-dependent shape remains. Attention goes through `twotower_ext.ops.block_attention` (its reference fallback syncs);
  the context tower's extensions use its causal mode over the whole cache with the device lengths.

Numerics follow NVIDIA's reference code (modeling_nemotron_h.py / modeling_nemotron_twotower.py); see
layers.py. Prefill and extension use the same seeded scan op as the denoiser (`ops.mamba_block_scan`),
an fp32 token-by-token recurrence, with per-row lengths for ragged prompts; on CUDA a pass of at least
`model.prefill_chunked_min_len` tokens runs the same recurrence in chunked SSD form instead (ssd.py: batched
matmuls, fp32 state, equal up to fp32 rounding; on the CPU the op is faster at every length prefill passes have). A prompt longer than `model.prefill_segment` tokens is
prefilled in segments of that many (the first fresh, each next an extension of the row), so the state at
every segment boundary is computed alike from token 0 or from a boundary the prefix cache restored
(docs/semantics.md, "Prefix cache").
"""
from .cache import ContextCache
from .config import ConfigError, NemotronHConfig
from .safetensors_io import SafetensorsError, SafetensorsFile, save_file
from .towers import TwoTowerModel
from .weights import CheckpointError, TwoTowerWeights, expected_tensors, load_weights

__all__ = ["CheckpointError", "ConfigError", "ContextCache", "NemotronHConfig", "SafetensorsError",
           "SafetensorsFile", "TwoTowerModel", "TwoTowerWeights", "expected_tensors", "load_weights", "save_file"]
