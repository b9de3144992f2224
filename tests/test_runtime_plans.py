"""The decode core's pure planning functions (runtime/layout.py) and its policy without a model
(runtime/policy.py): layouts keep every group contiguous with the fewest moves, buckets and padded slices,
admission order, the queue bound, the host-side decode rules."""
import random
import types

import numpy as np
import pytest

from twotower_ext.runtime.layout import bucket, padded_slice, plan_layout
from twotower_ext.runtime.params import DecodeParams
from twotower_ext.runtime.policy import Policy, QueueFull
from twotower_ext.runtime.request import Request


def apply(placed, moves):
    src, dst = moves
    out = {r: g for r, g in placed.items() if r not in src}
    out.update({d: placed[s] for s, d in zip(src, dst)})
    return out


@pytest.mark.parametrize("trial", range(200))
def test_plan_layout_packs_groups_contiguously_with_minimal_moves(trial):
    rng = random.Random(trial)
    R = rng.randint(1, 40)
    groups = [f"g{i}" for i in range(rng.randint(1, 4))]
    placed = {r: rng.choice(groups) for r in rng.sample(range(R), rng.randint(0, R))}
    free = R - len(placed)
    new = {}
    for g in groups:
        k = rng.randint(0, free)
        free -= k
        if k:
            new[g] = k
    order = [g for g in groups if g in placed.values() or g in new]
    rng.shuffle(order)
    moves, slices, new_rows = plan_layout(placed, new, order, R)
    after = apply(placed, moves)
    for g, rows in new_rows.items():
        assert not set(rows) & set(after)
        after.update({r: g for r in rows})
    lo = 0
    for g in order:
        start, n = slices[g]
        assert start == lo
        assert [r for r in range(start, start + n)] == sorted(r for r, h in after.items() if h == g)
        lo += n
    src, dst = moves
    assert len(set(dst)) == len(dst) and all(placed[s] == after[d] for s, d in zip(src, dst))
    # a row moves only when it sits outside its group's slice: no move is wasted
    assert all(not slices[placed[s]][0] <= s < sum(slices[placed[s]]) for s in src)


def test_plan_layout_refuses_overflow_and_bad_order():
    with pytest.raises(ValueError, match="do not fit"):
        plan_layout({0: "a"}, {"a": 2}, ["a"], 2)
    with pytest.raises(ValueError, match="every group"):
        plan_layout({0: "a"}, {"b": 1}, ["a"], 4)


def test_buckets_and_padded_slices():
    assert [bucket(n, 256) for n in (1, 2, 3, 5, 8, 9, 17, 24, 25, 64, 65, 100)] == \
        [1, 2, 4, 8, 8, 16, 24, 24, 32, 64, 80, 112]
    assert bucket(5, 6) == 6 and bucket(32, 32) == 32
    with pytest.raises(ValueError):
        bucket(0, 8)
    for R in range(1, 40):
        for lo in range(R):
            for n in range(1, R - lo + 1):
                a, size = padded_slice(lo, n, R)
                assert size == bucket(n, R) and 0 <= a <= lo and lo + n <= a + size <= R


def req(mode="diffusion", **kw):
    return Request([1, 2, 3], DecodeParams(mode=mode, **kw).validate(512))


def test_policy_admits_in_order_and_bounds_the_queue():
    p = Policy(max_rows=2, max_queue=1)
    a, b, c = req(), req("ar"), req()
    p.enqueue([a])
    p.enqueue([b])
    p.enqueue([c])                      # 2 free rows + 1 queued
    with pytest.raises(QueueFull):
        p.enqueue([req()])
    plan = p.schedule()
    assert [r for _, _, rs in plan.admitted for r in rs] == [a, b] and p.queued == 1
    assert {g.mode for g in plan.groups} == {"diffusion", "ar"}
    c.cancel()
    p.schedule()
    assert c.finish_reason == "cancelled" and p.queued == 0
    lock = [req(max_new_tokens=16) for _ in range(3)]
    with pytest.raises(QueueFull, match="lockstep batch of 3"):
        Policy(2, 8).enqueue(lock, {"compat": True, "device_loop": False})


def test_policy_decode_rules_on_the_host():
    """The EOS cut and the partial last block, from a readback: emitted tokens, finish reasons, what extends."""
    p = Policy(max_rows=4, max_queue=0)
    r1 = req(max_new_tokens=20, block_size=8, eos_token_id=2)
    r2 = req(max_new_tokens=5, block_size=8, eos_token_id=None)
    r3 = req(max_new_tokens=20, block_size=8, eos_token_id=None)
    p.enqueue([r1, r2, r3])
    g = p.schedule().groups[0]
    out = types.SimpleNamespace(done=np.array([True, True, False]), passes=np.array([3, 2, 1]),
                                tokens=np.array([[5, 6, 2, 7, 8, 9, 9, 9], [4, 4, 4, 4, 4, 4, 4, 4], [3] * 8]),
                                hist=np.array([[3, 4, 1, 0, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0, 0, 0], [1] + [0] * 7]))
    p.update(g, out)
    assert r1.tokens == [5, 6, 2] and r1.finish_reason == "stop"                 # cut after the first EOS
    assert r2.tokens == [4] * 5 and r2.finish_reason == "length"                 # the kept positions only
    assert r3.tokens == [] and r3.state == "running" and g.pending == []         # still in its block
    assert r1.nfe_per_block == [3] and r1.commits_per_step == [[3, 4, 1]] and r1.nfe == 3
    assert sorted(x.id for x in p.take_finished()) == sorted([r1.id, r2.id])
