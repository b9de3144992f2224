"""Decode parameters: the one place their defaults and their validation live (docs/semantics.md says what
each one means). `generate`, the CLI flags and the HTTP schema all take their defaults from `DecodeParams`."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

MODES = ("diffusion", "mock_ar", "ar")
MAX_LOGPROBS = 20   # alternatives per token at most (OpenAI's top_logprobs bound)


class ParamError(ValueError):
    """A bad decode parameter; `field` names it (as DecodeParams spells it)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class DecodeParams:
    """One request's decode parameters (per row: a batch may mix them)."""
    mode: str = "diffusion"
    max_new_tokens: int = 256
    block_size: int = 16
    steps_per_block: int = 16
    threshold: float = 0.8
    temperature: float = 0.0
    seed: int = 0
    eos_token_id: int | None = 2
    mask_token_id: int = 3
    logprobs: int | None = None      # None: none; k in [0, MAX_LOGPROBS]: each token's logprob and the k likeliest
    stop_token_ids: tuple = ()       # ids that end the request like EOS (kept in the output, finish "stop")
    stop: tuple = ()                 # strings that end it: the text is cut before the first (needs a tokenizer)
    detokenize: bool = False         # build the request's text as tokens are committed (needs a tokenizer)

    def validate(self, vocab_size: int) -> "DecodeParams":
        """Raise ParamError naming the first bad field; return self."""
        def bad(name, want, got):
            raise ParamError(name, f"{name} must be {want}, got {got!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.mode not in MODES:
            bad("mode", f"one of {MODES}", self.mode)
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an int >= 1", self.max_new_tokens)
        if not is_int(self.block_size) or not 1 <= self.block_size <= 64:
            bad("block_size", "an int in [1, 64]", self.block_size)
        if not is_int(self.steps_per_block) or not 1 <= self.steps_per_block < 2**31:
            bad("steps_per_block", "an int in [1, 2**31)", self.steps_per_block)
        if not (isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                and 0.0 <= self.threshold <= 1.0):
            bad("threshold", "a float in [0, 1]", self.threshold)
        t = self.temperature
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
                and (t == 0 or float(torch.tensor(t, dtype=torch.float32)) > 0)):
            bad("temperature", "0 or a finite float > 0 that is positive in float32", t)
        if not is_int(self.seed) or not -2**63 <= self.seed < 2**63:
            bad("seed", "an int in [-2**63, 2**63)", self.seed)
        if not is_int(self.mask_token_id) or not 0 <= self.mask_token_id < vocab_size:
            bad("mask_token_id", f"an int in [0, vocab_size={vocab_size})", self.mask_token_id)
        if self.eos_token_id is not None and (not is_int(self.eos_token_id) or not 0 <= self.eos_token_id < vocab_size):
            bad("eos_token_id", f"None or an int in [0, vocab_size={vocab_size})", self.eos_token_id)
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"None or an int in [0, {MAX_LOGPROBS}]", self.logprobs)
        if not isinstance(self.stop_token_ids, tuple) or not all(is_int(v) and 0 <= v < vocab_size
                                                                 for v in self.stop_token_ids):
            bad("stop_token_ids", f"a tuple of ints in [0, vocab_size={vocab_size})", self.stop_token_ids)
        if not isinstance(self.stop, tuple) or not all(isinstance(v, str) and v for v in self.stop):
            bad("stop", "a tuple of non-empty strings", self.stop)
        if not isinstance(self.detokenize, bool):
            bad("detokenize", "True or False", self.detokenize)
        return self

    @property
    def wants_text(self) -> bool:
        return self.detokenize or bool(self.stop)

    def stops(self, token: int) -> bool:
        """Whether `token` ends the request (EOS or a stop token id)."""
        return token == self.eos_token_id or token in self.stop_token_ids

    def context_tokens(self, prompt_len: int, lockstep: bool = False) -> int:
        """Cache positions a request needs: its prompt and every token that may be appended to its context
        (diffusion: every block but the last, or every block when `lockstep` (reference_compat) appends the
        last one too; the AR modes: every generated token)."""
        if self.mode == "diffusion":
            blocks = math.ceil(self.max_new_tokens / self.block_size)
            appended = (blocks if lockstep else blocks - 1) * self.block_size
        else:
            appended = self.max_new_tokens
        return prompt_len + max(appended, 1)


FIELDS = tuple(f.name for f in fields(DecodeParams))


def derive_seed(seed: int, j: int) -> int:
    """The seed of the j-th of n samples of one request (OpenAI's `n`, generate's `n`): the request's own seed
    for j = 0, else a splitmix64 mix of (seed, j) in [0, 2**63): independent streams, reproducible from the
    request's seed."""
    if j == 0:
        return seed
    z = (seed + j * 0x9E3779B97F4A7C15) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


def per_row_params(n: int, vocab_size: int, **kw) -> list[DecodeParams]:
    """n DecodeParams from keyword values that are each one value for every row or a list / tuple with one
    value per row (as vLLM's LLM.generate takes a list of SamplingParams); each validated. stop_token_ids and
    stop are one list for every row (stop: or one string), or a list of one list per row."""
    rows = [{} for _ in range(n)]
    for name, v in kw.items():
        if name not in FIELDS:
            raise ParamError(name, f"{name}: unknown parameter (known: {', '.join(FIELDS)})")
        if name in ("stop_token_ids", "stop"):   # one list for every row, or a list of one list per row
            v = (v,) if isinstance(v, str) else v
            per_row = isinstance(v, (list, tuple)) and bool(v) and all(isinstance(e, (list, tuple)) for e in v)
            v = [tuple(e) for e in v] if per_row else tuple(v) if isinstance(v, (list, tuple)) else v
        else:
            per_row = isinstance(v, (list, tuple))
        if per_row:
            if len(v) != n:
                raise ParamError(name, f"{name} must be one value or a list of one value per prompt ({n}), "
                                       f"got a list of {len(v)}")
            for r, x in zip(rows, v):
                r[name] = x
        else:
            for r in rows:
                r[name] = v
    return [DecodeParams(**r).validate(vocab_size) for r in rows]


def normalize_prompts(input_ids, vocab_size: int) -> list[list[int]]:
    """A list of ints, a list of lists (ragged) or a LongTensor [B, L] / [L] -> list of lists of ints."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty [L] or [B, L] tensor, got shape "
                             f"{tuple(input_ids.shape)}")
        rows = input_ids.reshape(-1, input_ids.shape[-1]).tolist()
    elif isinstance(input_ids, (list, tuple)) and input_ids and not any(isinstance(v, (list, tuple, torch.Tensor))
                                                                        for v in input_ids):   # one flat prompt
        rows = [list(input_ids)]
    elif isinstance(input_ids, (list, tuple)) and input_ids:
        rows = [list(r.tolist() if isinstance(r, torch.Tensor) else r) for r in input_ids]
    else:
        raise ValueError("input_ids must be a non-empty list of ints, list of lists, or a LongTensor")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty (every prompt needs at least one token)")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
            raise ValueError(f"prompt {i} must hold int token ids, got {[v for v in r if not isinstance(v, int)][:5]}")
        bad = [v for v in r if not 0 <= v < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size}): {bad[:5]}")
    return rows
