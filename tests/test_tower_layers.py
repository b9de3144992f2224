"""ops.tower_layers (csrc/tower/tower_torch.cpp): a tower's layers as one op on the CPU, over the layer table of
models/tower_program.py. Bit for bit the Python loop of models/towers.py (tower_op off) on every pass that takes it
(AR step, extension with snapshot and inert rows, denoiser pass with and without time conditioning, the fused commit),
every layer kind, fp32 / bf16, 1 and 2 threads, row ranges not starting at 0, quantised experts; the passes that keep
the loop; the eligibility rule; a bad table's one-line errors; opcheck."""
import pytest
import torch

import twotower_ext as tt
from twotower_ext import ops
from twotower_ext.models import tower_program
from twotower_ext.models.random_init import random_checkpoint, scaled_config

PATTERN = "M*E-ME*-M"   # every layer kind, each next to each other kind


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = scaled_config(width=1 / 16, vocab=300, hybrid_override_pattern=PATTERN, num_hidden_layers=len(PATTERN),
                       intermediate_size=96)
    return random_checkpoint(str(tmp_path_factory.mktemp("tower") / "ckpt"), cfg, seed=11)


def _passes(model, gen, rows=slice(0, 3), batch=4):
    """Every pass a decode runs, from one fresh cache; returns what each produced and the cache's states after."""
    dev = model.ctx_device
    n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
    prompts = [torch.randint(4, 300, (L,), generator=gen).tolist() for L in (5, 9, 7)[:n]]
    cache = model.new_cache(batch, 64, snapshot=True)
    out = {"prefill": model.prefill(prompts, cache, rows, snapshot=True)}
    out["ar"] = model.decode(torch.randint(4, 300, (n,), generator=gen), cache, rows, snapshot=True)
    out["extend"] = model.extend(torch.randint(4, 300, (n, 5), generator=gen), cache, rows, logits=True, snapshot=True)
    if isinstance(rows, slice):   # a padded bucket: the last row inert
        active = torch.tensor([True] * (n - 1) + [False], device=dev)
        r = cache.rows(rows)
        tokens = torch.randint(4, 300, (n, 3), generator=gen)
        out["extend_step"] = model.extend_step(tokens, cache, r, logits=True, snapshot=True, active=active)
        cache.count_appended(r, [3] * (n - 1) + [0])
    block = torch.randint(4, 300, (n, 16), generator=gen)
    block[:, 3:] = 3
    out["denoise"] = model.denoise(block, cache, torch.rand(n, generator=gen), rows)
    out["mock_ar"] = model.mock_ar(torch.randint(4, 300, (n,), generator=gen), cache, rows)
    x = block.clone()
    counts, done, _ = model.denoise_commit(x, cache, 0.8, rows, mask_id=3, gamma=0.5, step=0, steps_per_block=4)
    out["commit"] = torch.cat([x.flatten(), counts.long(), done.long()])
    for name, st in (("ctx", cache.ctx), ("den", cache.den)):
        for j, t in enumerate(st.layer_states(st.conv, st.ssm) + st.layer_states(st.prev_conv, st.prev_ssm)):
            out[f"{name} state {j}"] = t
        out[f"{name} lens"] = st.lens
    return out


def _both(model, seed, **kw):
    """_passes with the Python loop and with the op, from the same random inputs; also whether the op ran."""
    runs = {}
    calls = []
    real = ops.tower_layers

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    for flag in (False, True):
        model.tower_op = flag
        ops.tower_layers = spy
        try:
            runs[flag] = _passes(model, torch.Generator().manual_seed(seed), **kw)
        finally:
            ops.tower_layers = real
            model.tower_op = True
    return runs[False], runs[True], calls


def _assert_equal(loop, op):
    assert loop.keys() == op.keys()
    for k in loop:
        assert torch.equal(loop[k], op[k]), (k, (loop[k].double() - op[k].double()).abs().max().item())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_equals_the_python_loop(ckpt, dtype, threads):
    model = tt.load(ckpt, dtype=dtype).model
    with tt.threads.using_threads(threads):
        loop, op, calls = _both(model, seed=threads)
    _assert_equal(loop, op)
    # the AR step, both extensions, two denoiser passes, mock-AR and the commit's pass ran as the op; the prefill
    # (fresh rows: causal SDPA over the prompt) kept the loop
    assert len(calls) == 7, calls


def test_rows_from_an_offset_and_scattered_rows(ckpt):
    model = tt.load(ckpt, dtype=torch.float32).model
    loop, op, calls = _both(model, seed=3, rows=slice(1, 4))   # row0 = 1
    _assert_equal(loop, op)
    assert calls
    loop, op, calls = _both(model, seed=4, rows=[2, 0])        # not a slice: the loop (take / put copies the rows)
    _assert_equal(loop, op)
    assert not calls


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantised_experts(ckpt, fmt):
    model = tt.load(ckpt, dtype=torch.bfloat16, experts=fmt).model
    loop, op, calls = _both(model, seed=5)
    _assert_equal(loop, op)
    assert calls


def test_parity_checkpoint_runs_the_op():
    """The shipped parity checkpoint (fp32) takes the op on every decode pass (its token identity with NVIDIA's
    outputs is tests/test_model.py's and test_engine.py's, which run through it)."""
    from test_model import CKPT

    model = tt.load(CKPT, dtype=torch.float32).model
    with torch.no_grad():
        assert model.layer_program("context") is not None and model.layer_program("denoiser") is not None
    loop, op, calls = _both(model, seed=6)
    _assert_equal(loop, op)
    assert len(calls) == 7


def test_eligibility(ckpt):
    model = tt.load(ckpt, dtype=torch.float32).model
    layers = model.weights.context.layers
    assert tower_program.eligible(layers, torch.float32) is None
    assert "dtype torch.float16" in tower_program.eligible(layers, torch.float16)
    assert "norm weight" in tower_program.eligible(layers, torch.bfloat16)   # fp32 norms in a bf16 table
    plain = tt.load(ckpt, dtype=torch.float32).model.weights.context.layers
    plain[1].mixer.q = torch.zeros(plain[1].mixer.q.shape)   # an unpacked linear (as on CUDA or in training)
    assert tower_program.eligible(plain, torch.float32) == (
        "layer 1 (attention) has a linear weight that is not packed in torch.float32 on the CPU")
    assert tower_program.build(plain, model.config, torch.float32) is None
    # the table: one header int and float, then per layer the kind and the next norm's flag
    prog = tower_program.build(layers, model.config, torch.float32, modulate_first=True)
    assert prog.ints[0] == len(PATTERN) and prog.floats[0] == model.config.layer_norm_epsilon
    assert prog.ints[1:3] == [tower_program.KINDS["mamba"], 1]   # the next layer is attention: modulated first
    assert prog.weights[-1] is None                              # no final norm given: the plain add


def test_model_keeps_the_loop_where_the_op_does_not_apply(ckpt):
    model = tt.load(ckpt, dtype=torch.float32).model
    old = ops.use_reference(True)
    try:
        with torch.no_grad():
            assert model.layer_program("context") is None
    finally:
        ops.use_reference(old)
    assert model.layer_program("denoiser") is None   # autograd on
    model.tower_op = False
    with torch.no_grad():
        assert model.layer_program("denoiser") is None


def _table_args(model):
    with torch.no_grad():
        prog = model.layer_program("context")
    cache = model.new_cache(2, 32)
    x = torch.randn(2, 1, model.config.hidden_size)
    lens = cache.ctx.lens
    flat, _ = cache.ctx.kv_index(cache.rows(None), lens.long()[:, None])
    return prog, (x, x.clone()), cache.ctx.layer_states(cache.ctx.conv, cache.ctx.ssm), lens, flat


@pytest.mark.parametrize("damage, words", [
    (lambda w, i, f: (w, i[:-1], f), "ints end at entry"),
    (lambda w, i, f: (w, i + [0], f), "entries left over"),
    (lambda w, i, f: (w, i, f[:1]), "floats end at entry"),
    (lambda w, i, f: (w[:3], i, f), "weights end at entry"),
    (lambda w, i, f: (w, [i[0], 7] + i[2:], f), "has kind 7, expected 0-3"),
    (lambda w, i, f: ([None] + w[1:], i, f), r"weights\[0\] must be a tensor, got None"),
])
def test_bad_table_is_one_line_error(ckpt, damage, words):
    model = tt.load(ckpt, dtype=torch.float32).model
    prog, (x, h), states, lens, flat = _table_args(model)
    w, i, f = damage(list(prog.weights), list(prog.ints), list(prog.floats))
    with pytest.raises(RuntimeError, match=words) as e:
        ops.tower_layers(x, h, w, i, f, states, lens, None, flat, None, None, 0, True)
    assert "\n" not in str(e.value).split("\nException raised from")[0].strip()


def test_bad_rows_and_shapes(ckpt):
    model = tt.load(ckpt, dtype=torch.float32).model
    prog, (x, h), states, lens, flat = _table_args(model)
    with pytest.raises(RuntimeError, match=r"rows \[1, 3\) are outside a state"):
        ops.tower_layers(x, h, prog.weights, prog.ints, prog.floats, states, lens, None, flat, None, None, 1, True)
    with pytest.raises(RuntimeError, match="x and h must be"):
        ops.tower_layers(x, h[:1], prog.weights, prog.ints, prog.floats, states, lens, None, flat, None, None, 0,
                         True)
    with pytest.raises(RuntimeError, match="write needs kv_index"):
        ops.tower_layers(x, h, prog.weights, prog.ints, prog.floats, states, lens, None, None, None, None, 0, True)
    with pytest.raises(RuntimeError, match="states end at entry"):
        ops.tower_layers(x, h, prog.weights, prog.ints, prog.floats, states[:1], lens, None, flat, None, None, 0,
                         True)
    layers, H = len(model.weights.context.layers), model.config.hidden_size
    for bad in ((2, layers, 2, H), (2, layers + 1, 3, H), (2, layers, 3)):   # too few rows per layer, layers, dims
        with pytest.raises(RuntimeError, match=r"modulation must be \[rows, \d+, 3, hidden\]"):
            ops.tower_layers(x, h, prog.weights, prog.ints, prog.floats, states, lens, None, flat, None,
                             torch.zeros(bad), 0, True)


def test_nan_input_stays_nan(ckpt):
    model = tt.load(ckpt, dtype=torch.float32).model
    prog, (x, h), states, lens, flat = _table_args(model)
    h[0, 0, 0] = float("nan")
    _, out = ops.tower_layers(x, h, prog.weights, prog.ints, prog.floats, states, lens, None, flat, None, None, 0, True)
    assert out[0].isnan().any() and not out[1].isnan().any()


def test_opcheck(ckpt):
    model = tt.load(ckpt, dtype=torch.float32).model
    prog, (x, h), states, lens, flat = _table_args(model)
    torch.library.opcheck(torch.ops.twotower.tower_layers.default,
                          (x, h, prog.weights, prog.ints, prog.floats, states, lens, None, flat, None, None, 0, True),
                          test_utils=("test_schema", "test_faketensor"))
