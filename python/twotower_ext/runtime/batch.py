"""The persistent batch: every per-row decode value the passes read or write, as device tensors of
[max_rows], indexed by cache row (vLLM's InputBatch, SGLang's SamplingBatchInfo). Rows join (`admit`) and
leave (`clear`) by small host-to-device writes; rows move with their cache rows (`move`). Passes read and
write slices of these tensors in place, so a captured CUDA graph sees every new value without recapture:
parameters are inputs of the graphs, never baked into them.

A row that belongs to no request holds inert values (nothing masked, a valid step, no pending work), so a
padded graph bucket that covers it computes something harmless, and its writes are masked anyway
(runner.py)."""
from __future__ import annotations

import torch

from .params import MAX_LOGPROBS, DecodeParams

# Passes per block never exceed the block size (every pass commits at least one position) and a block holds
# at most 64 positions (DecodeParams.block_size): the per-pass commit history has this many columns.
MAX_PASSES = 64


class PersistentBatch:
    def __init__(self, rows: int, device: torch.device, vocab: int):
        self.rows, self.device, self.vocab = rows, torch.device(device), vocab
        f32, i32, i64 = (dict(dtype=d, device=device) for d in (torch.float32, torch.int32, torch.int64))
        self.gamma = torch.zeros(rows, **f32)
        self.temperature = torch.zeros(rows, **f32)
        self.seed = torch.zeros(rows, **i64)
        self.steps = torch.ones(rows, **i32)          # steps_per_block
        self.step = torch.zeros(rows, **i32)          # passes into the current block
        self.block = torch.zeros(rows, **i64)         # block index (AR modes: index of the next token)
        self.max_new = torch.zeros(rows, **i32)
        self.kept = torch.zeros(rows, **i32)          # positions of the current block that count (partial block)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)      # block (token) ready, not yet used
        self.hist = torch.zeros(rows, MAX_PASSES, **i32)                   # commits of each pass of the block
        self.group = torch.full((rows,), -1, **i32)   # group slot of each row (-1: free); graphs derive masks
        self.x: dict[int, torch.Tensor] = {}          # block size -> [rows, S] block tokens (0 = inert)
        self.token = torch.zeros(rows, 1, **i64)      # AR modes: the last sampled token
        self.logits: torch.Tensor | None = None       # AR: [rows, V] next-token logits (made on first use)
        # logprobs (made when a request first asks): each committed position's log-probability and its
        # MAX_LOGPROBS likeliest ids and log-probabilities, written by the pass that commits the position
        self.lp: torch.Tensor | None = None           # [rows, MAX_PASSES] fp32
        self.top_lp: torch.Tensor | None = None       # [rows, MAX_PASSES, MAX_LOGPROBS] fp32
        self.top_id: torch.Tensor | None = None       # [rows, MAX_PASSES, MAX_LOGPROBS] int64

    def block_tokens(self, size: int) -> torch.Tensor:
        if size not in self.x:
            self.x[size] = torch.zeros(self.rows, size, dtype=torch.int64, device=self.device)
        return self.x[size]

    def ar_logits(self) -> torch.Tensor:
        if self.logits is None:
            self.logits = torch.zeros(self.rows, self.vocab, dtype=torch.float32, device=self.device)
        return self.logits

    def logprob_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.lp is None:
            shape = (self.rows, MAX_PASSES)
            self.lp = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.top_lp = torch.zeros(*shape, MAX_LOGPROBS, dtype=torch.float32, device=self.device)
            self.top_id = torch.zeros(*shape, MAX_LOGPROBS, dtype=torch.int64, device=self.device)
        return self.lp, self.top_lp, self.top_id

    def _tensors(self):
        return [self.gamma, self.temperature, self.seed, self.steps, self.step, self.block, self.max_new,
                self.kept, self.done, self.hist, self.group, self.token, *self.x.values(),
                *(t for t in (self.logits, self.lp, self.top_lp, self.top_id) if t is not None)]

    def admit(self, rows: list[int], params: list[DecodeParams], slot: int) -> None:
        """Set the rows' parameters and a fresh first block (all masked) for requests joining group `slot`."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)

        def put(t, values, dtype):
            t.index_copy_(0, idx, torch.tensor(values, dtype=dtype).to(self.device))

        put(self.gamma, [float(p.threshold) for p in params], torch.float32)
        put(self.temperature, [float(p.temperature) for p in params], torch.float32)
        put(self.seed, [p.seed for p in params], torch.int64)
        put(self.steps, [min(p.steps_per_block, 2**31 - 1) for p in params], torch.int32)
        put(self.max_new, [p.max_new_tokens for p in params], torch.int32)
        put(self.kept, [min(p.block_size, p.max_new_tokens) for p in params], torch.int32)
        put(self.group, [slot] * len(rows), torch.int32)
        for t in (self.step, self.block, self.done, self.hist, self.token):
            t.index_fill_(0, idx, 0)
        for r, p in zip(rows, params):
            if p.mode == "diffusion":
                self.block_tokens(p.block_size)[r].fill_(p.mask_token_id)

    def clear(self, rows: list[int]) -> None:
        """Inert values for rows that no request holds any more."""
        if not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        for t in (self.gamma, self.temperature, self.seed, self.step, self.block, self.max_new, self.kept,
                  self.done, self.hist, self.token, *self.x.values()):
            t.index_fill_(0, idx, 0)
        self.steps.index_fill_(0, idx, 1)
        self.group.index_fill_(0, idx, -1)

    def move(self, src: list[int], dst: list[int]) -> None:
        """Row src[j]'s values to row dst[j] (all sources read before any destination is written)."""
        if not src:
            return
        si = torch.tensor(src, dtype=torch.long, device=self.device)
        di = torch.tensor(dst, dtype=torch.long, device=self.device)
        for t in self._tensors():
            t.index_copy_(0, di, t.index_select(0, si))
