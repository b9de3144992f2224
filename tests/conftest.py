import pytest
import torch

import twotower_ext  # noqa: F401  (loads the ops)
from twotower_ext.threads import using_threads

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "core_cuda: the decode core's bucketed CUDA graphs (needs a CUDA device; "
                            "tools/gpu_check.sh runs them in their own step)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords or "core_cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    """Devices to run kernel tests on: CPU always, CUDA when present (marked so it skips cleanly)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def fresh_generator(what: str = "random seed") -> torch.Generator:
    """A generator on a new seed (printed, so pytest shows it with a failure's captured output)."""
    seed = torch.seed() % (2**31)
    print(f"{what}: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gen():
    """A fresh, unseeded-by-test generator: every run draws new inputs; the seed is printed on failure."""
    return fresh_generator()


@pytest.fixture(scope="module")
def one_thread():
    """For tests of tiny models: their ops are microseconds, so a second thread only waits on the first (and on
    a shared machine, for a descheduled one: 30x slower). Kernel tests keep torch's default threads."""
    with using_threads(1):
        yield


def tolerance(dtype: torch.dtype) -> float:
    """Absolute/relative tolerance scaled to a storage dtype's rounding (a few ulps at unit scale)."""
    return {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]


def step_staggered(core, requests, seed: int = 0) -> None:
    """Submit requests to a DecodeCore a few at a time (0-3 per iteration, drawn from `seed`) between its
    steps, and step until every one is done: arrivals over time, as a server sees them."""
    import random

    todo, rng = list(requests), random.Random(seed)
    while todo or core.has_work():
        k = rng.randint(0, 3)
        if todo and k:
            core.submit(todo[:k])
            todo = todo[k:]
        core.step()
