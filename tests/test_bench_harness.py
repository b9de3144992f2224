"""The benchmark harness's machine-load guard and the README generator (bench/harness.py, bench/readme.py)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import harness, readme  # noqa: E402


def timing(other_cores):
    return harness.Timing(1e-3, 9e-4, 2e-3, 10, load1=0.5, other_cores=other_cores)


ROWS = [{"dtype": "float32", "parts": 2, "rows": 512, "median_us": 12.5, "GB/s": 40.0, "copy_GB/s": 50.0, "%copy": 80.0,
         "lean_torch_us": 30.0, "speedup": 2.4}]


def test_busy_results_are_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("TWOTOWER_BENCH_ALLOW_BUSY", raising=False)
    cols = list(ROWS[0])
    with pytest.raises(harness.BusyMachineError, match="1 of 2 timings ran while other processes used up to 1.50"):
        harness.write_results("merge_states-cpu", "t", ROWS, cols, out_dir=str(tmp_path),
                              timings=[timing(0.01), timing(1.5)])
    assert not (tmp_path / "merge_states-cpu.json").exists()
    harness.write_results("merge_states-cpu", "t", ROWS, cols, out_dir=str(tmp_path), timings=[timing(1.5)],
                          allow_busy=True)
    saved = json.loads((tmp_path / "merge_states-cpu.json").read_text())
    assert saved["busy"] and saved["load"]["max_other_cores"] == 1.5
    assert "busy machine" in (tmp_path / "merge_states-cpu.md").read_text()
    harness.write_results("merge_states-cpu", "t", ROWS, cols, out_dir=str(tmp_path), timings=[timing(0.1)])
    assert not json.loads((tmp_path / "merge_states-cpu.json").read_text())["busy"]


def test_timings_record_the_machine_load():
    t = harness.time_cpu(lambda: sum(range(100)), budget_s=0.05)
    assert t is harness.TIMINGS[-1] and t.load1 is not None and t.other_cores is not None and t.other_cores >= 0
    fields = harness.load_fields(t, timing(0.7))
    assert fields["other_cores"] == max(0.7, t.other_cores)


def test_readme_tables_come_from_the_json(tmp_path):
    harness.write_results("merge_states-cpu", "t", ROWS, list(ROWS[0]), out_dir=str(tmp_path), timings=[timing(0.0)])
    rows = [{"model": "m", "mode": "ar", "gamma": "-", "rows": 2, "tokens/row_nfe": 1.0, "tokens/s": 10.0,
             "ms/pass": 3.0, "ms/row_nfe": 1.5, "pass/ar_step": "-", "pytorch_tokens/s": 5.0, "speedup_vs_pytorch": 2.0},
            {"model": "m", "mode": "diffusion", "gamma": 0.8, "rows": 2, "tokens/row_nfe": 2.0, "tokens/s": 12.0,
             "ms/pass": 6.6, "ms/row_nfe": 3.3, "pass/ar_step": 2.2, "pytorch_tokens/s": 4.0, "speedup_vs_pytorch": 3.0}]
    harness.write_results("e2e-cpu", "t", rows, list(rows[0]), out_dir=str(tmp_path), timings=[timing(0.0)])
    q = [{"mode": "ar", "gamma": None, "tokens_per_nfe": 1.0, "tokens_per_s": 9.0, "speed_vs_ar": 1.0, "ll": -1.0,
          "ll_ratio": 1.0, "match16": 0.1, "match_ratio": 1.0, "agree16": 1.0, "agree_all": 1.0, "ar_chain": None}]
    harness.write_results("quality", "t", q, list(q[0]), out_dir=str(tmp_path), timings=[timing(0.0)])
    text = "".join(f"x\n<!-- bench:{n} -->\nstale\n<!-- /bench:{n} -->\n" for n in readme.SECTIONS)
    out = readme.render(text, str(tmp_path))
    assert "stale" not in out
    assert "| float32 | 2 | 512 | 12.5 | 40 | 50 | 80 | 30 | 2.4 |" in out
    assert "a denoiser pass costs 2.20 AR steps" in out
    assert readme.render(out, str(tmp_path)) == out
    with pytest.raises(SystemExit, match="no <!-- bench:quality --> section"):
        readme.render(text.replace("bench:quality", "bench:other"), str(tmp_path))


def test_run_in_baseline(monkeypatch):
    """Before / after in one run: without a baseline nothing runs; a baseline runs the function in a child
    interpreter (here the installed package or this tree, whichever that child imports) and returns its JSON; a
    malformed spec is refused by name."""
    monkeypatch.delenv(harness.BASELINE_ENV, raising=False)
    assert harness.run_in_baseline("harness", "machine_info") is None
    monkeypatch.setenv(harness.BASELINE_ENV, "installed")
    assert harness.run_in_baseline("harness", "machine_info")["cpu"] == harness.machine_info()["cpu"]
    monkeypatch.setenv(harness.BASELINE_ENV, "/nowhere")
    with pytest.raises(SystemExit, match="TWOTOWER_BENCH_BASELINE must be 'installed' or TREE:LIB"):
        harness.run_in_baseline("harness", "machine_info")


def test_scale_prefix_hits_count_each_prefix_after_its_first_request():
    from bench.bench_scale import prefix_hits

    bodies = [{"prefix": p} for p in (0, 1, 0, 0, 1, 2, 0)]
    got = prefix_hits(bodies, ["a", "x", "b", "a", "x", "y", "b"])
    # requests after their prefix's first: 0@b (prev a: miss, seen {a}: miss), 0@a (prev b: miss, seen: hit),
    # 1@x (prev x: hit, hit), 0@b (prev a: miss, seen: hit)
    assert got == {"hit_prev": 1 / 4, "hit_any": 3 / 4, "replicas/prefix": (2 + 1 + 1) / 3}


def test_prefix_section_renders_the_table_and_the_speedups(tmp_path):
    base = {"model": "m", "workload": "shared prefix", "mode": "ar", "requests": 32, "prompt_tokens": 640,
            "ttft_p99_s": 1.0, "tokens/s": 10.0, "threads": 1}
    rows = [{**base, "cache": "off", "hit_%": 0.0, "ttft_p50_s": 5.0, "p50_speedup": "", "same_output": ""},
            {**base, "cache": "on", "hit_%": 85.9, "ttft_p50_s": 1.0, "p50_speedup": 5.0, "same_output": "yes"}]
    harness.write_results("prefix-cpu", "t", rows, list(rows[0]), out_dir=str(tmp_path), timings=[timing(0.0)])
    out = readme.prefix_section(str(tmp_path))
    assert "| m | shared prefix | ar | on | 32 | 640 | 85.9 | 1 | 1 | 10 | 5 | yes |" in out
    assert "- m, shared prefix, ar: p50 time to the first token 5.0x lower with the cache." in out
    assert "Torch threads during the runs: 1." in out
