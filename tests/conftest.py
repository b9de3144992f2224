import pytest
import torch

import twotower_ext  # noqa: F401  (loads the ops)

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    """Devices to run kernel tests on: CPU always, CUDA when present (marked so it skips cleanly)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def gen():
    """A fresh, unseeded-by-test generator: every run draws new inputs; the seed is printed on failure."""
    seed = torch.seed() % (2**31)
    g = torch.Generator().manual_seed(seed)
    print(f"random seed: {seed}")
    return g


def tolerance(dtype: torch.dtype) -> float:
    """Absolute/relative tolerance scaled to a storage dtype's rounding (a few ulps at unit scale)."""
    return {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
