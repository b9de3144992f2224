"""The public entry points: `load` a checkpoint directory and `generate` from it."""
from __future__ import annotations

import os
import threading

import torch

from .engine import Engine, GenerationResult

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float32):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"load: dtype must be torch.bfloat16 or torch.float32 (or 'bf16' / 'fp32'), got {dtype!r}")


def load_tokenizer(path: str):
    """The checkpoint's tokenizer.json through the `tokenizers` package, or None when either is absent."""
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(tok_file)


class TwoTowerLM:
    """A loaded two-tower model with its decode engine and (when the checkpoint has one) tokenizer."""

    def __init__(self, model, tokenizer=None, path: str | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.engine = Engine(model)
        self._lock = threading.Lock()   # one generate at a time: the engine's pooled cache and graphs are shared

    @property
    def config(self):
        return self.model.config

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json (or `tokenizers` is not installed): pass token ids")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json (or `tokenizers` is not installed)")
        return self.tokenizer.decode(ids)

    def generate(self, input_ids, mode: str = "diffusion", max_new_tokens: int = 256, block_size: int = 16,
                 steps_per_block: int = 16, threshold: float = 0.8, temperature: float = 0.0, seed: int = 0,
                 eos_token_id: int | None = 2, reference_compat: bool = False, *, mask_token_id: int = 3,
                 cuda_graphs: bool = True, device_loop: bool = False, callback=None) -> GenerationResult:
        """Generate continuations of `input_ids` (a list of ints, a list of lists for ragged prompts, a
        LongTensor [B, L], or text / a list of texts when the checkpoint has a tokenizer).

        mode: "diffusion" (block mask diffusion), "mock_ar" or "ar". threshold: the confidence gamma.
        reference_compat=True reproduces NVIDIA's reference semantics exactly (see twotower_ext.engine).
        callback(event: dict) is called after every committed block (diffusion) or token (AR modes) with
        the tokens so far, for streaming. cuda_graphs / device_loop: see twotower_ext.graphs.

        Thread-safe: concurrent calls on one TwoTowerLM run one after another (a lock serialises them);
        for concurrent requests batched together use `twotower_ext.serve.Scheduler`."""
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                          and all(isinstance(t, str) for t in input_ids)):
            texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
            input_ids = [self.encode(t) for t in texts]
        with self._lock:
            return self.engine.generate(
                input_ids, callback=callback, mode=mode, max_new_tokens=max_new_tokens, block_size=block_size,
                steps_per_block=steps_per_block, threshold=threshold, temperature=temperature, seed=seed,
                eos_token_id=eos_token_id, mask_token_id=mask_token_id, reference_compat=reference_compat,
                cuda_graphs=cuda_graphs, device_loop=device_loop)


def load(path: str, device="cpu", dtype=torch.bfloat16, denoiser_device=None) -> TwoTowerLM:
    """Load an NVIDIA-format two-tower checkpoint directory (config.json + safetensors, single or
    sharded; tokenizer.json optional). `denoiser_device` places the denoiser tower elsewhere."""
    from .models import TwoTowerModel

    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"load: {path!r} is not a checkpoint directory (no config.json)")
    model = TwoTowerModel.from_pretrained(path, dtype=_dtype(dtype), device=device, denoiser_device=denoiser_device)
    return TwoTowerLM(model, load_tokenizer(path), path)
