"""The engine on CUDA: NVIDIA parity (the golden runs of test_engine.py, fp32, reference_compat) and the same tokens
as the CPU engine. (CUDA graphs, fp32 and bf16, with and without the device-side block loop: test_engine.py.)
All marked `cuda`: they skip without a GPU."""
import os

import pytest
import torch

import twotower_ext as tt

from test_engine import DATA, GOLDEN, PROMPTS
from test_engine import test_parity_with_nvidia_reference as check_parity

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def lm32():
    torch.backends.cuda.matmul.allow_tf32 = False
    return tt.load(os.path.join(DATA, "checkpoint"), device="cuda", dtype=torch.float32)


@pytest.mark.parametrize("run", GOLDEN["runs"], ids=lambda r: f"{r['mode']}-{r['prompt']}-{r['params'].get('gamma')}"
                         f"-S{r['params'].get('block_size')}-steps{r['params'].get('steps_per_block')}")
def test_parity_with_nvidia_reference_on_cuda(lm32, run):
    check_parity(lm32, run)


@pytest.mark.parametrize("mode", ["diffusion", "ar", "mock_ar"])
def test_same_tokens_as_the_cpu_engine(lm32, mode):
    """Ragged batch, per-row semantics, fp32: the CUDA kernels' results pick the CPU engine's tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = tt.load(os.path.join(DATA, "checkpoint"), dtype=torch.float32)
    prompts = [PROMPTS["p0"], PROMPTS["p1"], PROMPTS["p2"]]
    kw = dict(mode=mode, max_new_tokens=40, threshold=0.8) if mode == "diffusion" else dict(mode=mode, max_new_tokens=24)
    want, got = cpu.generate(prompts, **kw), lm32.generate(prompts, **kw)
    assert got.sequences == want.sequences
    if mode == "diffusion":
        assert got.nfe_per_block == want.nfe_per_block
