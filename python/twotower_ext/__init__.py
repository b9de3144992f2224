"""twotower_ext: a fast decode backend for two-tower block-diffusion language models.

Kernels are torch ops in the `torch.ops.twotower` namespace; `twotower_ext.ops` wraps them with argument
handling and falls back to `twotower_ext.reference` where no kernel exists for a device.
"""
from __future__ import annotations

import torch

from . import _loader

_loader.load()

from . import ops, reference  # noqa: E402  (ops need the library loaded)
from .ops import merge_states  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation was built against and which kernels it has."""
    cfg = _loader.build_config()
    return {
        "version": __version__,
        "torch_built": cfg.TORCH_VERSION,
        "torch_running": torch.__version__,
        "torch_cuda": cfg.TORCH_CUDA_VERSION or None,
        "cuda": bool(cfg.CUDA),
        "cuda_skip_reason": cfg.CUDA_SKIP_REASON or None,
        "cuda_archs": [a for a in cfg.CUDA_ARCHS.split(";") if a],
        "nvcc": cfg.NVCC_VERSION or None,
        "cutlass": cfg.CUTLASS_VERSION or None,
        "cxx": cfg.CXX_COMPILER,
        "build_type": cfg.BUILD_TYPE,
        "ops": {name: ops.kernel_devices(name) for name in ops.OP_NAMES},
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = ["build_info", "merge_states", "ops", "reference", "__version__"]
