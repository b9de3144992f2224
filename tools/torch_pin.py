"""scikit-build-core metadata provider: the wheel's `dependencies`, with torch pinned to the version the
build runs against (`torch==X.Y.Z`): the compiled _C imports only under the torch it was built with, so an
unpinned `torch>=...` would let pip resolve another torch that then refuses to load it. The build uses
--no-build-isolation, so the torch found here is the one CMake compiles against.

pyproject.toml: [tool.scikit-build.metadata.dependencies] provider = "torch_pin", provider-path = "tools",
with `extra` listing the other requirements.
"""
from __future__ import annotations

import re
from importlib import metadata

__all__ = ["dynamic_metadata", "torch_requirement"]


def torch_requirement(version: str) -> str:
    """'2.13.0+cpu' -> 'torch==2.13.0': the public release, since PyPI's wheels carry no local tag."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"torch_pin: cannot read a release X.Y.Z from torch version {version!r}")
    return "torch==" + ".".join(m.groups())


def dynamic_metadata(field, settings=None, project=None):
    if field != "dependencies":
        raise ValueError(f"torch_pin: provides only 'dependencies', not {field!r}")
    extra = list((settings or {}).get("extra", []))
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        raise RuntimeError("torch_pin: torch is not installed in the build environment; install torch first "
                           "and build with --no-build-isolation (see README, Building)") from None
    return [torch_requirement(version), *extra]
