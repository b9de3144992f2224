"""The training code (python -m twotower_ext.train): its differentiable forward computes the inference
model's function (context logits, block-boundary states, denoiser logits), optimisation lowers the
loss, interrupted runs resume exactly, checkpoints load with tt.load in NVIDIA's format, and the model
shipped in the package generates through the CLI."""
import json
import os

import pytest
import torch

import twotower_ext as tt
from twotower_ext.models import expected_tensors
from twotower_ext.models.config import NemotronHConfig
from twotower_ext.models.safetensors_io import SafetensorsFile, read_header
from twotower_ext.packed import unpack
from twotower_ext.train.data import BOS, EOS, MASK, SPECIAL_TOKENS, batch_at, is_heldout, train_tokenizer
from twotower_ext.train.model import TrainModel, context_forward, denoiser_forward, make_config
from twotower_ext.train.trainer import PhaseArgs, diffusion_loss, lm_loss, run_phase

from conftest import fresh_generator

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny ops: extra threads only wait on each other


def tiny_config(**kw):
    base = dict(hidden_size=48, hybrid_override_pattern="M*EM*E", vocab_size=V, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                ssm_state_size=8, conv_kernel=4, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=24, moe_shared_expert_intermediate_size=32, routed_scaling_factor=2.5,
                torch_dtype="float32")
    base.update(kw)
    return make_config(**base)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
    """A random tiny model on a fresh seed (denoiser different from the context tower, time conditioning
    non-trivial) as TrainModel and as the inference model loaded from its saved checkpoint."""
    g = fresh_generator("random_pair seed")
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    cfg = tiny_config()
    m = TrainModel(cfg)
    m.init_weights(seed, std=0.1)
    with torch.no_grad():
        for p in m.denoiser_params():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = str(tmp_path_factory.mktemp("ckpt"))
    m.save(path)
    return m, tt.load(path, dtype=torch.float32), path, seed


@pytest.fixture(autouse=True)
def _print_pair_seed(request):
    """The module fixture's seed with every test that uses it (pytest prints it when one fails)."""
    if "random_pair" in request.fixturenames:
        print(f"random_pair init seed: {request.getfixturevalue('random_pair')[3]}")


def close(got, want, rel=1e-4):
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * want.abs().max().item())


def test_context_forward_matches_nvidia_golden_logits():
    """The training forward on the parity checkpoint against NVIDIA's recorded context logits: the layers it
    shares with inference (rms_norm, route, moe, ...) are judged by NVIDIA's outputs, not by themselves."""
    here = os.path.join(os.path.dirname(__file__), "data", "parity")
    with open(os.path.join(here, "checkpoint", "config.json")) as f:
        cfg = NemotronHConfig.from_dict(json.load(f))
    m = TrainModel(cfg)
    m.load(os.path.join(here, "checkpoint"))
    with open(os.path.join(here, "golden.json")) as f:
        num = json.load(f)["numeric"]
    with torch.no_grad():
        logits = context_forward(m.w, cfg, torch.tensor([num["prompt_ids"]]))
    close(logits[0, -1], torch.tensor(num["context_last_logits"]))


def test_context_logits_match_inference(random_pair, gen):
    m, lm, _, _ = random_pair
    ids = torch.randint(4, V, (2, 37), generator=gen)                # not a multiple of the chunk: padded scan
    with torch.no_grad():
        logits = context_forward(m.w, m.cfg, ids)
    cache = lm.model.new_cache(2, 64)
    close(logits[:, -1], lm.model.prefill(ids, cache))
    # every position: the causal LM logits equal the inference model's decode logits
    cache = lm.model.new_cache(2, 64)
    lm.model.prefill(ids[:, :20], cache, logits=False)
    close(logits[:, 20], lm.model.decode(ids[:, 20], cache))


def test_block_boundary_states_and_denoiser_match_inference(random_pair, gen):
    m, lm, _, _ = random_pair
    ids = torch.randint(4, V, (2, 48), generator=gen)
    noisy = torch.where(torch.rand(2, 48, generator=gen) < 0.5, torch.full_like(ids, MASK), ids)
    t = torch.rand(2, 3, generator=gen)
    with torch.no_grad():
        _, kv, mstates = context_forward(m.w, m.cfg, ids, collect=True)
        logits = denoiser_forward(m.w, m.cfg, noisy, t, kv, mstates)
    for blk in (1, 2):
        cache = lm.model.new_cache(2, 64)
        lm.model.prefill(ids[:, :16 * blk], cache, logits=False)
        for i, (conv, ssm) in mstates.items():   # the states a block starting here is seeded with
            close(conv[:, blk], cache.ctx.conv[i])
            close(ssm[:, blk], cache.ctx.ssm[i])
        for i, (k, v) in kv.items():
            close(k[:, :16 * blk], cache.ctx.k[i][:, :16 * blk])
        close(logits[:, 16 * blk:16 * blk + 16], lm.model.denoise(noisy[:, 16 * blk:16 * blk + 16], cache, t[:, blk]))


def assert_checkpoint_holds(path, m, dtype=torch.float32):
    """Every tensor of the checkpoint at `path` equals m's (rounded to `dtype`, fp32 where NVIDIA keeps fp32)."""
    keep32 = (".A_log", ".D", ".dt_bias", ".gate.weight", ".gate.e_score_correction_bias")
    with SafetensorsFile(os.path.join(path, "model.safetensors")) as f:
        names = list(f.keys())
        assert sorted(names) == sorted(m.named_tensors())
        for name in names:
            want = m.named_tensors()[name]
            want = want if name.endswith(keep32) else want.to(dtype)
            assert torch.equal(f.get(name), want), name


def test_checkpoint_is_nvidia_format_and_generates(random_pair):
    m, lm, path, _ = random_pair
    infos, _, _ = read_header(os.path.join(path, "model.safetensors"))
    assert {k: v.shape for k, v in infos.items()} == expected_tensors(m.cfg)
    with open(os.path.join(path, "config.json")) as f:
        text = f.read()
    assert '"time_step_limit": [\n    0.0,\n    Infinity\n  ]' in text
    cfg = json.loads(text)
    assert cfg["architectures"] == ["NemotronHTwoTowerForCausalLM"] and cfg["model_type"] == "nemotron_h"
    assert not {"extra", "unset"} & set(cfg), "the config's bookkeeping fields must not reach config.json"
    # a config.json saved by an earlier version with the leaked field: read, and not carried on as an extra
    assert "unset" not in NemotronHConfig.from_dict({**cfg, "unset": {}}).extra
    with open(os.path.join(tt.default_model_path(), "config.json")) as f:
        assert "unset" not in json.load(f)
    assert_checkpoint_holds(path, m)
    # greedy AR through the engine == argmax of the training forward, token by token
    ids = [5, 6, 7, 8, 9]
    res = lm.generate([ids], mode="ar", max_new_tokens=12, eos_token_id=None)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(context_forward(m.w, m.cfg, torch.tensor([ids]))[0, -1].argmax()))
    assert res.sequences[0] == ids
    # bf16 export loads too and keeps the fp32 tensors NVIDIA keeps fp32
    m.save(path + "-bf16", dtype=torch.bfloat16)
    infos, _, _ = read_header(os.path.join(path + "-bf16", "model.safetensors"))
    assert infos["context_tower.layers.0.mixer.A_log"].dtype == torch.float32
    assert infos["context_tower.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    assert_checkpoint_holds(path + "-bf16", m, torch.bfloat16)
    lm16 = tt.load(path + "-bf16", dtype=torch.float32)   # the bf16 values, widened exactly
    assert torch.equal(unpack(lm16.model.weights.context.lm_head),
                       m.named_tensors()["context_lm_head.weight"].bfloat16().float())


def _stream(n=6000):
    g = torch.Generator().manual_seed(0)   # a learnable stream: short random motifs repeated
    motifs = [torch.randint(4, V, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g) for _ in range(12)]
    picks = torch.randint(0, len(motifs), (n // 5,), generator=g).tolist()
    return torch.cat([motifs[i] for i in picks]).to(torch.int32)


def test_phases_reduce_loss_and_resume_exactly(tmp_path, gen):
    cfg = tiny_config(hybrid_override_pattern="M*E")
    stream = _stream()
    args = dict(batch=2, seq_len=48, lr=3e-3, warmup=0, min_lr_ratio=1.0, ckpt_every=1000, eval_every=1000, log_every=5)

    def fresh():
        m = TrainModel(cfg)
        m.init_weights(0)
        return m

    ids = batch_at(stream, 999, 2, 49, 0)
    m = fresh()
    before = lm_loss(m, ids, 16).item()
    run_phase(1, m, stream, None, PhaseArgs(steps=12, **args), str(tmp_path / "a"))
    assert lm_loss(m, ids, 16).item() < before - 0.5
    # interrupted after 6 steps and resumed == straight through
    m2 = fresh()
    run_phase(1, m2, stream, None, PhaseArgs(steps=6, **args), str(tmp_path / "b"))
    m2 = fresh()
    s = run_phase(1, m2, stream, None, PhaseArgs(steps=12, **args), str(tmp_path / "b"))
    assert s["finished"] and s["steps_done"] == 12
    for (name, a), b in zip(m.named_tensors().items(), m2.named_tensors().values()):
        torch.testing.assert_close(a, b, msg=name)
    with open(tmp_path / "b" / "phase1" / "loss.tsv") as f:
        assert [int(r.split("\t")[0]) for r in f.read().splitlines()[1:]] == list(range(12))
    # phase 2: denoiser copied from the context tower, context frozen, diffusion loss goes down
    m.copy_context_to_denoiser()
    ctx_before = {k: v.clone() for k, v in m.named_tensors().items() if k.startswith("context")}
    noise_seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    g = lambda: torch.Generator().manual_seed(noise_seed)  # noqa: E731   (the same noise before and after)
    before = diffusion_loss(m, ids[:, :48], 16, g()).item()
    run_phase(2, m, stream, None, PhaseArgs(steps=12, **args), str(tmp_path / "a"))
    assert diffusion_loss(m, ids[:, :48], 16, g()).item() < before - 0.3
    for k, v in ctx_before.items():
        assert torch.equal(v, m.named_tensors()[k]), k
    assert_checkpoint_holds(str(tmp_path / "a" / "phase2" / "model"), m)   # the phase's result, as trained


def test_tokenizer_and_split():
    pytest.importorskip("tokenizers")
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20
    tok = train_tokenizer(texts, 300)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(4))
    ids = tok.encode("def g(y):\n").ids
    assert ids[0] == BOS and tok.decode(ids) == "def g(y):\n"
    assert is_heldout("json/decoder.py") == is_heldout("json/decoder.py")
    s = torch.arange(1000, dtype=torch.int32)
    assert torch.equal(batch_at(s, 3, 2, 10, 0), batch_at(s, 3, 2, 10, 0))
    assert EOS == 2 and MASK == 3


def test_shipped_default_model_generates_with_cli(capsys):
    pytest.importorskip("tokenizers")
    path = tt.default_model_path()
    assert path is not None, "the package ships no default model (python/twotower_ext/data/default_model)"
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 20 * 2**20
    from twotower_ext.cli import main

    assert main(["generate", "--prompt", "def ", "--max-new-tokens", "32"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and len(out.out.strip()) > 8
    assert "tokens/NFE" in out.err


def test_ar_chain_reference_counts_passes():
    """bench_quality's ar_chain reference: one forced commit per pass, then the following tokens while the AR
    probability stays above gamma, never across a block boundary."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from bench.bench_quality import chain_passes

    assert chain_passes([0.9] * 16, 0.8) == 1
    assert chain_passes([0.1] * 16, 0.8) == 16
    assert chain_passes([0.9] * 20, 0.8) == 2                        # the second block starts a new pass
    assert chain_passes([0.5, 0.9, 0.9, 0.5, 0.9], 0.8) == 2          # [0.5 .9 .9] [.5 .9]
    assert chain_passes([0.5, 0.9, 0.9, 0.5, 0.9], 0.95) == 5
    assert chain_passes([], 0.8) == 0
