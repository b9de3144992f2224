"""The model calls a decode step makes (decode, extend, denoise, denoise_commit, mock_ar) never read device values on
the host and never produce a data-dependent shape, so a CUDA graph can capture them: checked on CPU with a
TorchDispatchMode that fails on every op that reads a value back or sizes its output from the data, and with the
Tensor methods that copy to the host patched to fail."""
import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import twotower_ext as tt
from twotower_ext import ops

PARITY = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")

aten = torch.ops.aten
# Ops whose result needs the data on the host: a scalar read (item, bool(t), int(t), equal, allclose) or an
# output shape that depends on the values.
HOST_READS = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
    aten.allclose.default, aten.nonzero.default, aten.nonzero_numpy.default, aten.argwhere.default,
    aten.masked_select.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten._unique.default, aten._unique2.default, aten.repeat_interleave.Tensor, aten.bincount.default,
    aten.histc.default, aten.masked_scatter.default,
}
_READ_PACKETS = {f.overloadpacket for f in HOST_READS}
HOST_COPIES = ("tolist", "item", "cpu", "numpy", "__array__")


class HostReadError(AssertionError):
    pass


class _NoHostReads(TorchDispatchMode):
    """Fails on host reads; records (op, output shapes) of every op in `trace`."""

    def __init__(self, trace=None):
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _READ_PACKETS:
            raise HostReadError(f"{func} inside a model call")
        if func.overloadpacket is aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            raise HostReadError("boolean-mask indexing (a data-dependent shape) inside a model call")
        out = func(*args, **(kwargs or {}))
        if self.trace is not None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.trace.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


@contextlib.contextmanager
def no_host_reads(monkeypatch, trace=None):
    with monkeypatch.context() as m:
        for name in HOST_COPIES:
            def refuse(*a, _name=name, **kw):
                raise HostReadError(f"Tensor.{_name} inside a model call")
            m.setattr(torch.Tensor, name, refuse)
        with _NoHostReads(trace):
            yield


def test_the_guard_catches_host_reads(monkeypatch):
    t = torch.arange(4)
    for read in (lambda: t.tolist(), lambda: t[1].item(), lambda: int(t[1]), lambda: bool(t[0]),
                 lambda: t.nonzero(), lambda: t[t > 1], lambda: t.cpu(), lambda: torch.bincount(t),
                 lambda: t.numpy(), lambda: torch.equal(t, t)):
        with pytest.raises(HostReadError), no_host_reads(monkeypatch):
            read()
    with no_host_reads(monkeypatch):
        (t + 1).index_copy_(0, t[:2], t[2:])   # device-side work passes


def _real_pattern(tmp_path, layers=None):
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    cfg = scaled_config(width=1 / 16, layers=layers, vocab=300)
    return random_checkpoint(str(tmp_path / "ckpt"), cfg, seed=5)


def _no_moe(tmp_path):
    """A random checkpoint of the real widths' shapes with only Mamba and attention layers (no MoE layer)."""
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    cfg = scaled_config(width=1 / 16, vocab=300, hybrid_override_pattern="MM*M*M", num_hidden_layers=6)
    return random_checkpoint(str(tmp_path / "ckpt"), cfg, seed=6)


@pytest.mark.parametrize("which", ["no-moe", "parity", "real-pattern"])
def test_model_calls_have_no_host_reads(which, tmp_path, monkeypatch):
    path = {"parity": lambda: PARITY, "real-pattern": lambda: _real_pattern(tmp_path),
            "no-moe": lambda: _no_moe(tmp_path)}[which]()
    model = tt.load(path, dtype=torch.float32).model
    # The CPU remembers the time conditioning per t value, reading t on the host (free there); CUDA computes it every
    # pass, as with this off.
    model.time_rows.remember = False
    V = model.config.vocab_size
    dev = model.ctx_device
    block = torch.tensor([[4, 5, 6, 3], [3, 3, 9, 3], [7, 3, 3, 3]], device=dev)
    t = torch.tensor([0.5, 0.75, 0.75], device=dev)
    traces = []
    for prompts in ([[1, 5, 9, 11], [1, 7], [1, 2, 3, 4, 5, 6, 7]], [[1, 2] * 9, [1], [1, 4, 4]]):
        cache = model.new_cache(3, 64, snapshot=True)
        model.prefill(prompts, cache, snapshot=True)   # prefill aside
        rows = slice(0, 3)
        lens_before = list(cache.lens_host)
        traces.append([])
        with no_host_reads(monkeypatch, traces[-1]):
            logits = model.decode(block[:, 0], cache, rows)
            model.extend(block, cache, rows, snapshot=True)
            den = model.denoise(block, cache, t, rows)
            committed = block.clone()   # the runner's call: the pass, the LM head and the commit in one
            i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device=dev)   # noqa: E731
            counts, done, den_logits = model.denoise_commit(
                committed, cache, t, rows, mask_id=3, gamma=torch.tensor([0.9], device=dev), step=i32(0, 1, 2),
                steps_per_block=i32(4), temperature=torch.tensor([0.0, 1.0, 0.5], device=dev),
                seed=torch.tensor([1], device=dev), block=torch.tensor([0, 1, 2], device=dev), kept=i32(4, 3, 4),
                logits=True)
            mock = model.mock_ar(block[:, -1], cache, rows)
            model.decode(block[1:, 1], cache, slice(1, 3), snapshot=True)   # a sub-range
            # a padded-bucket extension: row 0 inert (runtime/runner.py's graphs)
            model.extend_step(block, cache, cache.rows(rows), snapshot=True,
                              active=torch.tensor([False, True, True], device=dev))
            cache.count_appended(slice(1, 3), 4)
        assert logits.shape == (3, V) and den.shape == (3, 4, V) and mock.shape == (3, V)
        assert torch.equal(den_logits.float(), den) and counts.shape == (3,) and not torch.equal(committed, block)
        assert all(torch.isfinite(x).all() for x in (logits, den, mock))
        # The host counted what was appended; the device advanced its own lengths: they agree.
        want = [lens_before[0] + 5, lens_before[1] + 10, lens_before[2] + 10]
        assert cache.lens_host == want and cache.lens.tolist() == want
    # Other cache lengths, the same ops with the same shapes: nothing is sized from the lengths (capturable).
    assert traces[0] == traces[1]
