"""Self-distillation data for the denoiser: the context tower's own greedy continuations of training prompts.

The context tower's greedy continuation of a prompt is a deterministic function of the prompt. A denoiser
trained to fill blocks of those continuations (masked diffusion whose targets are the tower's greedy tokens,
not the data) can become confident where the data's next-token distribution is flat, and what it commits
then agrees with AR greedy decoding. The sequences are [prompt | continuation] rows of one length L, generated
with this project's own engine in AR mode, batched; the prompts are random crops of the train stream (a
function of the seed). The prompt length is one value, or a list cycled over generation batches (each batch of
rows one length, the continuation filling the row to L = max(prompt lengths) + gen_len): a denoiser distilled
only behind 32-token prompts never learns the first blocks after a short prompt (measured: the README demo's
"def " prompt degenerated into repetition). Generation is resumable: rows are appended to
RUN/distill/sequences.pt chunk by chunk, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import os
import sys
import time

import torch


def prompts_at(stream: torch.Tensor, n: int, prompt_len: int, seed: int, first: int = 0) -> torch.Tensor:
    """Prompts first .. first + n - 1 [n, prompt_len] (int64): crops of the train stream at offsets drawn from
    (seed, prompt index) only, so the set does not depend on how generation was chunked or resumed."""
    out = []
    for i in range(first, first + n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 77_777_777 + i)
        s = int(torch.randint(0, len(stream) - prompt_len, (1,), generator=g))
        out.append(stream[s:s + prompt_len])
    return torch.stack(out).long()


def row_prompt_lens(n: int, prompt_len, batch: int) -> torch.Tensor:
    """[n] prompt length of each row: prompt_len (int) for all, or a list cycled per generation batch of rows."""
    lens = [prompt_len] if isinstance(prompt_len, int) else list(prompt_len)
    if not lens or min(lens) < 1:
        raise SystemExit(f"distill: prompt lengths must be >= 1, got {prompt_len}")
    return torch.tensor([lens[(i // batch) % len(lens)] for i in range(n)], dtype=torch.int64)


def generate_sequences(model_dir: str, stream: torch.Tensor, path: str, n: int, prompt_len, gen_len: int,
                       batch: int = 64, seed: int = 0, log=lambda m: print(m, file=sys.stderr)):
    """(rows [n, L] int32 of [prompt | the context tower's greedy continuation], prompt lengths [n] int64) with
    L = max(prompt lengths) + gen_len, generated in AR mode in batches of one prompt length (no EOS stop: a
    continuation fills its row) and saved to `path` after every batch; rows already in `path` (same prompt_len
    / gen_len / seed / model / batch) are kept."""
    import twotower_ext as tt

    lens = row_prompt_lens(n, prompt_len, batch)
    L = int(lens.max()) + gen_len
    meta = {"model": os.path.abspath(model_dir), "prompt_len": prompt_len, "gen_len": gen_len, "seed": seed}
    if not isinstance(prompt_len, int):
        meta["batch"] = batch   # the rows' prompt lengths depend on it
    rows = []
    if os.path.exists(path):
        saved = torch.load(path)
        if saved["meta"] != meta:
            raise SystemExit(f"distill: {path} was generated with {saved['meta']}, not {meta}; use a new --run")
        rows = list(saved["rows"].split(1)) if len(saved["rows"]) else []
    if len(rows) >= n:
        return torch.cat(rows[:n]), lens
    lm = tt.load(model_dir, dtype=torch.float32)
    t0, done0 = time.perf_counter(), len(rows)
    while len(rows) < n:
        p = int(lens[len(rows)])
        k = min(batch - len(rows) % batch, n - len(rows))
        prompts = prompts_at(stream, k, p, seed, first=len(rows))
        res = lm.generate(prompts, mode="ar", max_new_tokens=L - p, eos_token_id=None)
        rows += [torch.tensor(s, dtype=torch.int32)[None] for s in res.sequences]
        tmp = path + ".tmp"
        torch.save({"meta": meta, "rows": torch.cat(rows), "prompt_lens": lens[:len(rows)]}, tmp)
        os.replace(tmp, path)
        el = time.perf_counter() - t0
        rate = int((L - lens[done0:len(rows)]).sum()) / el
        left = int((L - lens[len(rows):]).sum())
        log(f"distill: {len(rows)}/{n} sequences, {rate:,.0f} generated tokens/s, eta {left / max(rate, 1e-9):.0f} s")
    return torch.cat(rows[:n]), lens


def batch_fn(sequences: torch.Tensor, stream: torch.Tensor, batch: int, seed: int, mix: float, prompt_lens):
    """step -> ids [batch, L] (int64) and a keep mask [batch, L] of the positions whose loss counts: the
    continuation part of distilled rows (row i's from prompt_lens[i] on; an int: the same for all rows); every
    position of the `mix` share of rows that are data crops of the same length. A function of (seed, step) only,
    so a resumed run sees the batches it would have seen."""
    n, L = sequences.shape
    n_data = int(round(mix * batch))
    starts_of = torch.as_tensor(prompt_lens, dtype=torch.int64).expand(n)
    cols = torch.arange(L)

    def at(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 55_555_555 + step)
        pick = torch.randint(0, n, (batch - n_data,), generator=g)
        ids = sequences[pick].long()
        keep = cols[None, :] >= starts_of[pick][:, None]
        if n_data:
            starts = torch.randint(0, len(stream) - L, (n_data,), generator=g)
            data = torch.stack([stream[s:s + L] for s in starts.tolist()]).long()
            ids = torch.cat([ids, data])
            keep = torch.cat([keep, torch.ones_like(data, dtype=torch.bool)])
        return ids, keep

    return at
