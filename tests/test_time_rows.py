"""models/time_rows.py: the denoiser's time conditioning rows remembered per t vector on the CPU are exactly the rows
computed for that batch of t, whatever the order of calls or the threads; a weight changed in place or replaced, a
NaN t and autograd are never served from memory."""
import os
import threading

import pytest
import torch

import twotower_ext as tt
from twotower_ext.models import time_rows
from twotower_ext.models.layers import time_modulation
from twotower_ext.models.time_rows import TimeRows

CKPT = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16])
def weights(request):
    return tt.load(CKPT, dtype=request.param, threads=0).model.weights.time, request.param


def batch(w, dtype, t: torch.Tensor) -> torch.Tensor:
    """The rows of a batch of t computed as the pass computes them: tables + time_modulation(t)."""
    return w.tables[None] + time_modulation(t, w, dtype)[:, None]


@torch.no_grad()
def test_rows_equal_the_batch_computed_hit_or_miss(weights, gen):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    values = torch.randint(0, 17, (7,), generator=gen).float() / 16   # a block's masked fractions, repeats included
    for t in (values, values.flip(0), values[:1], torch.rand(3, generator=gen), values):
        got = rows(t)
        assert got.shape == (len(t), *w.tables.shape) and got.dtype == dtype
        assert torch.equal(got, batch(w, dtype, t))
        assert torch.equal(rows(t.clone()), got)   # served from memory now


@torch.no_grad()
def test_a_weight_changed_in_place_or_replaced_is_seen(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    t = torch.tensor([0.5, 0.25])
    before = rows(t).clone()
    saved = w.block_b.clone()
    try:
        w.block_b.add_(1.0)
        after = rows(t)
        assert not torch.equal(after, before) and torch.equal(after, batch(w, dtype, t))
    finally:
        w.block_b.copy_(saved)
    assert torch.equal(rows(t), before)
    original = w.block_b
    try:
        w.block_b = original + 1.0   # a new tensor, its version count as fresh as the old one's may be
        after = rows(t)
        assert not torch.equal(after, before) and torch.equal(after, batch(w, dtype, t))
    finally:
        w.block_b = original
    assert torch.equal(rows(t), before)


@torch.no_grad()
def test_nan_t_gives_nan_rows_every_time(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    for _ in range(2):
        got = rows(torch.tensor([float("nan"), 0.5]))
        assert torch.isnan(got[0]).any() and torch.equal(got[1], batch(w, dtype, torch.tensor([float("nan"), 0.5]))[1])


def test_autograd_computes_the_batch_with_gradients():
    w = tt.load(CKPT, dtype=torch.float32, threads=0).model.weights.time
    w.block_b.requires_grad_(True)
    t = torch.tensor([0.5, 0.75])
    got = TimeRows(w, torch.float32)(t)
    assert got.requires_grad
    got.sum().backward()
    assert w.block_b.grad is not None and torch.isfinite(w.block_b.grad).all()
    with torch.no_grad():
        assert torch.equal(got.detach(), batch(w, torch.float32, t))


@torch.no_grad()
def test_a_small_budget_evicts_and_stays_exact(weights, monkeypatch, gen):
    w, dtype = weights
    monkeypatch.setattr(time_rows, "BUDGET_BYTES", 3 * w.tables.nbytes)
    rows = TimeRows(w, dtype)
    for _ in range(6):
        t = torch.randint(0, 9, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).float() / 8
        assert torch.equal(rows(t), batch(w, dtype, t))


def test_threads_at_once_get_exact_rows(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    vectors = [torch.tensor([k / 16, (16 - k) / 16]) for k in range(17)]
    with torch.no_grad():
        want = [batch(w, dtype, t) for t in vectors]
    bad = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(30):
                k = int(torch.randint(0, 17, (1,), generator=g))
                if not torch.equal(rows(vectors[k]), want[k]):
                    bad.append(k)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert bad == []


@torch.no_grad()
def test_remember_off_computes_the_batch_every_call(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    rows.remember = False
    t = torch.tensor([0.5, 0.125, 0.5])
    first = rows(t)
    assert torch.equal(first, batch(w, dtype, t)) and rows(t) is not first
