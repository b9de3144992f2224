"""The roofline cost model (twotower_ext.analysis.costmodel): the real config against a hand calculation, the
distinct-expert formula against simulation, the break-even against batch, the device-side expert counter
against a plain count, the CLI table, and bad input."""
import math
import os
import subprocess
import sys

import pytest
import torch

from twotower_ext import cli
from twotower_ext.analysis import costmodel
from twotower_ext.models.config import NemotronHConfig
from twotower_ext.models.config import REAL_CONFIG
from twotower_ext.models.weights import expected_tensors

PARITY = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")

# Hand calculation for Nemotron-TwoTower-30B-A3B (hidden H = 2688, vocab V = 131072; 23 Mamba, 6 attention,
# 23 MoE layers), parameters of one tower:
H, V = 2688, 131072
EMBED = V * H                                     # 352,321,536 (and the LM head the same)
MAMBA = (10304 * H            # in_proj: z 4096 + xBC 6144 + dt 64 outputs
         + H * 4096           # out_proj from d_inner 4096
         + 6144 * 4 + 6144    # depthwise conv (kernel 4) + bias over xBC 6144
         + 3 * 64 + 4096      # dt_bias, A_log, D (64 heads); gated norm over d_inner
         + H)                 # the layer's pre-norm          = 38,744,896
ATTN = 2 * 4096 * H + 2 * 256 * H + H             # q, o (32 x 128); k, v (2 x 128); norm = 23,399,040
EXPERT = 2 * 1856 * H                             # up + down, routed width 1856 = 9,977,856
MOE_DENSE = 2 * 3712 * H + 128 * H + 128 + H      # shared expert (3712), router, correction bias, norm
MOE = 128 * EXPERT + MOE_DENSE                    # = 1,297,468,160
TOWER = 2 * EMBED + 23 * MAMBA + 6 * ATTN + 23 * MOE + H   # + norm_f = 31,577,940,288 (31.6B)
ACTIVE = TOWER - EMBED - 23 * (128 - 6) * EXPERT  # one embedding row, 6 of 128 experts = 3,227,754,816 (3.2B)


def test_real_config_parameters_by_hand():
    p = costmodel.param_counts(REAL_CONFIG)
    assert p["tower"] == TOWER and p["active_per_token"] == ACTIVE
    assert round(TOWER / 1e8) == 316 and round(ACTIVE / 1e8) == 32
    assert p["total"] == 2 * TOWER + p["time_conditioning"]
    assert round(p["total"] / 1e9) == 63                       # SPEC: ~63B in both towers


@pytest.mark.parametrize("config", [REAL_CONFIG, PARITY], ids=["real", "parity"])
def test_parameters_match_the_loaders_shapes(config):
    cfg = NemotronHConfig.from_json(config) if isinstance(config, str) else NemotronHConfig.from_dict(config)
    shapes = expected_tensors(cfg)
    ctx = sum(math.prod(s) for n, s in shapes.items() if n.startswith("context_tower.") or n == "context_lm_head.weight")
    time_cond = sum(math.prod(s) for n, s in shapes.items() if n.startswith(("t_embedder", "t_block", "scale_shift")))
    p = costmodel.param_counts(cfg)
    assert (p["tower"], p["time_conditioning"]) == (ctx, time_cond)


def test_real_config_bytes_by_hand():
    """AR step at batch 1, bf16, context 4096: the active weights (+ the fp32 router's extra 2 bytes), the
    whole LM head, one embedding row, K/V of 6 layers, Mamba states read and written; the 16-token pass
    touches 128 (1 - (122/128)^16) = 68.6 experts per MoE layer."""
    e = costmodel.estimate(REAL_CONFIG, batch=1, ctx_len=4096, block_size=16, weight_bytes=2)
    ar = e["ar_step_parts"]
    assert ar["experts"] == pytest.approx(23 * 6 * EXPERT * 2)
    assert ar["lm_head"] == V * H * 2 and ar["embeddings"] == H * 2
    assert ar["kv"] == 6 * 2 * 256 * 2 * (4096 + 1)             # read 4096 tokens' K and V, write one
    assert ar["mamba_state"] == 23 * 2 * (3 * 6144 * 2 + 64 * 64 * 128 * 4)
    weights = 2 * ACTIVE + 2 * 23 * (128 * (H + 1) + 3 * 64)    # fp32 router, bias, Mamba scalars: 2 more bytes
    assert ar["weights"] + ar["experts"] + ar["lm_head"] == weights
    assert weights < e["ar_step_bytes"] < 1.03 * weights        # ~6.6 GB: KV, state, activations are small
    assert e["distinct_experts_nfe"] == pytest.approx(68.6, abs=0.05)
    assert e["nfe_parts"]["experts"] == pytest.approx(23 * 68.6 * EXPERT * 2, rel=1e-3)
    assert e["nfe_parts"]["kv"] == 6 * 2 * 256 * 2 * 4096 and e["extension_parts"]["lm_head"] == 0
    # FLOPs: 2 per multiply-add of the active matmuls (the LM head included, embeddings not)
    assert e["ar_step_flops"] > 2 * ACTIVE and e["nfe_flops"] > 16 * 2 * ACTIVE
    assert "ar_step_ms" not in e


def test_break_even_at_batch_1_matches_hand_arithmetic():
    e = costmodel.estimate(REAL_CONFIG, 1, 4096, 16, 2, bandwidth=4.8e12, flops=989e12)
    assert e["ar_step_ms"] == pytest.approx(e["ar_step_bytes"] / 4.8e9)       # memory-bound at batch 1
    tau = 16 * e["nfe_ms"] / (16 * e["ar_step_ms"] - e["extension_ms"])
    assert e["break_even_tokens_per_nfe"] == pytest.approx(tau) and 7.5 < tau < 8.5
    assert costmodel.speedup_over_ar(e, tau) == pytest.approx(1.0)


@pytest.mark.parametrize("tokens", [1, 4, 16, 64])
def test_distinct_expert_formula_vs_simulation(gen, tokens):
    E, k, trials = 128, 6, 1000
    picks = torch.rand(trials, tokens, E, generator=gen).topk(k, dim=-1).indices       # k distinct per token
    seen = torch.zeros(trials, E, dtype=torch.bool).scatter_(1, picks.reshape(trials, -1), True)
    counts = seen.sum(1).double()
    se = counts.std().item() / math.sqrt(trials)
    assert abs(counts.mean().item() - costmodel.expected_distinct_experts(E, k, tokens)) <= 4 * se + 1e-9


@pytest.mark.parametrize("device", ["h100", "h200"])
@pytest.mark.parametrize("ctx_len", [0, 4096, 32768])
def test_break_even_falls_with_batch(device, ctx_len):
    """More rows make an AR step touch more experts and so cost more relative to a pass, whose 16 x batch
    tokens already touch most experts. From batch 1 to 2 both grow by ~1.4x, so there it is flat to 1 %."""
    dev = costmodel.PRESETS[device]
    be = [costmodel.estimate(REAL_CONFIG, b, ctx_len, 16, 2, dev.bandwidth, dev.flops)["break_even_tokens_per_nfe"]
          for b in range(1, 65)]
    assert all(b <= a for a, b in zip(be[1:], be[2:])), be
    assert be[1] <= 1.01 * be[0] and be[-1] < be[0] / 4


@pytest.mark.parametrize("n_tokens", [1, 5, 16, 300])
def test_distinct_experts_counter_vs_plain_count(gen, n_tokens):
    E = 128
    for ids in (torch.randint(0, E, (n_tokens, 6), generator=gen),            # random
                torch.randint(0, 3, (n_tokens, 6), generator=gen).int(),      # many repeats, int32
                torch.arange(E).repeat(n_tokens)[: n_tokens * 6].view(n_tokens, 6)):   # up to all experts
        got = costmodel.distinct_experts(ids, E)
        assert got.dim() == 0 and got.device == ids.device
        assert got.item() == len(set(ids.flatten().tolist()))


def test_cli_roofline_table():
    # the child imports the twotower_ext this test runs (an installed wheel or a development tree)
    import twotower_ext as tt

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(tt.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "twotower_ext.cli", "info", "--roofline", "--real-config",
                          "--device", "h100"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "31.6B parameters per tower, 3.23B active per AR token" in lines[0] and "H100 SXM" in lines[1]
    rows = [ln.split("|")[1:-1] for ln in lines if ln.startswith("| ") and not ln.startswith("| batch")]
    assert [int(r[0]) for r in rows] == list(costmodel.BATCHES)
    e = costmodel.estimate(REAL_CONFIG, 1, 4096, 16, 2, 3.35e12, 989e12)
    assert float(rows[0][2]) == pytest.approx(e["ar_step_ms"], rel=5e-3)        # AR ms, 3 digits
    assert float(rows[0][9]) == pytest.approx(e["break_even_tokens_per_nfe"], rel=5e-3)


def test_bad_input(capsys):
    with pytest.raises(ValueError, match="device must be one of h100, h200, cpu, got 'tpu'"):
        costmodel.device_preset("tpu")
    with pytest.raises(ValueError, match=r"batch must be an int >= 1, got 0"):
        costmodel.estimate(REAL_CONFIG, batch=0)
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        costmodel.estimate(REAL_CONFIG, block_size=1.5)
    with pytest.raises(ValueError, match="bandwidth must be a positive number or None"):
        costmodel.estimate(REAL_CONFIG, bandwidth=-1)
    with pytest.raises(ValueError, match="config must be a NemotronHConfig or a config dict"):
        costmodel.estimate("real")
    with pytest.raises(ValueError, match="expert_ids must be an integer tensor"):
        costmodel.distinct_experts(torch.zeros(3), 8)
    assert cli.main(["info", "--roofline", "--real-config", "--device", "tpu"]) == 2
    assert "twotower: argument --device: expected one of h100, h200, cpu, got 'tpu'" in capsys.readouterr().err
    assert cli.main(["info", "--roofline", "--real-config", "--model", PARITY]) == 2
    assert "twotower: --real-config and --model are exclusive" in capsys.readouterr().err


def test_cli_roofline_of_a_checkpoint(capsys):
    assert cli.main(["info", "--roofline", "--model", PARITY, "--device", "h200", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    p = costmodel.param_counts(NemotronHConfig.from_json(PARITY))
    assert f"{p['tower'] / 1e9:.3g}B parameters per tower" in out and "fp32 weights" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("| ")]) == 1 + len(costmodel.BATCHES)


def test_dense_config_has_no_expert_bytes():
    cfg = dict(REAL_CONFIG, hybrid_override_pattern="M*-", num_hidden_layers=3, intermediate_size=1024)
    e = costmodel.estimate(cfg, batch=2, bandwidth=1e12)
    assert e["distinct_experts_nfe"] == 0 and e["nfe_parts"]["experts"] == 0
    assert e["params_active_per_token"] == e["params_tower"] - e["params_embeddings"]


def test_measure_device_runs():
    d = costmodel.measure_device("cpu", nbytes=8 << 20, reps=1)
    assert d.bandwidth > 0 and d.flops > 0 and math.isfinite(d.bandwidth) and "measured" in d.source
