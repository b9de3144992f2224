"""python -m twotower_ext.train COMMAND --run DIR [options]

  data    train the BPE tokenizer on the standard library's train split and tokenize both splits
  phase1  train the context tower as a causal LM            -> DIR/phase1/model (NVIDIA format)
  phase2  train the denoiser, context tower frozen          -> DIR/phase2/model
  all     data + phase1 + phase2
  distill self-distil a trained denoiser: generate the context tower's greedy continuations of training
          prompts with the engine (AR mode, batched), then train the denoiser (context tower frozen) to fill
          blocks of them                                -> DIR/distill/model
          (--from MODEL: start from a trained two-tower checkpoint, default the shipped model)
  ship    write DIR/phase2/model (or --stage distill: DIR/distill/model) as the package's default model

Every command is resumable: run it again after an interruption (or a --max-minutes stop) and it
continues from the last checkpoint. The preset (model size, steps, batch, learning rate) is fixed in
DIR/run.json by the first command so later ones agree.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

PRESETS = {
    # The shipped default model: 27-29 min per phase on 2 CPU cores with --threads 2.
    "small": {
        "vocab_size": 1024,
        "model": dict(hidden_size=160, hybrid_override_pattern="M*EMEM*E", num_attention_heads=4,
                      num_key_value_heads=2, head_dim=40, mamba_num_heads=8, mamba_head_dim=40, n_groups=2,
                      ssm_state_size=32, conv_kernel=4, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=160, moe_shared_expert_intermediate_size=320,
                      routed_scaling_factor=2.5),
        "phase1": dict(steps=2200, batch=12, seq_len=256, lr=3e-3, warmup=100),
        "phase2": dict(steps=1800, batch=12, seq_len=256, lr=3e-3, warmup=50),
        # Self-distillation of the trained denoiser (continues from its weights): 32-token prompts + 224
        # greedy tokens of the context tower per row.
        "distill": dict(sequences=3072, prompt_len=32, gen_len=224, mix=0.0, steps=1200, batch=12, lr=1e-3,
                        warmup=20),
    },
    # Smoke tests: a few seconds.
    "tiny": {
        "vocab_size": 300,
        "model": dict(hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, mamba_num_heads=2, mamba_head_dim=16, n_groups=1,
                      ssm_state_size=8, conv_kernel=4, chunk_size=16, n_routed_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
                      routed_scaling_factor=2.5),
        "phase1": dict(steps=20, batch=2, seq_len=64, lr=3e-3, warmup=5, ckpt_every=10, eval_every=10),
        "phase2": dict(steps=20, batch=2, seq_len=64, lr=3e-3, warmup=5, ckpt_every=10, eval_every=10),
        "distill": dict(sequences=4, prompt_len=16, gen_len=32, mix=0.25, steps=6, batch=4, lr=1e-3, warmup=2,
                        ckpt_every=3, eval_every=3),
    },
}
HELDOUT_CROPS = 32


def _run_config(a) -> dict:
    """DIR/run.json: written by the first command from the preset (+ overrides), read by the later ones."""
    path = os.path.join(a.run, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            rc = json.load(f)
        if a.preset and a.preset != rc["preset"]:
            raise SystemExit(f"train: {a.run} was started with preset {rc['preset']!r}, not {a.preset!r}")
    else:
        preset = a.preset or "small"
        rc = json.loads(json.dumps(PRESETS[preset]))
        rc.update(preset=preset, seed=a.seed, threads=a.threads)
        os.makedirs(a.run, exist_ok=True)
        with open(path, "w") as f:
            json.dump(rc, f, indent=1)
    return rc


def _data(a, rc):
    from .data import prepare

    return prepare(os.path.join(a.run, "data"), rc["vocab_size"], log=lambda m: print(m, file=sys.stderr))


def _model_config(rc, vocab: int):
    from .model import make_config

    return make_config(vocab_size=vocab, torch_dtype="float32", **rc["model"])


def _phase(a, rc, phase: int) -> dict:
    from .model import TrainModel
    from .trainer import PhaseArgs, heldout_batches, run_phase

    data = _data(a, rc)
    cfg = _model_config(rc, data["vocab_size"])
    pa = dict(rc[f"phase{phase}"])
    if a.steps is not None:
        pa["steps"] = a.steps
    args = PhaseArgs(seed=rc["seed"], max_minutes=a.max_minutes, **pa)
    model = TrainModel(cfg)
    if phase == 1:
        model.init_weights(rc["seed"])
    else:
        src = os.path.join(a.run, "phase1", "model")
        if not os.path.exists(os.path.join(src, "config.json")):
            raise SystemExit(f"train: phase 2 needs phase 1's checkpoint at {src}; run phase1 first")
        summary = os.path.join(a.run, "phase1", "summary.json")
        if os.path.exists(summary) and not json.load(open(summary))["finished"]:
            raise SystemExit("train: phase 1 has not finished; run phase1 again to resume it first")
        model.init_weights(rc["seed"])   # time conditioning (neutral start)
        model.load(src)
        model.copy_context_to_denoiser()  # overwritten by the phase 2 state when resuming
    held = heldout_batches(data["heldout"], HELDOUT_CROPS, args.seq_len + 1)
    tok = os.path.join(a.run, "data", "tokenizer.json")
    t0 = time.perf_counter()
    s = run_phase(phase, model, data["train"], held, args, a.run, tokenizer=tok)
    print(f"phase {phase}: {s['steps_done']}/{s['steps']} steps, last loss {s['last_loss']:.4f}, held-out loss "
          f"{s['heldout_loss']}, {time.perf_counter() - t0:.0f} s this run", file=sys.stderr)
    return s


def _distill(a, rc) -> dict:
    """Self-distillation: sequences of [prompt | the context tower's greedy continuation] from the source model
    (--from, default the shipped one, else this run's phase 2), then phase-2 training of its denoiser on them
    with the loss on the continuation positions (plus `mix` of data rows)."""
    from .distill import batch_fn, generate_sequences
    from .model import TrainModel
    from .trainer import PhaseArgs, heldout_batches, run_phase
    from ..models.config import NemotronHConfig

    src = a.source or os.path.join(a.run, "phase2", "model")
    if a.source is None and not os.path.exists(os.path.join(src, "config.json")):
        from .. import default_model_path

        src = default_model_path()
    if src is None or not os.path.exists(os.path.join(src, "config.json")):
        raise SystemExit("train: distill needs a trained two-tower model: --from DIR, this run's phase 2, or the "
                         "shipped model")
    tok = os.path.join(src, "tokenizer.json")
    data_dir = os.path.join(a.run, "data")
    os.makedirs(data_dir, exist_ok=True)
    if os.path.exists(tok) and not os.path.exists(os.path.join(data_dir, "tokenizer.json")):
        shutil.copy(tok, os.path.join(data_dir, "tokenizer.json"))   # tokenize the data with the model's own BPE
    data = _data(a, rc)
    d = dict(rc["distill"])
    if a.steps is not None:
        d["steps"] = a.steps
    ddir = os.path.join(a.run, "distill")
    os.makedirs(ddir, exist_ok=True)
    prompt_len = d.pop("prompt_len")
    seqs, lens = generate_sequences(src, data["train"], os.path.join(ddir, "sequences.pt"), d.pop("sequences"),
                                    prompt_len, d.pop("gen_len"), seed=rc["seed"])
    mix = d.pop("mix")
    seq_len = seqs.shape[1]
    args = PhaseArgs(seed=rc["seed"], max_minutes=a.max_minutes, seq_len=seq_len, **d)
    model = TrainModel(NemotronHConfig.from_json(src))
    model.load(src)
    held = heldout_batches(data["heldout"], HELDOUT_CROPS, seq_len + 1)
    at = batch_fn(seqs, data["train"], args.batch, rc["seed"], mix, lens)
    t0 = time.perf_counter()
    s = run_phase(2, model, data["train"], held, args, a.run, tokenizer=os.path.join(data_dir, "tokenizer.json"),
                  name="distill", batches=at)
    print(f"distill: {s['steps_done']}/{s['steps']} steps, last loss {s['last_loss']:.4f}, held-out loss "
          f"{s['heldout_loss']}, {time.perf_counter() - t0:.0f} s this run", file=sys.stderr)
    return s


def _ship(a, rc) -> None:
    """Re-save phase 2's (or the distill stage's) checkpoint in bf16 into the package (config.json,
    model.safetensors, tokenizer)."""
    from .model import TrainModel

    src = os.path.join(a.run, a.stage, "model")
    if not os.path.exists(os.path.join(src, "config.json")):
        raise SystemExit(f"train: nothing to ship at {src}; run {a.stage} first")
    from ..models.config import NemotronHConfig

    model = TrainModel(NemotronHConfig.from_json(src))
    model.load(src)
    dest = a.dest or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                  "default_model")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    model.save(dest, dtype=dtype, tokenizer=os.path.join(src, "tokenizer.json"),
               metadata={"source": "python -m twotower_ext.train", "preset": rc["preset"]})
    size = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
    print(f"shipped {src} as {a.dtype} to {dest} ({size / 2**20:.1f} MiB)", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twotower_ext.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["data", "phase1", "phase2", "all", "distill", "ship"])
    ap.add_argument("--run", required=True, help="run directory (data, checkpoints, logs)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model + schedule preset (default small)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: these small ops stall with more threads on a shared machine)")
    ap.add_argument("--steps", type=int, default=None, help="override the phase's step count")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop a phase after this long (checkpointed; rerun to resume)")
    ap.add_argument("--dest", help="ship: destination directory (default: the package's data/default_model)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="ship: weight dtype")
    ap.add_argument("--stage", default="phase2", choices=["phase2", "distill"], help="ship: which model")
    ap.add_argument("--from", dest="source", help="distill: the trained model to start from (default: this run's "
                                                     "phase 2, else the shipped model)")
    a = ap.parse_args(argv)
    rc = _run_config(a)
    if rc.get("threads"):
        torch.set_num_threads(rc["threads"])
    if a.command == "data":
        _data(a, rc)
    elif a.command == "ship":
        _ship(a, rc)
    elif a.command == "distill":
        if not _distill(a, rc)["finished"]:
            return 3
    else:
        for phase in ((1, 2) if a.command == "all" else (int(a.command[-1]),)):
            if not _phase(a, rc, phase)["finished"]:
                return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
