"""What the README's demo prints: `twotower generate --prompt "def "` (the CLI's defaults: greedy diffusion,
gamma 0.8, blocks of 16, 256 new tokens) on the shipped model, and what the output is made of.

The row holds the text, tokens, denoiser passes and tokens per pass, the first line, the phrase (token
trigram) repeated most and the share of the output its occurrences cover, and the share of distinct token
4-grams (1.0: no 4-gram repeats). `python -m bench.readme` writes the README's demo paragraph from it, so
the README says what the shipped model shows, not what it was hoped to show.
"""
from __future__ import annotations

import collections

import torch

from . import harness

COLUMNS = ["prompt", "tokens", "nfe", "tokens/nfe", "first_line", "top_phrase", "top_phrase_share", "distinct_4grams"]
PROMPT = "def "


def repetition(ids: list[int]) -> tuple[tuple, float, float]:
    """(most frequent token trigram, share of ids covered by its non-overlapping occurrences, distinct 4-grams
    over all 4-grams)."""
    tri = collections.Counter(tuple(ids[i:i + 3]) for i in range(len(ids) - 2))
    top = tri.most_common(1)[0][0] if tri else ()
    covered, i = 0, 0
    while top and i + 3 <= len(ids):
        if tuple(ids[i:i + 3]) == top:
            covered, i = covered + 3, i + 3
        else:
            i += 1
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return top, covered / max(1, len(ids)), len(set(grams)) / max(1, len(grams))


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    import twotower_ext as tt
    from twotower_ext.runtime import DecodeParams

    del quick   # one generation either way
    lm = tt.load(tt.default_model_path(), device=device)
    d = DecodeParams()
    res = lm.generate(PROMPT, max_new_tokens=d.max_new_tokens, threshold=d.threshold, block_size=d.block_size)
    ids = res.new_tokens[0]
    nfe = res.nfe_per_block[0]
    row = {"prompt": PROMPT, "tokens": len(ids), "nfe": sum(nfe), "tokens/nfe": len(ids) / sum(nfe),
           "text": lm.decode(lm.encode(PROMPT)) + lm.decode(ids), "threshold": d.threshold, "block_size": d.block_size,
           "max_new_tokens": d.max_new_tokens, "dtype": str(lm.model.dtype).removeprefix("torch.")}
    top, share, distinct = repetition(ids)
    row.update(first_line=row["text"].split("\n", 1)[0], top_phrase=lm.decode(list(top)), top_phrase_share=share,
               distinct_4grams=distinct)
    harness.print_table(f"the README demo: twotower generate --prompt {PROMPT!r} (shipped model)", [row], COLUMNS)
    print(row["text"])
    return [row]


if __name__ == "__main__":
    torch.set_num_threads(1)
    rows = run()
    print(harness.write_results("demo-cpu", "the README demo on cpu", rows, COLUMNS))
