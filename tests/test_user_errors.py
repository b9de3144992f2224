"""What a new user hits through the API: bad arguments as one-line errors naming the argument, the NaN
origin, the partial last block, the shared thread / dtype defaults, the memory guard, the wheel's torch pin."""
import json
import os
import sys

import pytest
import torch

import twotower_ext as tt
from twotower_ext import ops
from twotower_ext.runtime import runner as runner_mod
from twotower_ext.api import check_device, default_dtype, load_tokenizer
from twotower_ext.models import NemotronHConfig
from twotower_ext.models.config import ConfigError
from twotower_ext.threads import recommended_threads, using_threads


DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
CKPT = os.path.join(DATA, "checkpoint")
PROMPTS = {p["id"]: p["ids"] for p in json.load(open(os.path.join(DATA, "golden.json")))["prompts"]}


@pytest.fixture(scope="module")
def lm():
    return tt.load(CKPT, dtype=torch.float32)


def config_dict():
    return json.load(open(os.path.join(CKPT, "config.json")))


@pytest.mark.parametrize("ids,words", [
    ([1.5, 2.0], "must hold int token ids, got [1.5, 2.0]"),
    ([[1, 2], [3.0]], "prompt 1 must hold int token ids"),
    ([True, 5], "must hold int token ids"),
    (torch.zeros(0, dtype=torch.long), "non-empty [L] or [B, L] tensor, got shape (0,)"),
    (torch.zeros(2, 0, dtype=torch.long), "non-empty"),
    ([1, 512], "outside [0, vocab_size=512): [512]"),
])
def test_prompt_errors_name_what_is_wrong(lm, ids, words):
    with pytest.raises(ValueError) as e:
        lm.generate(ids, max_new_tokens=4)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_seed_must_fit_64_bits(lm):
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*63\)"):
        lm.generate([1, 5], max_new_tokens=4, seed=2**66)
    assert lm.generate([1, 5], max_new_tokens=4, seed=2**63 - 1, temperature=1.0).stats["tokens"] == 4


@pytest.mark.parametrize("device,words", [
    ("tpu", "device must be 'cpu' or 'cuda[:N]', got 'tpu'"),
    ("meta", "device must be 'cpu' or 'cuda[:N]', got 'meta'"),
    (3.5, "device must be 'cpu' or 'cuda[:N]'"),
])
def test_unusable_devices_are_refused(device, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        check_device(device)
    with pytest.raises(ValueError, match="device"):
        tt.load(CKPT, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(ValueError, match="CUDA is not available"):
        tt.load(CKPT, device="cuda")


@pytest.mark.parametrize("change,words", [
    ({"num_attention_heads": "four"}, "num_attention_heads must be an integer, got 'four'"),
    ({"ssm_state_size": None}, "ssm_state_size must be a positive integer, config.json has it null"),
    ({"ssm_state_size": 0}, "ssm_state_size must be a positive integer, got 0"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon must be a number, got '1e-5'"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
    ({"hybrid_override_pattern": 7}, "hybrid_override_pattern must be a string, got 7"),
    ({"time_step_limit": 3}, "time_step_limit must be a list"),
])
def test_config_type_errors_name_the_field(change, words):
    with pytest.raises(ConfigError) as e:
        NemotronHConfig.from_dict({**config_dict(), **change})
    assert words in str(e.value)


def test_absent_fields_with_defaults_stay_valid():
    d = config_dict()
    del d["n_group"]           # default 1
    assert NemotronHConfig.from_dict(d).n_group == 1
    del d["ssm_state_size"]    # no usable default for a Mamba layer
    with pytest.raises(ConfigError, match="ssm_state_size must be a positive integer, config.json has it absent"):
        NemotronHConfig.from_dict(d)


def test_garbage_tokenizer_is_a_clear_error(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_nan_weights_name_the_tower_and_layer(lm):
    """A NaN weight surfaces as the NaN-logits error plus the first tower/layer whose output is non-finite."""
    # out_proj is packed (twotower_ext.packed): its element [0, 0] is the first of the packed data
    den = lm.model.weights.denoiser.layers[3].mixer.out_proj.data     # the denoiser's second Mamba layer
    keep = den.clone()
    try:
        den.view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match=r"must not contain NaN.*the denoiser tower: layer 3 \(mamba\)"):
            lm.generate(PROMPTS["p0"], max_new_tokens=16)
    finally:
        den.copy_(keep)
    ctx = lm.model.weights.context.layers[0].mixer.out_proj.data      # the context tower's first layer (Mamba)
    keep = ctx.clone()
    try:
        ctx.view(-1)[0] = float("nan")                   # its output, so layer 1 (attention) caches NaN K/V
        with pytest.raises(ValueError, match=r"the context tower: layer 1 \(attention\)"):
            lm.generate(PROMPTS["p0"], max_new_tokens=16)
    finally:
        ctx.copy_(keep)
    assert lm.generate(PROMPTS["p0"], max_new_tokens=16).stats["tokens"] == 16


def _block_history(lm, monkeypatch, **kw):
    """Run diffusion recording x after every commit step: [(block, step, x)]."""
    seen, orig = [], ops.lm_head_unmask   # the denoiser's LM head fused with the commit step

    def record(hidden, w, x, mask_id, gamma, step, steps_per_block, temperature, seed, block, kept, **out):
        res = orig(hidden, w, x, mask_id, gamma, step, steps_per_block, temperature, seed, block, kept, **out)
        seen.append((int(block[0]), int(step[0]), x.clone()))
        return res

    monkeypatch.setattr(ops, "lm_head_unmask", record)
    res = lm.generate(PROMPTS["p1"], eos_token_id=None, **kw)
    monkeypatch.setattr(ops, "lm_head_unmask", orig)
    return res, seen


@pytest.mark.parametrize("kept", [5, 11])
def test_partial_last_block_stops_once_its_kept_positions_are_committed(lm, monkeypatch, kept):
    """The last block of max_new_tokens = 16 + kept keeps `kept` positions. It runs until no kept position
    is masked (the surplus still take part in every pass, unmasked or not), so its tokens are the whole
    block's, cut; its NFE and commits count that many passes and the kept positions' commits only."""
    full, hist = _block_history(lm, monkeypatch, max_new_tokens=32)
    steps = [x[0] for b, _, x in hist if b == 1]
    kept_masked = [int((x[:kept] == 3).sum()) for x in steps]
    passes = next(i + 1 for i, m in enumerate(kept_masked) if m == 0)
    expect_commits = [kept - kept_masked[0]] + [a - b for a, b in zip(kept_masked, kept_masked[1:passes])]
    res = lm.generate(PROMPTS["p1"], eos_token_id=None, max_new_tokens=16 + kept)
    assert res.new_tokens[0] == full.new_tokens[0][:16 + kept]
    assert res.nfe_per_block[0] == [full.nfe_per_block[0][0], passes]
    assert res.commits_per_step[0][1] == expect_commits and sum(expect_commits) == kept
    assert res.stats["nfe"] == full.nfe_per_block[0][0] + passes
    assert passes <= full.nfe_per_block[0][1]


def test_partial_block_with_reference_compat_is_refused(lm):
    with pytest.raises(ValueError, match="multiple of block_size"):
        lm.generate([1, 5], max_new_tokens=8, reference_compat=True)


def test_threads_and_dtype_defaults_are_shared():
    small = NemotronHConfig.from_json(CKPT)     # hidden 64: 1 thread whatever the wait policy
    mid = NemotronHConfig.from_dict({**config_dict(), "hidden_size": 320})
    wide = NemotronHConfig.from_dict({**config_dict(), "hidden_size": 2048})
    for passive in (False, True):
        assert recommended_threads(small, "cpu", passive) == 1
        assert recommended_threads(wide, "cpu", passive) is None
        assert recommended_threads(small, "cuda", passive) is None
    assert recommended_threads(mid, "cpu", passive=False) == 1 and recommended_threads(mid, "cpu", True) is None
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda") == torch.bfloat16
    m = tt.load(CKPT)
    assert m.model.dtype == torch.float32 and m.threads == 1
    assert tt.load(CKPT, threads=0).threads is None and tt.load(CKPT, threads=2).threads == 2
    with pytest.raises(ValueError, match="threads must be None or an int >= 0"):
        tt.load(CKPT, threads=-1)


def test_load_caps_threads_at_the_usable_cores(capsys):
    """threads=100000 (which segfaulted in OpenMP) runs on the cores this process may use, saying so."""
    from twotower_ext.threads import usable_cores

    lm = tt.load(CKPT, threads=100000)
    assert lm.threads == usable_cores()
    assert "twotower: warning: load: threads 100000 is more than the" in capsys.readouterr().err
    assert len(lm.generate([[1, 5, 6]], max_new_tokens=4, mode="ar", eos_token_id=None).new_tokens[0]) == 4
    before = torch.get_num_threads()
    with using_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    from twotower_ext.cli import build_parser
    from twotower_ext.runtime import DecodeParams

    a = build_parser().parse_args(["generate"])
    assert (a.max_new_tokens, a.threshold, a.steps, a.block_size) == (
        DecodeParams.max_new_tokens, DecodeParams.threshold, DecodeParams.steps_per_block, DecodeParams.block_size)


def test_memory_guard_reads_mem_available(monkeypatch):
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    got = runner_mod.host_available_bytes()
    assert abs(got - avail) < 2**30   # MemAvailable moments apart; MemFree can be far below it


def test_torch_pin_and_build_info():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    try:
        from torch_pin import dynamic_metadata, torch_requirement
    finally:
        sys.path.pop(0)
    assert torch_requirement("2.13.0+cpu") == "torch==2.13.0"
    assert torch_requirement("2.14.1") == "torch==2.14.1"
    with pytest.raises(ValueError, match="cannot read a release"):
        torch_requirement("nightly")
    deps = dynamic_metadata("dependencies", {"extra": ["numpy"]})
    assert deps[0] == torch_requirement(torch.__version__) and deps[1:] == ["numpy"]
    info = tt.build_info()
    assert "torch_requirement" in info
    if info["torch_requirement"] is not None:   # installed from a wheel
        assert info["torch_requirement"] == torch_requirement(info["torch_built"])


def test_ops_split_over_threads_match_one_thread(gen):
    """Work large enough for common/parallel_cpu.h to hand chunks to a helper thread gives the same bits as
    one thread (every chunk is computed the same way wherever it runs)."""
    B, L, H, P, N, G, K = 2, 16, 8, 32, 64, 2, 4
    C = H * P + 2 * G * N
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = (r(B, L, C), r(B, L, H), r(B, K - 1, C), r(B, H, P, N), r(C, K), r(C), r(H), r(H), r(H))
    logits, x = r(3, 16, 65536), torch.full((3, 16), 3, dtype=torch.long)
    x[1, ::3] = 7
    outs = []
    for n in (1, 2):
        with using_threads(n):
            y = tt.mamba_block_scan(*args)
            xx = x.clone()
            counts, done = tt.threshold_unmask(logits, xx, 3, 0.5, 3, 16, temperature=1.0, seed=5)
        outs.append((y, xx, counts, done))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    bad = logits.clone()
    bad[2, 5, 40000] = float("nan")
    with using_threads(2), pytest.raises(ValueError, match=r"NaN \(found at masked position batch 2, seq 5\)"):
        tt.threshold_unmask(bad, x.clone(), 3, 0.5, 3, 16)
