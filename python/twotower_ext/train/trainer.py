"""The two training phases, resumable, with a progress line and a loss log.

Phase 1 trains the context tower (+ context_lm_head) as a causal LM. Phase 2 copies it into the denoiser
(+ lm_head from context_lm_head; time conditioning starts neutral), freezes the context tower and trains
the denoiser with the masked-diffusion objective: each block of `block` tokens gets t ~ U(0, 1), each of
its tokens is replaced by the mask id with probability t (linear schedule), the loss is the mean
cross-entropy over masked positions (no 1/t weight), and the adaLN time input is the block's realised
masked fraction - the quantity the decoder feeds at inference. All blocks of a training sequence are
trained in one pass: the frozen context tower runs once over the sequence (its K/V and its Mamba states
at every block boundary are kept), then every block attends to [context K/V before it | its own block]
through one block-structured mask and starts its Mamba scans from the boundary states.

MoE routing is balanced without an auxiliary loss, as DeepSeek-V3 / NemotronH do: after each step every
layer's `e_score_correction_bias` moves by `bias_rate` towards the under-used experts.

State: RUN/phaseN/state.pt (parameters, optimizer, step) every `ckpt_every` steps and at the end; batches
are a function of (seed, step), so a resumed run continues exactly. RUN/phaseN/loss.tsv holds the log;
RUN/phaseN/model/ the exported NVIDIA-format checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import MASK, batch_at
from .model import TrainModel, context_forward, denoiser_forward


@dataclass
class PhaseArgs:
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    bias_rate: float = 1e-3
    block: int = 16
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    eval_every: int = 250
    max_minutes: float | None = None


def lr_at(step: int, a: PhaseArgs) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _optimizer(params, no_decay: set, a: PhaseArgs) -> torch.optim.Optimizer:
    """AdamW; no weight decay on the tensors whose ids are in no_decay (vectors, the depthwise conv, the
    adaLN tables, whose gate row must not shrink towards 0)."""
    decay = [p for p in params if id(p) not in no_decay]
    rest = [p for p in params if id(p) in no_decay]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)


def _trainable(params: list) -> list:
    return [p for p in params if p.requires_grad]


@torch.no_grad()
def _balance(model: TrainModel, tower, loads: dict, rate: float) -> None:
    for i, load in loads.items():
        load = load.float()
        tower.layers[i].mixer.bias.add_(rate * torch.sign(load.mean() - load))


class _Progress:
    """One line per log interval: bar, step, smoothed loss, lr, tokens/s, elapsed and ETA."""

    def __init__(self, name: str, a: PhaseArgs, start: int, tokens_per_step: int, log_path: str):
        self.name, self.a, self.start, self.tps = name, a, start, tokens_per_step
        self.t0 = time.perf_counter()
        self.ema = None
        self.log_path = log_path
        rows = []
        if start and os.path.exists(log_path):   # keep the log of the steps before the resume point
            with open(log_path) as f:
                rows = [r for r in f.read().splitlines()[1:] if int(r.split("\t")[0]) < start]
        with open(log_path, "w") as f:
            f.write("step\tloss\tlr\tseconds\theldout_loss\n")
            f.writelines(r + "\n" for r in rows)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, step: int, loss: float, lr: float, heldout: float | None = None) -> None:
        self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
        with open(self.log_path, "a") as f:
            f.write(f"{step}\t{loss:.5f}\t{lr:.3e}\t{self.elapsed():.1f}\t{'' if heldout is None else f'{heldout:.5f}'}\n")
        done = step + 1 - self.start
        if (step + 1) % self.a.log_every and step + 1 != self.a.steps and heldout is None:
            return
        el = self.elapsed()
        rate = done / el if el > 0 else 0.0
        eta = (self.a.steps - step - 1) / rate if rate else 0.0
        frac = (step + 1) / self.a.steps
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        extra = f" heldout {heldout:.4f}" if heldout is not None else ""
        print(f"{self.name} [{bar}] {step + 1}/{self.a.steps} loss {self.ema:.4f}{extra} lr {lr:.2e} "
              f"{rate * self.tps:,.0f} tok/s {_hms(el)} elapsed, eta {_hms(eta)}", file=sys.stderr, flush=True)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _save_state(path: str, params: list, opt, step: int, a: PhaseArgs) -> None:
    tmp = path + ".tmp"
    torch.save({"step": step, "params": [p.detach() for p in params], "opt": opt.state_dict(),
                "args": asdict(a)}, tmp)
    os.replace(tmp, path)


def _load_state(path: str, params: list, opt) -> int:
    st = torch.load(path)
    with torch.no_grad():
        for p, v in zip(params, st["params"], strict=True):
            p.copy_(v)
    opt.load_state_dict(st["opt"])
    return st["step"]


def heldout_batches(heldout: list[torch.Tensor], n: int, seq_len: int, seed: int = 1234) -> torch.Tensor:
    """n fixed crops [n, seq_len] from the held-out files (files long enough, chosen by a fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    files = [h for h in heldout if len(h) > seq_len]
    out = []
    for _ in range(n):
        f = files[int(torch.randint(len(files), (1,), generator=g))]
        s = int(torch.randint(len(f) - seq_len, (1,), generator=g))
        out.append(f[s:s + seq_len])
    return torch.stack(out).long()


# ----------------------------------------------------------------------------------------------------
# losses


def lm_loss(model: TrainModel, ids: torch.Tensor, block: int, loads: dict | None = None) -> torch.Tensor:
    logits = context_forward(model.w, model.cfg, ids[:, :-1], block, loads=loads)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def mask_blocks(ids: torch.Tensor, block: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block t ~ U(0, 1), each token masked with probability t. Returns (noisy ids, mask, realised
    masked fraction per block [B, L/block])."""
    B, L = ids.shape
    t = torch.rand(B, L // block, generator=g)
    mask = torch.rand(B, L, generator=g) < t.repeat_interleave(block, dim=1)
    return torch.where(mask, torch.full_like(ids, MASK), ids), mask, mask.view(B, -1, block).float().mean(-1)


def diffusion_loss(model: TrainModel, ids: torch.Tensor, block: int, g: torch.Generator,
                   loads: dict | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-diffusion loss over every block of ids; with `keep` [B, L] bool only the masked positions it marks
    count (the distilled continuation of a [prompt | continuation] row)."""
    with torch.no_grad():
        _, kv, mstates = context_forward(model.w, model.cfg, ids, block, collect=True)
    noisy, mask, t = mask_blocks(ids, block, g)
    logits = denoiser_forward(model.w, model.cfg, noisy, t, kv, mstates, block, loads=loads)
    if keep is not None:
        mask = mask & keep
    logits = logits[mask]
    logits = logits.index_fill(-1, torch.tensor([MASK]), float("-inf"))   # never predicted at inference
    return F.cross_entropy(logits, ids[mask])


# ----------------------------------------------------------------------------------------------------
# phases


def run_phase(phase: int, model: TrainModel, stream: torch.Tensor, heldout: torch.Tensor | None, a: PhaseArgs,
              run_dir: str, tokenizer: str | None = None, name: str | None = None, batches=None) -> dict:
    """Train phase 1 (context tower) or 2 (denoiser), resuming from run_dir/NAME/state.pt when it is there
    (NAME: phaseN unless given). `batches(step) -> (ids, keep)` replaces the random crops of `stream` (phase 2:
    the loss counts only masked positions where keep is set; the self-distillation stage uses it). Returns a
    summary (steps done, seconds, last losses, finished or stopped by the time limit)."""
    torch.manual_seed(a.seed)
    name = name or f"phase{phase}"
    pdir = os.path.join(run_dir, name)
    os.makedirs(pdir, exist_ok=True)
    if phase == 1:
        params, frozen, tower = model.context_params(), model.denoiser_params(), model.w.context
    else:
        params, frozen, tower = model.denoiser_params(), model.context_params(), model.w.denoiser
    for p in params:
        p.requires_grad_(True)
    for p in frozen:
        p.requires_grad_(False)
    for layer in tower.layers:   # balanced by rule, never by gradient
        if layer.kind == "moe":
            layer.mixer.bias.requires_grad_(False)
    params = _trainable(params)
    state_params = params + [l.mixer.bias for l in tower.layers if l.kind == "moe"]
    opt = _optimizer(params, model.no_decay_ids(), a)
    state_path = os.path.join(pdir, "state.pt")
    start = _load_state(state_path, state_params, opt) if os.path.exists(state_path) else 0
    if start:
        print(f"phase {phase}: resuming at step {start} from {state_path}", file=sys.stderr)
    seq = a.seq_len + (1 if phase == 1 else 0)
    prog = _Progress(name, a, start, a.batch * a.seq_len, os.path.join(pdir, "loss.tsv"))
    with open(os.path.join(pdir, "args.json"), "w") as f:
        json.dump(asdict(a), f, indent=1)
    step, last, held = start, float("nan"), None
    stopped = False
    for step in range(start, a.steps):
        if a.max_minutes is not None and prog.elapsed() > 60 * a.max_minutes:
            stopped = True
            break
        lr = lr_at(step, a)
        for group in opt.param_groups:
            group["lr"] = lr
        keep = None
        if batches is not None:
            ids, keep = batches(step)
        else:
            ids = batch_at(stream, step + (phase - 1) * 10_000_000, a.batch, seq, a.seed)
        loads = {}
        if phase == 1:
            loss = lm_loss(model, ids, a.block, loads)
        else:
            g = torch.Generator().manual_seed(a.seed * 7919 + step)
            loss = diffusion_loss(model, ids, a.block, g, loads, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        _balance(model, tower, loads, a.bias_rate)
        last = loss.item()
        if not math.isfinite(last):
            raise FloatingPointError(f"phase {phase}: loss became {last} at step {step}")
        held = None
        if heldout is not None and ((step + 1) % a.eval_every == 0 or step + 1 == a.steps):
            held = evaluate(phase, model, heldout, a.block)
        prog.step(step, last, lr, held)
        if (step + 1) % a.ckpt_every == 0:
            _save_state(state_path, state_params, opt, step + 1, a)
    if not stopped:
        step = a.steps
    _save_state(state_path, state_params, opt, step, a)
    if heldout is not None and held is None and step > start:
        held = evaluate(phase, model, heldout, a.block)
    model.save(os.path.join(pdir, "model"), tokenizer=tokenizer, metadata={"phase": phase, "step": step})
    summary = {"phase": phase, "steps_done": step, "steps": a.steps, "finished": not stopped,
               "seconds_this_run": round(prog.elapsed(), 1), "last_loss": last, "heldout_loss": held,
               "tokens_per_step": a.batch * a.seq_len}
    with open(os.path.join(pdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if stopped:
        print(f"{name}: stopped by the time limit at step {step}/{a.steps}; run the same command "
              f"again to resume", file=sys.stderr)
    return summary


@torch.no_grad()
def evaluate(phase: int, model: TrainModel, heldout: torch.Tensor, block: int) -> float:
    """Held-out loss: next-token cross-entropy (phase 1) or the masked-diffusion loss at a fixed mask draw
    (phase 2), over the fixed held-out crops."""
    parts = heldout.split(4)
    if phase == 1:
        return sum(lm_loss(model, h, block).item() for h in parts) / len(parts)
    g = torch.Generator().manual_seed(4321)
    return sum(diffusion_loss(model, h[:, :-1], block, g).item() for h in parts) / len(parts)
