"""models/time_rows.py: the denoiser's time conditioning rows remembered per t value on the CPU give exactly the rows
computed for that row alone, whatever the batch, the order of calls or the threads; a weight changed in place, a
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


def alone(w, dtype, v: float) -> torch.Tensor:
    """The rows of one t value computed for it alone: tables + time_modulation([v])."""
    return (w.tables[None] + time_modulation(torch.tensor([v], dtype=torch.float32), w, dtype)[:, None])[0]


@torch.no_grad()
def test_each_row_is_its_value_computed_alone_hit_or_miss(weights, gen):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    values = torch.randint(0, 17, (7,), generator=gen).float() / 16   # a block's masked fractions, repeats included
    for t in (values, values.flip(0), values[:1], torch.rand(3, generator=gen)):
        got = rows(t)
        assert got.shape == (len(t), *w.tables.shape) and got.dtype == dtype
        for i, v in enumerate(t.tolist()):
            assert torch.equal(got[i], alone(w, dtype, v))
        assert torch.equal(rows(t), got)   # served from memory now


@torch.no_grad()
def test_a_weight_changed_in_place_is_seen(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    t = torch.tensor([0.5, 0.25])
    before = rows(t)
    saved = w.block_b.clone()
    try:
        w.block_b.add_(1.0)
        after = rows(t)
        assert not torch.equal(after, before)
        assert torch.equal(after[0], alone(w, dtype, 0.5)) and torch.equal(after[1], alone(w, dtype, 0.25))
    finally:
        w.block_b.copy_(saved)
    assert torch.equal(rows(t), before)


@torch.no_grad()
def test_a_weight_replaced_is_seen(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    t = torch.tensor([0.5])
    before = rows(t)
    saved = w.block_b
    try:
        w.block_b = saved + 1.0   # a new tensor, its version count as fresh as the old one's may be
        after = rows(t)
        assert not torch.equal(after, before) and torch.equal(after[0], alone(w, dtype, 0.5))
    finally:
        w.block_b = saved
    assert torch.equal(rows(t), before)


@torch.no_grad()
def test_nan_t_gives_nan_rows_every_time(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    for _ in range(2):
        got = rows(torch.tensor([float("nan"), 0.5]))
        assert torch.isnan(got[0]).any() and torch.equal(got[1], alone(w, dtype, 0.5))


def test_autograd_computes_the_batch_with_gradients():
    w = tt.load(CKPT, dtype=torch.float32, threads=0).model.weights.time
    w.block_b.requires_grad_(True)
    t = torch.tensor([0.5, 0.75])
    got = TimeRows(w, torch.float32)(t)
    assert got.requires_grad
    got.sum().backward()
    assert w.block_b.grad is not None and torch.isfinite(w.block_b.grad).all()
    with torch.no_grad():
        assert torch.equal(got.detach(), w.tables[None] + time_modulation(t, w, torch.float32)[:, None])


@torch.no_grad()
def test_a_small_budget_evicts_and_stays_exact(weights, monkeypatch, gen):
    w, dtype = weights
    monkeypatch.setattr(time_rows, "BUDGET_BYTES", 3 * w.tables.nbytes)
    rows = TimeRows(w, dtype)
    for _ in range(4):
        t = torch.randint(0, 9, (5,), generator=gen).float() / 8
        got = rows(t)
        for i, v in enumerate(t.tolist()):
            assert torch.equal(got[i], alone(w, dtype, v))


def test_threads_at_once_get_exact_rows(weights):
    w, dtype = weights
    rows = TimeRows(w, dtype)
    want = {k: alone(w, dtype, k / 16) for k in range(17)}
    bad = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(30):
                ks = torch.randint(0, 17, (4,), generator=g)
                got = rows(ks.float() / 16)
                bad.extend(k for i, k in enumerate(ks.tolist()) if not torch.equal(got[i], want[k]))

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
    assert torch.equal(rows(t), w.tables[None] + time_modulation(t, w, dtype)[:, None])
