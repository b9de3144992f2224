"""Self-distillation stage (python -m twotower_ext.train distill): its data is the context tower's own greedy
continuation, its batches a function of (seed, step), its loss restricted to the distilled positions."""
from __future__ import annotations

import os
import types

import pytest
import torch

import twotower_ext as tt
from twotower_ext.train import distill
from twotower_ext.train.trainer import diffusion_loss

PARITY = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")


def _stream(n=5000, vocab=512, seed=3):
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def test_prompts_depend_on_seed_and_index_only():
    s = _stream()
    whole = distill.prompts_at(s, 6, 12, seed=1)
    parts = torch.cat([distill.prompts_at(s, 2, 12, seed=1), distill.prompts_at(s, 4, 12, seed=1, first=2)])
    assert torch.equal(whole, parts) and whole.dtype == torch.int64
    assert not torch.equal(whole, distill.prompts_at(s, 6, 12, seed=2))
    for row in whole:   # each prompt is a crop of the stream
        starts = [i for i in range(len(s) - 12) if torch.equal(s[i:i + 12].long(), row)]
        assert starts


def test_sequences_are_the_engines_greedy_ar_continuations_and_resume(tmp_path):
    s = _stream()
    path = str(tmp_path / "seq.pt")
    first, lens = distill.generate_sequences(PARITY, s, path, 3, 8, 10, batch=2, seed=0, log=lambda m: None)
    assert first.shape == (3, 18) and first.dtype == torch.int32 and lens.tolist() == [8, 8, 8]
    lm = tt.load(PARITY, dtype=torch.float32)
    prompts = distill.prompts_at(s, 3, 8, seed=0)
    for row, p in zip(first, prompts):
        res = lm.generate(p.tolist(), mode="ar", max_new_tokens=10, eos_token_id=None)
        assert row.tolist() == res.sequences[0]
    more, _ = distill.generate_sequences(PARITY, s, path, 5, 8, 10, batch=2, seed=0, log=lambda m: None)
    assert torch.equal(more[:3], first) and more.shape == (5, 18)   # resumed: the first rows kept
    with pytest.raises(SystemExit, match="generated with"):
        distill.generate_sequences(PARITY, s, path, 5, 8, 11, batch=2, seed=0, log=lambda m: None)


def test_batches_mark_only_continuations_and_data_rows():
    seqs = torch.arange(40 * 24, dtype=torch.int32).view(40, 24)
    at = distill.batch_fn(seqs, _stream(), batch=8, seed=5, mix=0.25, prompt_lens=8)
    ids, keep = at(7)
    ids2, keep2 = at(7)
    assert torch.equal(ids, ids2) and torch.equal(keep, keep2)
    assert ids.shape == keep.shape == (8, 24) and ids.dtype == torch.int64
    assert keep[:6, :8].sum() == 0 and keep[:6, 8:].all()       # distilled rows: the continuation only
    assert keep[6:].all()                                         # 2 data rows: everything
    assert all(int(r[0]) % 24 == 0 for r in ids[:6])              # whole distilled rows
    assert not torch.equal(at(8)[0], ids)


def test_mixed_prompt_lengths_cycle_per_batch_and_fill_the_row(tmp_path):
    """A list of prompt lengths: each generation batch one length, rows all max(len) + gen_len long, each row's
    prompt its own length's crop and the rest the engine's greedy continuation; keep starts at each row's own
    prompt end."""
    s = _stream()
    path = str(tmp_path / "seq.pt")
    rows, lens = distill.generate_sequences(PARITY, s, path, 5, [2, 6], 4, batch=2, seed=0, log=lambda m: None)
    assert lens.tolist() == [2, 2, 6, 6, 2] and rows.shape == (5, 10)
    lm = tt.load(PARITY, dtype=torch.float32)
    for i in (0, 3):
        p = distill.prompts_at(s, 1, int(lens[i]), seed=0, first=i)[0]
        res = lm.generate(p.tolist(), mode="ar", max_new_tokens=10 - int(lens[i]), eos_token_id=None)
        assert rows[i].tolist() == res.sequences[0]
    again, _ = distill.generate_sequences(PARITY, s, path, 5, [2, 6], 4, batch=2, seed=0, log=lambda m: None)
    assert torch.equal(again, rows)
    at = distill.batch_fn(rows, s, batch=4, seed=1, mix=0.0, prompt_lens=lens)
    for step in range(3):
        ids, keep = at(step)
        for r, k in zip(ids, keep):
            i = next(j for j in range(5) if torch.equal(rows[j].long(), r))
            assert k.tolist() == [c >= int(lens[i]) for c in range(10)]


def test_loss_counts_only_kept_positions(monkeypatch):
    """diffusion_loss(keep=) is the cross-entropy over exactly the masked positions that keep marks."""
    from twotower_ext.train import trainer
    from twotower_ext.train.data import MASK

    B, L, V = 3, 32, 50
    ids = torch.randint(4, V, (B, L), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(trainer, "context_forward", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(trainer, "denoiser_forward", lambda *a, **k: logits.clone())
    keep = torch.zeros(B, L, dtype=torch.bool)
    keep[:, 16:] = True
    keep[2] = True
    fake = types.SimpleNamespace(w=None, cfg=None)
    got = diffusion_loss(fake, ids, 16, torch.Generator().manual_seed(2), keep=keep)
    _, mask, _ = trainer.mask_blocks(ids, 16, torch.Generator().manual_seed(2))
    sel = mask & keep
    assert sel.sum() < mask.sum()   # the draw masks some positions outside keep
    want = torch.nn.functional.cross_entropy(logits[sel].index_fill(-1, torch.tensor([MASK]), float("-inf")), ids[sel])
    assert torch.allclose(got, want)
    everything = diffusion_loss(fake, ids, 16, torch.Generator().manual_seed(2))
    want_all = torch.nn.functional.cross_entropy(logits[mask].index_fill(-1, torch.tensor([MASK]), float("-inf")), ids[mask])
    assert torch.allclose(everything, want_all) and not torch.allclose(got, everything)
