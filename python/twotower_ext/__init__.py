"""twotower_ext: a fast decode backend for two-tower block-diffusion language models.

Kernels are torch ops in the `torch.ops.twotower` namespace; `twotower_ext.ops` wraps them with argument
handling and falls back to `twotower_ext.reference` where no kernel exists for a device.
"""
from __future__ import annotations

import os as _os
import sys as _sys

# OpenMP threads that wait for work sleep instead of spinning, unless the environment says otherwise. It
# only takes effect when torch (and so its libgomp) is not loaded yet: the CLI, or `import twotower_ext`
# first. With 2 threads on a loaded 2-core machine libgomp's default spin-then-sleep made a 300 us Mamba
# scan take 15 ms (a spinning thread loses the CPU to the one that has work); passive waiting kept it at
# 0.3 ms (docs/threads.md).
if "torch" not in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

from . import _loader

_loader.load()

from . import ops, reference  # noqa: E402  (ops need the library loaded)
from .ops import block_attention, mamba_block_scan, merge_states, threshold_unmask  # noqa: E402

from .api import TwoTowerLM, load  # noqa: E402
from .runtime import GenerationResult  # noqa: E402
from .hf import patch  # noqa: E402

__version__ = "0.1.0"


def default_model_path() -> str | None:
    """The small model shipped inside the package (None when this installation has none)."""
    import os

    path = os.path.join(os.path.dirname(__file__), "data", "default_model")
    return path if os.path.exists(os.path.join(path, "config.json")) else None


def _torch_requirement() -> str | None:
    """The torch pin in the installed wheel's metadata (tools/torch_pin.py writes it at build time); None
    for a development build loaded through TWOTOWER_EXT_LIB or a package not installed from a wheel."""
    import os
    from importlib import metadata

    if os.environ.get("TWOTOWER_EXT_LIB"):
        return None
    try:
        dist = metadata.distribution("twotower_ext")
    except metadata.PackageNotFoundError:
        return None
    if os.path.dirname(os.path.abspath(__file__)) != os.path.abspath(dist.locate_file("twotower_ext")):
        return None   # another installed copy's metadata, not this package's
    return next((r.split(";")[0].strip() for r in dist.requires or () if r.replace(" ", "").startswith("torch=")), None)


def build_info() -> dict:
    """What this installation was built against and which kernels it has."""
    cfg = _loader.build_config()
    return {
        "version": __version__,
        "torch_built": cfg.TORCH_VERSION,
        "torch_requirement": _torch_requirement(),
        "torch_running": torch.__version__,
        "torch_cuda": cfg.TORCH_CUDA_VERSION or None,
        "cuda": bool(cfg.CUDA),
        "cuda_skip_reason": cfg.CUDA_SKIP_REASON or None,
        "cuda_archs": [a for a in cfg.CUDA_ARCHS.split(";") if a],
        "nvcc": cfg.NVCC_VERSION or None,
        "cutlass": cfg.CUTLASS_VERSION or None,
        "cxx": cfg.CXX_COMPILER,
        "build_type": cfg.BUILD_TYPE,
        "ops": {name: list(ops.kernel_devices(name)) for name in ops.OP_NAMES},
        "cuda_available": torch.cuda.is_available(),
    }


__all__ = ["GenerationResult", "TwoTowerLM", "block_attention", "build_info", "default_model_path", "load", "patch", "mamba_block_scan", "merge_states", "ops", "reference", "threshold_unmask", "__version__"]
