"""The decode engine: NVIDIA parity (reference_compat), default per-row semantics, bad arguments."""
import json
import os
import warnings

import pytest
import torch

import twotower_ext as tt
from twotower_ext import ops

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
GOLDEN = json.load(open(os.path.join(DATA, "golden.json")))
PROMPTS = {p["id"]: p["ids"] for p in GOLDEN["prompts"]}
MODE = {"mask_diffusion": "diffusion", "ar": "ar", "mock_ar": "mock_ar"}
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread only waits on the first


@pytest.fixture(scope="module")
def lm():
    torch.backends.cuda.matmul.allow_tf32 = False
    return tt.load(os.path.join(DATA, "checkpoint"), dtype=torch.float32)


def run_kwargs(run):
    p = run["params"]
    kw = dict(mode=MODE[run["mode"]], max_new_tokens=p["max_new_tokens"], temperature=p["temperature"])
    if kw["mode"] == "diffusion":
        kw.update(block_size=p["block_size"], steps_per_block=p["steps_per_block"], threshold=p["gamma"])
    return kw


@pytest.mark.parametrize("run", GOLDEN["runs"], ids=lambda r: f"{r['mode']}-{r['prompt']}-{r['params'].get('gamma')}"
                         f"-S{r['params'].get('block_size')}-steps{r['params'].get('steps_per_block')}")
def test_parity_with_nvidia_reference(lm, run):
    res = lm.generate(PROMPTS[run["prompt"]], reference_compat=True, **run_kwargs(run))
    assert res.sequences[0] == run["output_ids"]
    if run["mode"] == "mask_diffusion":
        assert res.nfe_per_block[0] == run["nfe_per_block"]
        assert res.commits_per_step[0] == run["commits_per_step"]
        assert res.stats["nfe"] == run["nfe_total"]


def diffusion(lm, prompts, **kw):
    kw = {"max_new_tokens": 48, "threshold": 0.8, **kw}
    return lm.generate(prompts, **kw)


def test_eos_truncates_per_row(lm):
    base = diffusion(lm, [PROMPTS["p0"], PROMPTS["p2"]], eos_token_id=None)
    new0 = base.new_tokens[0]
    eos = new0[20]                                  # a token row 0 produces mid-way, in its second block
    res = diffusion(lm, [PROMPTS["p0"], PROMPTS["p2"]], eos_token_id=eos)
    cut = new0.index(eos) + 1
    assert res.new_tokens[0] == new0[:cut]          # cut right after its first EOS
    row1 = base.new_tokens[1]
    want1 = row1[: row1.index(eos) + 1] if eos in row1 else row1
    assert res.new_tokens[1] == want1               # the other row is unaffected by row 0's EOS
    assert len(res.nfe_per_block[0]) == (cut + 15) // 16


def test_reference_compat_keeps_whole_blocks_and_stops_all_rows(lm):
    base = diffusion(lm, [PROMPTS["p0"]], eos_token_id=None)
    eos = base.new_tokens[0][20]
    res = diffusion(lm, [PROMPTS["p0"]], eos_token_id=eos, reference_compat=True)
    assert res.new_tokens[0] == base.new_tokens[0][:32]  # the whole EOS block is kept, then it stops


def test_ragged_batch_is_batch_invariant(lm):
    prompts = [PROMPTS["p1"], PROMPTS["p0"], PROMPTS["p2"][:23]]
    batch = diffusion(lm, prompts, max_new_tokens=40)
    for i, p in enumerate(prompts):
        alone = diffusion(lm, [p], max_new_tokens=40)
        assert batch.sequences[i] == alone.sequences[0]
        assert batch.nfe_per_block[i] == alone.nfe_per_block[0]
        assert batch.commits_per_step[i] == alone.commits_per_step[0]


def test_partial_last_block(lm):
    res = diffusion(lm, [PROMPTS["p1"]], max_new_tokens=21, eos_token_id=None)
    assert len(res.new_tokens[0]) == 21 and len(res.nfe_per_block[0]) == 2
    full = diffusion(lm, [PROMPTS["p1"]], max_new_tokens=32, eos_token_id=None)
    assert res.new_tokens[0] == full.new_tokens[0][:21]


def test_sampling_is_seeded_and_batch_independent(lm):
    kw = dict(temperature=1.0, max_new_tokens=32, eos_token_id=None)
    a = diffusion(lm, [PROMPTS["p0"], PROMPTS["p1"]], seed=7, **kw)
    b = diffusion(lm, [PROMPTS["p0"], PROMPTS["p1"]], seed=7, **kw)
    c = diffusion(lm, [PROMPTS["p0"], PROMPTS["p1"]], seed=8, **kw)
    alone = diffusion(lm, [PROMPTS["p1"]], seed=7, **kw)
    assert a.sequences == b.sequences
    assert a.sequences != c.sequences
    assert a.sequences[1] == alone.sequences[0]
    greedy = diffusion(lm, [PROMPTS["p0"]], max_new_tokens=32, eos_token_id=None)
    assert a.sequences[0] != greedy.sequences[0]


def test_compat_mode_conditions_every_row_on_the_batch_mean_t(lm, monkeypatch):
    """reference_compat: every denoiser pass gets t = the batch's mean masked fraction for all rows (NVIDIA's
    reference); the default: each row its own fraction. Checked on the t the model receives, on a batch whose
    rows commit at different rates."""
    seen = []
    real = lm.model.denoise_commit

    def spy(x, cache, t, *a, **kw):
        seen.append(((x == 3).double().mean(1), torch.as_tensor(t).double().reshape(-1).expand(x.shape[0])))
        return real(x, cache, t, *a, **kw)

    monkeypatch.setattr(lm.model, "denoise_commit", spy)
    prompts = [PROMPTS["p0"], PROMPTS["p2"][:len(PROMPTS["p0"])]]
    for compat in (True, False):
        seen.clear()
        diffusion(lm, prompts, max_new_tokens=32, eos_token_id=None, reference_compat=compat)
        assert any(float(f.max() - f.min()) > 0 for f, _ in seen), "the rows never differed: the test proves nothing"
        for frac, t in seen:
            want = frac.mean().expand_as(frac) if compat else frac
            torch.testing.assert_close(t, want, atol=1e-6, rtol=0)


def test_ar_sampling_frequencies_follow_softmax():
    """AR / mock-AR sampling (runtime.sampler): 12000 draws, one per token index, in ONE call with a key per
    row, follow softmax(logits / T) over the 6 non-mask ids (chi-square, p < 1e-4); the excluded id is never
    drawn; a row draws the same alone as in the batch; greedy is the largest non-excluded logit."""
    from twotower_ext.runtime.sampler import sample_tokens

    row = torch.tensor([0.3, -1.0, 0.9, 5.0, 0.0, 1.4, -0.2])   # id 3 is the mask
    n = 12000
    index = torch.arange(n)
    for T in (0.7, 1.6):
        draws = sample_tokens(row.expand(n, -1), T, 11, index, exclude=3)[:, 0]
        assert int(sample_tokens(row[None], T, 11, index[77:78], exclude=3)) == int(draws[77])
        counts = torch.bincount(draws, minlength=7).double()
        assert counts[3] == 0
        p = torch.softmax(torch.cat([row[:3], row[4:]]).double() / T, 0)
        obs = torch.cat([counts[:3], counts[4:]])
        chi2 = float(((obs - p * obs.sum()) ** 2 / (p * obs.sum())).sum())
        assert chi2 < 25.7, f"T {T}: chi2 {chi2:.1f} over 5 degrees of freedom (p < 1e-4); counts {obs.tolist()}"
    assert int(sample_tokens(row[None], 0.0, 11, 0, exclude=3)) == 5      # greedy: the largest non-mask logit
    assert int(sample_tokens(row[None], 0.0, 11, 0)) == 3                 # AR: nothing excluded


@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
def test_ar_modes_ragged_and_eos(lm, mode):
    prompts = [PROMPTS["p0"], PROMPTS["p1"]]
    base = lm.generate(prompts, mode=mode, max_new_tokens=12, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = lm.generate([p], mode=mode, max_new_tokens=12, eos_token_id=None)
        assert base.sequences[i] == alone.sequences[0]
    eos = base.new_tokens[0][5]
    res = lm.generate(prompts, mode=mode, max_new_tokens=12, eos_token_id=eos)
    assert res.new_tokens[0] == base.new_tokens[0][: base.new_tokens[0].index(eos) + 1]


def test_inputs_forms_and_stats(lm):
    ids = PROMPTS["p0"]
    a = lm.generate(ids, max_new_tokens=16)
    b = lm.generate([ids], max_new_tokens=16)
    c = lm.generate(torch.tensor([ids]), max_new_tokens=16)
    assert a.sequences == b.sequences == c.sequences
    s = a.stats
    assert s["tokens"] == len(a.new_tokens[0]) and s["nfe"] == sum(a.nfe_per_block[0]) > 0
    assert s["tokens_per_nfe"] == pytest.approx(s["tokens"] / s["nfe"]) and s["tokens_per_s"] > 0
    assert s["denoiser_s"] > 0 and s["context_s"] > 0


def test_streaming_callback_sees_every_block(lm):
    events = []
    res = lm.generate(PROMPTS["p1"], max_new_tokens=40, eos_token_id=None, callback=events.append)
    assert [e["block"] for e in events] == [0, 1, 2]
    assert events[-1]["sequences"][0] == res.sequences[0]


@pytest.mark.parametrize("kw,words", [
    (dict(threshold=1.5), "threshold must be a float in"),
    (dict(threshold=-0.1), "threshold must be a float in"),
    (dict(block_size=0), "block_size must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(mode="beam"), "mode must be one of"),
    (dict(steps_per_block=0), "steps_per_block must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(max_new_tokens=20, reference_compat=True), "multiple of block_size"),
])
def test_bad_arguments(lm, kw, words):
    with pytest.raises(ValueError, match=words):
        lm.generate(PROMPTS["p0"], **kw)


def test_bad_prompts(lm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        lm.generate([[1, 2], []])
    with pytest.raises(ValueError, match="outside"):
        lm.generate([1, 99999])
    with pytest.raises(ValueError, match="equal length"):
        lm.generate([[1, 2], [1, 2, 3]], reference_compat=True, max_new_tokens=16)


def test_request_that_cannot_fit_fails_before_work(lm):
    with pytest.raises(MemoryError, match="does not fit|needs"):
        lm.generate([1, 2, 3], max_new_tokens=10**12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the tensor-core kernels under capture
def test_cuda_graphs_match_eager(dtype):
    from twotower_ext.runtime.graphs import while_supported

    lm = tt.load(os.path.join(DATA, "checkpoint"), device="cuda", dtype=dtype)
    prompts = [PROMPTS["p0"], PROMPTS["p1"], PROMPTS["p2"]]
    eager = lm.generate(prompts, max_new_tokens=48, cuda_graphs=False)
    eager_loop = lm.generate(prompts, max_new_tokens=48, cuda_graphs=False, device_loop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a capture failure (e.g. a host sync inside the step) must not happen
        # ... except the one-time notice that this torch has no WHILE node (then the block runs unrolled)
        warnings.filterwarnings("ignore", message=".*no conditional WHILE nodes", category=RuntimeWarning)
        graph = lm.generate(prompts, max_new_tokens=48, cuda_graphs=True)
        unrolled = lm.generate(prompts, max_new_tokens=48, cuda_graphs=True, device_loop=True)
    assert graph.sequences == eager.sequences and graph.nfe_per_block == eager.nfe_per_block
    assert unrolled.sequences == eager.sequences and unrolled.commits_per_step == eager.commits_per_step
    assert unrolled.nfe_per_block == eager.nfe_per_block
    assert unrolled.stats["device_loop"] == ("while" if while_supported() else "unrolled")
    if while_supported():   # the WHILE-node block loop runs exactly the passes the host's block loop runs
        assert unrolled.stats["executed_passes"] == eager_loop.stats["executed_passes"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["ar", "mock_ar"])
def test_cuda_graphs_match_eager_ar_modes(mode, dtype):
    """The captured AR step (mock-AR: extension + pass) replayed token by token, rows leaving at EOS (several
    live-row counts), gives the eager tokens."""
    lm = tt.load(os.path.join(DATA, "checkpoint"), device="cuda", dtype=dtype)
    prompts = [PROMPTS["p0"], PROMPTS["p1"], PROMPTS["p2"]]
    base = lm.generate(prompts, mode=mode, max_new_tokens=24, eos_token_id=None, cuda_graphs=False)
    eos = base.new_tokens[0][6]
    eager = lm.generate(prompts, mode=mode, max_new_tokens=24, eos_token_id=eos, cuda_graphs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = lm.generate(prompts, mode=mode, max_new_tokens=24, eos_token_id=eos, cuda_graphs=True)
    assert graph.sequences == eager.sequences


class _Config:
    """Stands in for the HF config object: to_dict() of NVIDIA's config.json."""

    def __init__(self, d):
        self._d = d

    def to_dict(self):
        return dict(self._d)


def fake_hf_model():
    """A torch module carrying NVIDIA's parameter names and config, like the HF remote-code model."""
    from twotower_ext.models import SafetensorsFile

    root = torch.nn.Module()
    with SafetensorsFile(os.path.join(DATA, "checkpoint", "model.safetensors")) as f:
        for name in f.keys():
            mod = root
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(f.get(name).clone(), requires_grad=False))
    with open(os.path.join(DATA, "checkpoint", "config.json")) as f:
        root.config = _Config(json.load(f))
    return root


def test_patch_runs_reference_methods_here_sharing_weights():
    hf = fake_hf_model()
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    lm = tt.patch(hf)
    # One copy in memory: the HF parameters now live in the engine's storage, values unchanged.
    up0 = lm.model.weights.denoiser.layers[2].mixer.up
    p = hf.get_submodule("denoiser_tower.layers.2.mixer.experts.1").up_proj.weight
    assert p.data_ptr() == up0[1].data_ptr()
    assert all(torch.equal(before[n], q) for n, q in hf.named_parameters())
    for run in GOLDEN["runs"]:
        if run["prompt"] != "p1":
            continue
        kw = run_kwargs(run)
        mode = kw.pop("mode")
        kw.pop("temperature")
        ids = torch.tensor([PROMPTS["p1"]])
        if mode == "diffusion":
            kw["gamma"] = kw.pop("threshold")   # NVIDIA's argument name
            out = hf.generate_mask_diffusion(ids, **kw)
        else:
            out = getattr(hf, f"generate_{mode}")(ids, **kw)
        assert out.tolist() == [run["output_ids"]]
    with pytest.raises(TypeError, match="unsupported arguments"):
        hf.generate_ar(torch.tensor([PROMPTS["p0"]]), beams=4)


def test_random_checkpoint_of_the_real_pattern_loads_and_decodes(tmp_path):
    from twotower_ext.models.config import REAL_PATTERN
    from twotower_ext.models.random_init import random_checkpoint, scaled_config

    cfg = scaled_config(width=1 / 16, layers=7, vocab=300)
    assert cfg["hybrid_override_pattern"] == REAL_PATTERN[:7] and cfg["num_hidden_layers"] == 7
    lm = tt.load(random_checkpoint(str(tmp_path / "ckpt"), cfg, seed=3), dtype=torch.float32)
    assert lm.config.hidden_size == 192 and lm.config.n_routed_experts == 8
    for mode in ("diffusion", "ar", "mock_ar"):
        res = lm.generate([[1, 17, 42], [1, 5]], mode=mode, max_new_tokens=20, eos_token_id=None)
        old = ops.use_reference(True)     # every op on its plain-PyTorch reference: the same tokens
        try:
            ref = lm.generate([[1, 17, 42], [1, 5]], mode=mode, max_new_tokens=20, eos_token_id=None)
        finally:
            ops.use_reference(old)
        assert [len(t) for t in res.new_tokens] == [20, 20]
        assert res.sequences == ref.sequences, mode
        assert res.nfe_per_block == ref.nfe_per_block and res.commits_per_step == ref.commits_per_step
