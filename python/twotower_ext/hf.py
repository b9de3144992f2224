"""`patch(hf_model)`: run an already-loaded NVIDIA HF two-tower model's generation methods here.

The HF module carries NVIDIA's parameter names (context_tower.*, denoiser_tower.*, lm_head, t_embedder,
...). `patch` builds a TwoTowerModel over the same memory: each parameter is copied once into the layout
the kernels want (routed experts stacked [E, out, in]) and the HF parameter is then re-pointed at that
storage, so the process holds one copy of the weights, not two. Its `generate_mask_diffusion`,
`generate_ar` and `generate_mock_ar` are replaced by versions running on this engine in
reference-compatible mode; they return what NVIDIA's return: a LongTensor [B, prompt + new] of ids.
"""
from __future__ import annotations

import types

import torch

from .api import TwoTowerLM
from .models import NemotronHConfig, TwoTowerModel
from .models.weights import build_weights, check_checkpoint, expected_tensors

# NVIDIA-style keyword names -> this engine's names
_ALIASES = {"gamma": "threshold", "confidence_threshold": "threshold", "steps": "steps_per_block",
            "num_steps": "steps_per_block", "max_length_new": "max_new_tokens", "mask_id": "mask_token_id",
            "eos_id": "eos_token_id"}
_KNOWN = {"max_new_tokens", "block_size", "steps_per_block", "threshold", "temperature", "seed",
          "eos_token_id", "mask_token_id"}


def _config_of(hf_model) -> NemotronHConfig:
    cfg = getattr(hf_model, "config", None)
    if cfg is None:
        raise TypeError("patch: the model has no .config (expected an NVIDIA HF two-tower model)")
    return NemotronHConfig.from_dict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg)))


def _shared_model(hf_model) -> TwoTowerModel:
    cfg = _config_of(hf_model)
    params = dict(hf_model.named_parameters())
    params.update({k: v for k, v in hf_model.named_buffers() if k not in params})
    if not params:
        raise ValueError("patch: the model has no parameters")
    first = next(iter(params.values()))
    dtype, device = first.dtype, first.device
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"patch: model parameters must be float32 or bfloat16, got {dtype}")
    index = {n: (None, types.SimpleNamespace(shape=tuple(p.shape), dtype=p.dtype)) for n, p in params.items()}
    check_checkpoint(index, expected_tensors(cfg), "hf_model")
    weights, targets = build_weights(cfg, dtype, device, device)
    with torch.no_grad():
        for name, target in targets.items():
            p = params[name]
            target.copy_(p)
            if target.dtype == p.dtype and target.device == p.device:
                p.data = target   # one copy in memory: the HF module now reads our storage
    return TwoTowerModel(cfg, weights, dtype, device, device)


def _ids_tensor(sequences: list[list[int]], like) -> torch.Tensor:
    L = max(len(s) for s in sequences)
    out = torch.full((len(sequences), L), 0, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s)
    return out.to(like.device) if isinstance(like, torch.Tensor) else out


def patch(hf_model) -> TwoTowerLM:
    """Replace hf_model's generate_mask_diffusion / generate_ar / generate_mock_ar with this engine's
    (reference-compatible semantics, same return value: LongTensor [B, prompt + new]). Keyword arguments
    are accepted under NVIDIA's names (gamma / threshold, steps / steps_per_block, ...). Returns the
    TwoTowerLM that now serves the model (its last GenerationResult is `hf_model.twotower_last_result`)."""
    lm = TwoTowerLM(_shared_model(hf_model))

    def make(mode):
        def method(self, input_ids, **kw):
            kw = {_ALIASES.get(k, k): v for k, v in kw.items()}
            unknown = set(kw) - _KNOWN
            if unknown:
                raise TypeError(f"{mode}: unsupported arguments {sorted(unknown)} (supported: {sorted(_KNOWN)})")
            if mode != "diffusion":
                for k in ("block_size", "steps_per_block", "threshold"):
                    kw.pop(k, None)
            res = lm.generate(input_ids, mode=mode, reference_compat=True, **kw)
            self.twotower_last_result = res
            return _ids_tensor(res.sequences, input_ids)
        method.__name__ = f"generate_{'mask_' if mode == 'diffusion' else ''}{mode}"
        return method

    hf_model.generate_mask_diffusion = types.MethodType(make("diffusion"), hf_model)
    hf_model.generate_ar = types.MethodType(make("ar"), hf_model)
    hf_model.generate_mock_ar = types.MethodType(make("mock_ar"), hf_model)
    hf_model.twotower = lm
    return lm
