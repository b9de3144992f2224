"""Loading with quantised routed experts (experts="fp8" / "int4"): the layout, bit-exact agreement with
quant.quantize of the unquantised load, generation, the memory table of `twotower info` against a hand
calculation, the roofline's expert bytes, and the CLI's --experts."""
import json
import os
from dataclasses import fields, is_dataclass

import pytest
import torch

import twotower_ext as tt
from twotower_ext import cli, quant
from twotower_ext.analysis import costmodel
from twotower_ext.analysis.memory import GIB, Gpu, format_memory_table, memory_rows, other_weight_bytes, routed_expert_bytes
from twotower_ext.models import NemotronHConfig
from twotower_ext.models.random_init import random_checkpoint
from twotower_ext.models.weights import load_weights

DATA = os.path.join(os.path.dirname(__file__), "data", "parity")
PARITY = os.path.join(DATA, "checkpoint")
pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny config whose numbers are worked out by hand below: one MoE and one attention layer, I = 48 (one int4
# group shorter than 128 along down's input), so every format's odd corner is loaded.
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "hybrid_override_pattern": "E*", "vocab_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 48, "moe_shared_expert_intermediate_size": 32,
        "n_group": 1, "topk_group": 1}


def leaves(obj, path=""):
    """(path, value) of every tensor / QuantizedExperts in the nested weight dataclasses."""
    if isinstance(obj, (torch.Tensor, quant.QuantizedExperts)) or obj is None:
        yield path, obj
    elif is_dataclass(obj):
        for f in fields(obj):
            yield from leaves(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}[{i}]")


def is_routed(path):
    return path.endswith("mixer.up") or path.endswith("mixer.down")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return random_checkpoint(str(tmp_path_factory.mktemp("tiny")), TINY, seed=5)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("where,dtype", [("parity", torch.float32), ("tiny", torch.bfloat16)])
def test_quantised_load_layout_and_exact_values(fmt, where, dtype, tiny_ckpt):
    path = PARITY if where == "parity" else tiny_ckpt
    cfg = NemotronHConfig.from_json(path)
    dense = dict(leaves(load_weights(path, cfg, dtype)))
    q = dict(leaves(load_weights(path, cfg, dtype, experts=fmt)))
    assert dense.keys() == q.keys()
    E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    n_routed = 0
    for path_, v in q.items():
        if is_routed(path_):
            n_routed += 1
            assert isinstance(v, quant.QuantizedExperts) and v.fmt == fmt
            assert v.shape == ((E, I, H) if path_.endswith("up") else (E, H, I))
            want = quant.quantize(dense[path_], fmt)             # the bf16/fp32-loaded stack, quantised
            assert v.data.dtype == want.data.dtype and v.scale.dtype == want.scale.dtype
            assert torch.equal(v.data, want.data) and torch.equal(v.scale, want.scale)
            assert torch.equal(quant.dequantize(v, dtype), quant.dequantize(want, dtype))
        elif v is None:
            assert dense[path_] is None
        else:                                                      # everything else: unchanged
            assert v.dtype == dense[path_].dtype and torch.equal(v, dense[path_]), path_
    assert n_routed == 2 * 2 * cfg.layer_kinds.count("moe")       # up + down, both towers


def test_bad_experts_argument():
    with pytest.raises(ValueError, match="load: experts must be None, 'bf16', 'fp8' or 'int4', got 'int8'"):
        tt.load(PARITY, experts="int8")
    assert isinstance(tt.load(PARITY, experts="bf16").model.weights.context.layers[2].mixer.up, torch.Tensor)


def test_generate_with_quantised_experts_against_the_golden_output():
    golden = json.load(open(os.path.join(DATA, "golden.json")))
    prompts = {p["id"]: p["ids"] for p in golden["prompts"]}
    runs = [r for r in golden["runs"] if r["mode"] == "mask_diffusion"][:4]
    for fmt in ("fp8", "int4"):
        lm = tt.load(PARITY, dtype=torch.float32, experts=fmt)
        same = total = 0
        for run in runs:
            p, prompt = run["params"], prompts[run["prompt"]]
            res = lm.generate(prompt, mode="diffusion", reference_compat=True,
                              max_new_tokens=p["max_new_tokens"], block_size=p["block_size"],
                              steps_per_block=p["steps_per_block"], threshold=p["gamma"])
            seq, want = res.sequences[0], run["output_ids"]
            assert seq[:len(prompt)] == prompt and len(seq) > len(prompt)
            assert all(0 <= t < lm.config.vocab_size for t in seq)
            same += next((i for i, (a, b) in enumerate(zip(seq, want)) if a != b), min(len(seq), len(want))) - len(prompt)
            total += len(want) - len(prompt)
        # measured, not asserted: the parity model is random, so small weight changes flip argmaxes
        print(f"{fmt}: {same}/{total} golden diffusion tokens identical before the first divergence")


# ---------------------------------------------------------------------------------------------- memory


def test_memory_table_by_hand():
    cfg = NemotronHConfig.from_dict(TINY)
    # routed experts, both towers, 1 MoE layer x 4 experts; up [48, 64], down [64, 48]
    assert routed_expert_bytes(cfg, "bf16") == 2 * 4 * (48 * 64 + 64 * 48) * 2
    assert routed_expert_bytes(cfg, "fp8") == 2 * 4 * ((48 * 64 + 48 * 4) + (64 * 48 + 64 * 4))
    assert routed_expert_bytes(cfg, "int4") == 2 * 4 * ((48 * 32 + 48 * 1 * 2) + (64 * 24 + 64 * 1 * 2))
    moe_layer = 64 * 2 + 4 * 64 * 4 + 4 * 4 + 2 * 32 * 64 * 2          # norm, fp32 router + bias, shared expert
    attn_layer = 64 * 2 + (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64) * 2   # norm, q k v o
    tower = moe_layer + attn_layer + 2 * 128 * 64 * 2 + 64 * 2          # + embeddings, LM head, norm_f
    time_cond = (64 * 256 + 64 + 64 * 64 + 64 + 3 * 64 * 64 + 3 * 64 + 2 * 3 * 64) * 2
    other = 2 * tower + time_cond
    assert other_weight_bytes(cfg) == other == 200864
    assert other_weight_bytes(cfg, 4) == 2 * (tower * 2 - 4 * 64 * 4 - 4 * 4) + time_cond * 2  # fp32 stays fp32
    row = 4096 * 2 * 1 * 32 * 2                                          # K + V of one layer, no Mamba layer
    big, small = Gpu("big", 4 * GIB), Gpu("small", 2 * GIB + (1 << 20))
    rows = memory_rows(cfg, gpus=(big, small))
    assert [r["experts"] for r in rows] == ["bf16 (unquantised)", "fp8", "int4"]
    usable = int(4 * GIB - 4 * GIB * 0.05) - 2 * GIB
    for r, routed in zip(rows, (98304, 52736, 26368)):
        assert (r["routed_bytes"], r["other_bytes"], r["row_bytes"]) == (routed, other, row)
        assert r["weights_bytes"] == routed + other
        assert r["fits"] == {"big": (usable - routed - other) // row, "small": -1}
    table = format_memory_table(rows)
    assert "| int4 | 2.46e-05 | 0.000187 | 0.000212 | 0.5 | 3685 rows | no |" in table


def test_roofline_counts_the_expert_format():
    cfg = NemotronHConfig.from_dict(TINY)
    base = costmodel.estimate(cfg, batch=1, ctx_len=64, block_size=16)
    for fmt in ("fp8", "int4"):
        e = costmodel.estimate(cfg, batch=1, ctx_len=64, block_size=16, experts=fmt)
        per = (routed_expert_bytes(cfg, fmt) / (2 * 4), 48 * 64 * 2 * 2)   # one expert: quantised, bf16
        for p in ("ar_step", "nfe"):
            d = e[f"distinct_experts_{p}"]
            assert e[f"{p}_parts"]["experts"] == pytest.approx(d * per[0])
            assert base[f"{p}_parts"]["experts"] == pytest.approx(d * per[1])
            assert base[f"{p}_bytes"] - e[f"{p}_bytes"] == pytest.approx(d * (per[1] - per[0]))
    with pytest.raises(ValueError, match="experts must be one of bf16, fp8, int4, got 'fp4'"):
        costmodel.estimate(cfg, experts="fp4")


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_cli_bad_experts(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--experts", "int8"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("twotower: argument --experts: invalid choice: 'int8'")


def test_cli_info_prints_the_memory_table(capsys):
    assert cli.main(["info", "--model", PARITY]) == 0
    out = capsys.readouterr().out
    assert "| experts | routed experts GiB |" in out and "| fp8 |" in out and "| int4 |" in out
    assert cli.main(["info", "--real-config"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 (unquantised) | 109.43 | 8.29 | 117.72 | 70.8 | no | no |" in out
    assert cli.main(["info", "--real-config", "--model", PARITY]) == 2
    assert "twotower: --real-config and --model are exclusive" in capsys.readouterr().err


def test_cli_generate_with_fp8_experts(capsys):
    assert cli.main(["generate", "--model", PARITY, "--prompt-ids", "1,5,7", "--max-new-tokens", "8",
                     "--experts", "fp8"]) == 0
    assert "fp8 experts" in capsys.readouterr().err


def test_readme_quant_sections_come_from_the_json(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import harness, readme

    out = str(tmp_path)
    assert readme.quant_quality_section(out) == "(no results yet: run `python -m bench.bench_quant_quality`)"
    row = {"device": "cpu", "dtype": "bfloat16", "weights": "fp8", "T": 1, "experts": 6.0, "MB": 60.0,
           "median_ms": 2.5, "GB/s": 24.0, "%copy_bw": 90.0, "vs_bf16": 1.9}
    harness.write_results("moe-cpu", "t", [row, {**row, "T": 64}], list(row), out_dir=out, timings=[])
    q = {"model": "m", "experts": "fp8", "mode": "ar", "first_div_mean": 40.0, "first_div_median": 64,
         "identical": 0.8, "ll_ratio": 0.999, "top1_tf": 0.99, "kl": 0.0004, "tokens_per_nfe": 1.0}
    harness.write_results("quant_quality", "t", [q], list(q), out_dir=out, timings=[])
    speed = readme.quant_speed_section(out)
    assert "| fp8 | 1 | 6 | 60 | 2.5 | 24 | 90 | 1.9 |" in speed and "| 64 |" not in speed   # T = 1 and 16 only
    quality = readme.quant_quality_section(out)
    assert "| m | fp8 | ar | 40 | 64 | 0.8 | 0.999 | 0.99 | 0.0004 | 1 |" in quality
    assert "run `python -m bench.bench_load_memory`" in quality
    assert "| int4 | 28.23 | 8.29 | 36.52 | 70.8 | 537 rows |" in readme.memory_section(out)
