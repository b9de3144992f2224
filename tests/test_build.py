"""The installed extension: build info, op registry, the torch-version guard."""
import subprocess
import sys

import torch

import twotower_ext as tt
from twotower_ext import ops


def test_build_info_reports_torch_and_cuda():
    info = tt.build_info()
    assert info["torch_built"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and info["cutlass"], info
    else:
        assert info["cuda_skip_reason"], info
    assert set(info["ops"]) == set(ops.OP_NAMES)


def test_every_op_has_schema_cpu_kernel_and_fake():
    for name in ops.OP_NAMES:
        op = getattr(torch.ops.twotower, name)
        assert "CPU" in ops.kernel_devices(name), name
        assert op.default._schema.name == f"twotower::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"twotower::{name}", "Meta") or \
            torch._library.simple_registry.singleton.find(f"twotower::{name}").fake_impl.kernel is not None


def test_import_refuses_other_torch_version():
    code = (
        "import torch; torch.__version__ = '0.0.0-other';\n"
        "try:\n import twotower_ext\nexcept ImportError as e:\n print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in out.stdout and "built against torch" in out.stdout, out.stdout + out.stderr
