"""Training data that exists on every machine without a download: the Python standard library's own
source files of the running interpreter, a fixed train / held-out split by file, and a byte-level BPE
tokenizer trained on the train split with the `tokenizers` package.

Special ids follow NVIDIA's tokenizer: 0 pad, 1 bos, 2 eos, 3 mask. Every file is encoded as
[bos] + tokens + [eos]; the train stream is the concatenation of the train files in sorted path order.
The corpus is whatever this interpreter ships (reported with its version in the tokenizer metadata), so a
different Python version gives a slightly different corpus.
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig
import zlib

import torch

PAD, BOS, EOS, MASK = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<mask>"]
HELDOUT_MOD = 20            # a file is held out when crc32(relative path) % HELDOUT_MOD == 0 (~5 %)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}  # not ordinary code


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths (sorted) of the ordinary .py files of the standard library under root (default:
    this interpreter's). Test suites, site-packages and lib2to3 (full of deliberately broken fixtures)
    are left out."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, root)
        if not set(rel.split(os.sep)[:-1]) & _SKIP_DIRS:
            out.append(rel)
    return sorted(out)


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.replace(os.sep, "/").encode()) % HELDOUT_MOD == 0


def read_texts(split: str, root: str | None = None) -> list[tuple[str, str]]:
    """[(relative path, text)] of the split ("train" or "heldout"), sorted by path; unreadable or
    non-UTF-8 files are skipped."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for rel in stdlib_files(root):
        if is_heldout(rel) != (split == "heldout"):
            continue
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                out.append((rel, f.read()))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation, so indentation runs become single
    pre-tokens) with the four special ids first; encode() prepends bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"tokenizer: special token {s} got id {tok.token_to_id(s)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL_TOKENS[BOS]} $A",
                                                       special_tokens=[(SPECIAL_TOKENS[BOS], BOS)])
    return tok


def encode_files(tok, texts: list[str]) -> list[torch.Tensor]:
    """Each text as int32 [bos, ..., eos] (the tokenizer adds bos)."""
    encs = tok.encode_batch(texts)
    return [torch.tensor(e.ids + [EOS], dtype=torch.int32) for e in encs]


def prepare(out_dir: str, vocab_size: int = 2048, log=print) -> dict:
    """Train the tokenizer (out_dir/tokenizer.json) and tokenize both splits (out_dir/tokens.pt):
    {"train": int32 stream, "heldout": [per-file int32], "heldout_paths": [...], "python": version}.
    Reuses what is already there."""
    os.makedirs(out_dir, exist_ok=True)
    tok_path, data_path = os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "tokens.pt")
    if os.path.exists(tok_path) and os.path.exists(data_path):
        return torch.load(data_path)
    train, held = read_texts("train"), read_texts("heldout")
    log(f"data: {len(train)} train files ({sum(len(t) for _, t in train) / 1e6:.1f} MB), {len(held)} held-out "
        f"files ({sum(len(t) for _, t in held) / 1e6:.1f} MB) from Python {sys.version.split()[0]}")
    from tokenizers import Tokenizer

    if os.path.exists(tok_path):
        tok = Tokenizer.from_file(tok_path)
    else:
        tok = train_tokenizer([t for _, t in train], vocab_size)
        tok.save(tok_path)
    stream = torch.cat(encode_files(tok, [t for _, t in train]))
    data = {"train": stream, "heldout": encode_files(tok, [t for _, t in held]),
            "heldout_paths": [p for p, _ in held], "python": sys.version.split()[0],
            "vocab_size": tok.get_vocab_size()}
    torch.save(data, data_path)
    n_held = sum(len(h) for h in data["heldout"])
    log(f"data: vocab {tok.get_vocab_size()}, {len(stream) / 1e6:.2f} M train tokens "
        f"({sum(len(t) for _, t in train) / len(stream):.2f} bytes/token), {n_held / 1e6:.2f} M held-out tokens")
    return data


def batch_at(stream: torch.Tensor, step: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random crops [batch, seq_len] (int64) of the train stream; a function of (seed, step) only, so a
    resumed run sees exactly the batches it would have seen."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()]).long()
