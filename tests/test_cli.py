"""The `twotower` command line as a user runs it: one-line `twotower: ...` errors naming the argument, exit
codes, a closed pipe, Ctrl-C, --help. Each subprocess imports torch (~2 s), so the argument errors run
through one driver process calling cli.main for every case."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import twotower_ext as tt

CKPT = os.path.join(os.path.dirname(__file__), "data", "parity", "checkpoint")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

_DRIVER = r"""
import contextlib, io, json, sys
from twotower_ext.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results.append([rc, err.getvalue(), out.getvalue()])
print(json.dumps(results))
"""


def run_cases(argvs):
    p = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def checkpoint_with(tmp_path, name, config=None, tokenizer=None):
    d = tmp_path / name
    d.mkdir()
    cfg = json.load(open(os.path.join(CKPT, "config.json")))
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(CKPT, "model.safetensors"), d / "model.safetensors")
    if tokenizer is not None:
        (d / "tokenizer.json").write_text(tokenizer)
    return str(d)


def test_bad_arguments_print_one_line_naming_the_argument(tmp_path):
    four = checkpoint_with(tmp_path, "four", {"num_attention_heads": "four"})
    null = checkpoint_with(tmp_path, "null", {"ssm_state_size": None})
    garbage_tok = checkpoint_with(tmp_path, "tok", tokenizer="this is not json")
    wrong = checkpoint_with(tmp_path, "wrong", {"moe_intermediate_size": 48})
    gen = ["generate", "--model", CKPT, "--prompt-ids", "1,5,6", "--max-new-tokens", "4"]
    cases = [  # (argv, words the one line must hold)
        (gen + ["--device", "cuda"], ["--device 'cuda'", "CUDA is not available"]),
        (gen + ["--device", "tpu"], ["--device must be 'cpu' or 'cuda[:N]'", "'tpu'"]),
        (gen + ["--device", "meta"], ["--device must be 'cpu' or 'cuda[:N]'", "'meta'"]),
        (gen + ["--threads", "-1"], ["argument --threads", "integer >= 0", "-1"]),
        (gen + ["--seed", str(2**66)], ["argument --seed", "64-bit integer"]),
        (gen + ["--seed", "2**66"], ["argument --seed", "expected an integer"]),
        (["generate", "--model", CKPT, "--prompt-ids", "1,-5"], ["argument --prompt-ids", ">= 0", "[-5]"]),
        (["generate", "--model", CKPT, "--prompt-ids", "1,x"], ["argument --prompt-ids", "integer token ids"]),
        (["generate", "--model", CKPT, "--prompt-ids", "1,100000"], ["--prompt-ids", "vocab_size = 512", "[100000]"]),
        (gen[:-1] + ["0"], ["max_new_tokens must be an int >= 1"]),
        (gen + ["--block-size", "65"], ["block_size must be an int in [1, 64]"]),
        (["generate", "--model", four], ["num_attention_heads must be an integer", "'four'"]),
        (["generate", "--model", null], ["ssm_state_size must be a positive integer", "null"]),
        (["generate", "--model", garbage_tok], ["tokenizer.json", "not a valid tokenizer.json"]),
        (["generate", "--model", str(tmp_path / "nowhere")], ["not a checkpoint directory"]),
        (["generate", "--model", CKPT, "--prompt", "x"], ["no tokenizer.json", "--prompt-ids"]),
        (["info", "--model", wrong], ["does not match the config", "mis-shaped"]),
        (["generate", "--modle", CKPT], ["unrecognized arguments: --modle"]),
        (["serve", "--shutdown-timeout", "-5"], ["argument --shutdown-timeout", "seconds >= 0", "-5"]),
        (["serve", "--shutdown-timeout", "nan"], ["argument --shutdown-timeout", "seconds >= 0", "nan"]),
        (["serve", "--max-body-bytes", "0"], ["argument --max-body-bytes", "integer >= 1", "0"]),
        (["serve", "--threads", "-2"], ["argument --threads", "integer >= 0", "-2"]),
        (["serve", "--prefix-cache-gb=-1"], ["argument --prefix-cache-gb", "GiB >= 0", "'-1'"]),
        (["serve", "--prefix-cache-gb", "x"], ["argument --prefix-cache-gb", "GiB >= 0", "'x'"]),
        (["info", "--model", CKPT], None),   # a matching checkpoint: rc 0
        (gen, None),
    ]
    results = run_cases([argv for argv, _ in cases])
    for (argv, words), (rc, err, out) in zip(cases, results):
        if words is None:
            assert rc == 0, (argv, err)
            continue
        assert rc == 2, (argv, rc, err)
        assert out == "", (argv, out)            # nothing printed before the error
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("twotower: "), (argv, err)
        for w in words:
            assert w in lines[0], (argv, w, lines[0])
    info = results[-2][2]
    assert "parameters: total" in info and "vocab" in info


@pytest.mark.skipif(tt.default_model_path() is None, reason="needs the shipped model")
def test_threads_past_the_cores_are_capped_and_the_stream_is_the_whole_text():
    from twotower_ext.threads import usable_cores

    argv = ["generate", "--prompt", "def ", "--max-new-tokens", "48"]
    (rc, err, out), (rc2, err2, out2) = run_cases([argv + ["--threads", "100000"], argv + ["--block-size", "5"]])
    cores = usable_cores()
    assert rc == 0 and err.splitlines()[0] == (f"twotower: warning: --threads 100000 is more than the {cores} "
                                               f"core(s) this process may use; using {cores}"), err
    assert f"{cores} thread(s)" in err.splitlines()[-1]
    lm = tt.load(tt.default_model_path())
    for o, kw in ((out, {}), (out2, {"block_size": 5})):   # blocks of 5: characters split across blocks print whole
        res = lm.generate("def ", max_new_tokens=48, **kw)
        assert o == lm.decode(lm.encode("def ")) + lm.decode(res.new_tokens[0]), o


def test_help_names_the_default_model_and_every_option():
    p = subprocess.run([sys.executable, "-m", "twotower_ext.cli", "generate", "--help"], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    assert "--model DIR checkpoint directory (default: the small model shipped with the package" in text
    from twotower_ext.cli import build_parser

    subs = next(a for a in build_parser()._actions if a.dest == "cmd").choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, (name, action.option_strings)


@pytest.mark.skipif(tt.default_model_path() is None or shutil.which("sh") is None, reason="needs the shipped model")
def test_closed_pipe_and_ctrl_c_print_one_line():
    cmd = [sys.executable, "-m", "twotower_ext.cli", "generate", "--prompt", "def ", "--max-new-tokens", "2048"]
    # | head -c 100: the reader leaves after 100 bytes; no BrokenPipeError traceback
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    got = b""
    while len(got) < 100:
        chunk = p.stdout.read1(100 - len(got))
        assert chunk, p.stderr.read().decode()
        got += chunk
    p.stdout.close()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 141 and b"Traceback" not in err and b"Error" not in err, err.decode()
    assert err.decode().strip().splitlines()[-1] == "twotower: stopped: the output pipe was closed by its reader", err
    # Ctrl-C while generating: exit 130 and one line. The child gets SIGINT's default disposition whatever this
    # process inherited (a suite started in the background by a shell without job control ignores SIGINT, and
    # Python then keeps ignoring it: the generation would simply finish)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.read1(1)   # it is generating
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 130 and lines == ["twotower: interrupted"], err.decode()
