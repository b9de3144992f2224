"""TwoTowerModel: the context tower (prefill / extend / decode into a ContextCache) and the denoiser tower
(one pass over a block given the cache, with or without time conditioning). See the package docstring."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import ops
from .cache import ContextCache, Rows
from .config import NemotronHConfig
from . import tower_program
from .layers import mamba_mixer, mlp, modulates_first, moe
from .time_rows import TimeRows
from .weights import TwoTowerWeights, load_weights

# From how many tokens a context pass on CUDA runs the Mamba recurrence in chunked SSD form (ssd.py: batched
# matmuls, where the op walks the tokens one by one); shorter passes (blocks, AR steps, the parity prompts, a
# prompt's last segment) keep the exact op. Equal to PREFILL_SEGMENT, so whole segments run one form and every
# shorter one the other, whatever rows share the pass.
PREFILL_CHUNKED_MIN_LEN = 256


def prefill_chunked_min_len(device) -> int | None:
    """TwoTowerModel.prefill_chunked_min_len for a context tower on `device`: PREFILL_CHUNKED_MIN_LEN on CUDA;
    None (never chunked) on the CPU, where the op's recurrence in registers runs a 256-token segment 1.3-3.3x
    faster than the chunked form (real and width-1/8 Mamba shapes, 1-4 rows, fp32/bf16, 1-2 threads: 11-17 ms
    vs 18-39 ms per real-shape row; `python -m bench prefill` shows the two at 512 / 2048 tokens)."""
    return PREFILL_CHUNKED_MIN_LEN if torch.device(device).type == "cuda" else None

# Default of TwoTowerModel.prefill_segment: a prompt longer than this is prefilled as segments of this many
# tokens (the first a fresh pass, each next an extension of the row), so the context tower's state at every
# multiple of it is computed the same way whether a prompt starts from token 0 or from a boundary the prefix
# cache restored (runtime/prefix_store.py); docs/semantics.md, "Prefix cache". A multiple of the SSD chunk
# (128), so where whole segments run the chunked form (CUDA) segments split the scan where its chunks end.
PREFILL_SEGMENT = 256


def _as_token_rows(tokens, device) -> list[torch.Tensor]:
    """A 2-D tensor or a sequence of 1-D token sequences -> list of 1-D int64 tensors on device."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"prompts must be [rows, tokens] or a list of token sequences, got shape {tuple(tokens.shape)}")
        return [t.to(device=device, dtype=torch.long) for t in tokens]
    return [torch.as_tensor(t, dtype=torch.long).reshape(-1).to(device) for t in tokens]


def _attention_per_length(q: torch.Tensor, lens: list[int] | None, attend) -> torch.Tensor:
    """A pass's attention output [n, L, Hq, D] from attend(rows, m) -> [rows, m, Hq, D], the attention of the given
    rows (an index tensor, or None: every row) over their first m tokens. Ragged rows (lens: each row's real tokens,
    pads after them) run per length over their own tokens only, their pads' outputs zero: the attention's tiles follow
    the pass length, so a row padded to L would round its sums otherwise than alone (fp32's batch invariance,
    docs/semantics.md). Rows of one length share a call."""
    if lens is None:
        return attend(None, q.shape[1])
    o = q.new_zeros(q.shape)
    for m in sorted(set(lens)):
        idx = torch.tensor([b for b, n in enumerate(lens) if n == m], device=q.device)
        o[idx, :m] = attend(idx, m)
    return o


def _rows(t: torch.Tensor, idx: torch.Tensor | None, m: int | None = None) -> torch.Tensor:
    """t's rows idx (None: all), cut to their first m positions (dim 1) where m is given."""
    t = t if idx is None else t[idx]
    return t if m is None else t[:, :m]


def _pad(seqs: list[torch.Tensor], pad: int) -> torch.Tensor:
    L = max(len(s) for s in seqs)
    out = torch.full((len(seqs), L), pad, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


class TwoTowerModel:
    def __init__(self, config: NemotronHConfig, weights: TwoTowerWeights, dtype: torch.dtype, ctx_device,
                 den_device):
        self.config, self.weights, self.dtype = config, weights, dtype
        self.ctx_device, self.den_device = torch.device(ctx_device), torch.device(den_device)
        self.res_dtype = torch.float32 if config.residual_in_fp32 else dtype
        # Context passes of at least this many tokens run the Mamba recurrence in chunked SSD form (chunks of
        # prefill_chunk_size tokens), shorter ones the token-by-token op; None: always the op (the CPU).
        self.prefill_chunked_min_len = prefill_chunked_min_len(self.ctx_device)
        self.prefill_chunk_size = config.chunk_size
        self.prefill_segment = PREFILL_SEGMENT
        # Whether eligible CPU passes run their layers as one op (ops.tower_layers; False: the Python loop, the same
        # result bit for bit: tests and `bench passes` compare the two).
        self.tower_op = True
        self._programs: dict = {}
        # The denoiser's time conditioning rows, remembered per t value on the CPU (time_rows.py).
        self.time_rows = TimeRows(weights.time, dtype)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        denoiser_device=None, experts: str | None = None) -> "TwoTowerModel":
        """Load NVIDIA's checkpoint directory (config.json + model.safetensors or sharded + index). The
        context tower and context_lm_head go to `device`, the denoiser (and lm_head, time conditioning)
        to `denoiser_device` (default: the same). experts: None / "bf16" (unquantised, in `dtype`), "fp8" or
        "int4": the routed experts of both towers quantised while loading (models/weights.py, quant.py)."""
        cfg_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        config = NemotronHConfig.from_json(cfg_dir)
        den = device if denoiser_device is None else denoiser_device
        return cls(config, load_weights(path, config, dtype, device, den, experts), dtype, device, den)

    def new_cache(self, batch: int, capacity: int, snapshot: bool = False, mirror: bool | None = None) -> ContextCache:
        """A zeroed ContextCache for `batch` rows of up to `capacity` tokens; `snapshot=True` keeps the
        pre-extension Mamba states mock-AR needs."""
        return ContextCache(self.config, batch, capacity, self.dtype, self.ctx_device, self.den_device,
                            snapshot=snapshot, mirror=mirror)

    def layer_program(self, tower: str):
        """The layer table of the "context" or "denoiser" tower for ops.tower_layers (tower_program.build), built on
        first use; None where the tower runs its Python loop: tower_op off, no kernel on its device (CUDA, where
        graphs remove the glue instead; ops.use_reference), an fp32 residual stream in a narrower model (the norms then
        run the reference), autograd on, or weights the op does not take (tower_program.eligible). The table holds
        the weight tensors the tower had at first use (their values may change in place; replacing a weight object
        needs a new model)."""
        dev = self.ctx_device if tower == "context" else self.den_device
        if (not self.tower_op or not ops.has_kernel("tower_layers", dev) or self.res_dtype != self.dtype
                or torch.is_grad_enabled()):
            return None
        if tower not in self._programs:
            w = self.weights.context if tower == "context" else self.weights.denoiser
            final = None if tower == "context" else w.norm_f.to(self.res_dtype)
            self._programs[tower] = tower_program.build(w.layers, self.config, self.dtype, final,
                                                        modulate_first=tower == "denoiser")
        return self._programs[tower]

    # ------------------------------------------------------------------------------------------------
    # context tower

    @torch.no_grad()
    def prefill(self, prompts, cache: ContextCache, rows=None, logits: bool = True, snapshot: bool = False,
                start=None, on_segment=None):
        """Run the context tower over fresh prompts (ragged: a list of token sequences, or [n, L]) into
        the cache rows `rows` (previous content of those rows is discarded). Returns context_lm_head
        logits [n, V] fp32 of each prompt's last token (None with logits=False). With snapshot=True the
        prompt is run as prompt[:-1] + one extension by its last token, so the cache also holds the Mamba
        states before the last token (the state mock-AR's first step reads).

        A prompt (with snapshot: prompt[:-1]) longer than `prefill_segment` tokens runs as segments of that
        many tokens, the first a fresh pass, each next an extension of the row; segments of the rows run
        batched, one pass per kind (fresh or extension, whole or shorter) and round. start (one int per row,
        multiples of prefill_segment): the row already holds the prompt's first start[i] tokens (the prefix
        cache restored them: K/V, Mamba states, lengths) and continues from there; 0 = a fresh row.
        on_segment(rows, ends) is called after each round with the cache rows that completed a whole segment
        and their new lengths (the prefix cache saves their state there)."""
        r = cache.rows(rows)
        seqs = _as_token_rows(prompts, self.ctx_device)
        if len(seqs) != len(r):
            raise ValueError(f"prefill: {len(seqs)} prompts for {len(r)} cache rows")
        if min(len(s) for s in seqs) < 1:
            raise ValueError("prefill: every prompt needs at least one token")
        if max(len(s) for s in seqs) > cache.capacity:
            raise ValueError(f"prefill: a prompt of {max(len(s) for s in seqs)} tokens exceeds the cache "
                             f"capacity {cache.capacity}")
        bodies = [s[:-1] for s in seqs] if snapshot else seqs
        P = self.prefill_segment
        done = [0] * len(seqs) if start is None else [int(v) for v in start]
        if len(done) != len(seqs):
            raise ValueError(f"prefill: start must hold one int per prompt ({len(seqs)}), got {len(done)}")
        need_one = logits and not snapshot   # the last token's logits come from a pass
        bad = [i for i, (d, b) in enumerate(zip(done, r.host))
               if d % P or not 0 <= d <= len(bodies[i]) - need_one or (d and cache.lens_host[b] != d)]
        if bad:
            raise ValueError(f"prefill: start[i] must be a multiple of prefill_segment={P}, at most the prompt's "
                             f"length (below it for logits), with the row holding that many tokens; prompts {bad} "
                             f"are not")
        fresh = [b for b, d in zip(r.host, done) if d == 0]
        if fresh:
            cache.reset(fresh)
        last = self._segments(bodies, cache, r, done, need_one, on_segment)
        if snapshot:
            cache.snapshot(r)
            return self.extend(torch.stack([s[-1:] for s in seqs]), cache, r, logits=logits)
        return self._context_logits(last) if logits else None

    def _segments(self, bodies, cache: ContextCache, r: Rows, done: list[int], want_last: bool, on_segment):
        """prefill's passes: round after round, every row with tokens left takes its next segment (from done[i]
        on, advanced in place), one pass per kind (first segment or not, whole or shorter). Returns the hidden
        state of each body's last token when want_last (else None)."""
        P, last = self.prefill_segment, None
        while True:
            kinds: dict[tuple[bool, bool], list[int]] = {}
            for i, (d, body) in enumerate(zip(done, bodies)):
                if d < len(body):
                    kinds.setdefault((d == 0, len(body) - d >= P), []).append(i)
            if not kinds:
                return last
            whole = []
            for (first, full), idx in kinds.items():
                segs = [bodies[i][done[i]:done[i] + P] for i in idx]
                lens = [len(t) for t in segs]
                rr = Rows([r.host[i] for i in idx], cache.batch)
                x = self._context_pass(_pad(segs, self.config.pad_token_id), cache, rr, new_lens=lens, fresh=first)
                cache.count_appended(rr, lens)
                ending = [j for j, i in enumerate(idx) if done[i] + lens[j] == len(bodies[i])]
                if want_last and ending:
                    if last is None:
                        last = x.new_empty(len(bodies), x.shape[-1])
                    dev = x.device
                    last[torch.tensor([idx[j] for j in ending], device=dev)] = \
                        x[torch.tensor(ending, device=dev), torch.tensor([lens[j] - 1 for j in ending], device=dev)]
                for j, i in enumerate(idx):
                    done[i] += lens[j]
                if full:
                    whole += idx
            if on_segment is not None and whole:
                whole.sort()
                on_segment([r.host[i] for i in whole], [done[i] for i in whole])

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, cache: ContextCache, rows=None, logits: bool = False,
               snapshot: bool = False):
        """Append committed tokens [n, S] to the rows (causal over them, KV appended, Mamba states
        advanced). snapshot=True first keeps the current Mamba states (see ContextCache.snapshot).
        Returns context_lm_head logits [n, V] of the last token with logits=True, else None. No host read
        and no data-dependent shape."""
        tokens, r = self.check_extend(tokens, cache, rows)
        out = self.extend_step(tokens, cache, r, logits, snapshot)
        cache.count_appended(r, tokens.shape[1])
        return out

    def decode(self, tokens: torch.Tensor, cache: ContextCache, rows=None, snapshot: bool = False) -> torch.Tensor:
        """AR step: append one token per row ([n]) and return context_lm_head logits [n, V] fp32."""
        return self.extend(torch.as_tensor(tokens).reshape(-1, 1), cache, rows, logits=True, snapshot=snapshot)

    def check_extend(self, tokens, cache: ContextCache, rows) -> tuple[torch.Tensor, Rows]:
        """extend's argument checks (host-side: shapes and the host lengths): (tokens long on the context
        device, rows)."""
        r = cache.rows(rows)
        tokens = torch.as_tensor(tokens).to(device=self.ctx_device, dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[0] != len(r) or tokens.shape[1] < 1:
            raise ValueError(f"extend: tokens must be [{len(r)}, S >= 1] for the {len(r)} selected rows, "
                             f"got shape {tuple(tokens.shape)}")
        full = [b for b in r.host if cache.lens_host[b] + tokens.shape[1] > cache.capacity]
        if full:
            raise ValueError(f"extend: rows {full} would exceed the cache capacity {cache.capacity}")
        return tokens, r

    @torch.no_grad()
    def extend_step(self, tokens: torch.Tensor, cache: ContextCache, r: Rows, logits: bool = False,
                    snapshot: bool = False, active: torch.Tensor | None = None):
        """The device work of `extend` (checked tokens [n, S] long, Rows r): what a CUDA graph captures. It
        reads the rows' lengths on the device and advances them there; the caller counts the appended tokens
        on the host (`cache.count_appended`). active (bool [n] on the device, or None = every row): rows
        where it is False are inert — their K/V, Mamba states (snapshot included) and lengths stay as they
        were, whatever the pass computes for them — so a captured graph of a padded batch bucket can run
        over rows that belong to nobody or to another group (runtime/runner.py)."""
        if snapshot:
            cache.snapshot(r, active)
        x = self._context_pass(tokens, cache, r, active=active)
        return self._context_logits(x[:, -1]) if logits else None

    def _context_logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights.context
        h = ops.rms_norm(x, w.norm_f.to(self.res_dtype), self.config.layer_norm_epsilon)
        return ops.linear(h.to(self.dtype), w.lm_head).float()

    def _context_pass(self, ids: torch.Tensor, cache: ContextCache, r: Rows, new_lens: list[int] | None = None,
                      active: torch.Tensor | None = None, fresh: bool = False):
        """Context tower over ids [n, L] appended at each row's current length, read on the device; updates
        the cache's device state in place (K/V, Mamba states, lengths) and returns the final hidden states
        [n, L, H]. new_lens (prefill only): row b's first new_lens[b] tokens are real, the rest padding after
        them; None (an extension or AR step): all L tokens are real. fresh (rows start empty): attention is
        plain causal SDPA over the pass; else the causal block_attention kernel over [the row's cached K/V |
        the L new keys], which needs no mask, no slice sized from the lengths and no host read. active: see
        extend_step (extensions only)."""
        cfg, w, st = self.config, self.weights.context, cache.ctx
        n, L = ids.shape
        dev = self.ctx_device
        lens = r.take(st.lens)                                   # [n] int32: tokens before this pass
        pos = lens.long()[:, None] + torch.arange(L, device=dev)  # [n, L] cache positions of the new tokens
        ragged = new_lens is not None and min(new_lens) < L
        seq_lens = torch.tensor(new_lens, dtype=torch.int32, device=dev) if ragged else None
        kv_at = None
        if ragged and not fresh:   # a row's padding rewrites its last token's K/V there: nothing past its length
            kv_at = torch.minimum(torch.arange(L, device=dev)[None], seq_lens.long()[:, None] - 1)   # [n, L]
            pos = lens.long()[:, None] + kv_at
        if active is not None:   # inert rows scan no token: their Mamba states stay
            seq_lens = active.to(torch.int32) * L
        eps = cfg.layer_norm_epsilon
        chunk = (self.prefill_chunk_size if self.prefill_chunked_min_len is not None
                 and L >= self.prefill_chunked_min_len else None)
        x = F.embedding(ids, w.embeddings)
        h = ops.rms_norm(x, w.layers[0].norm, eps)
        one_op = r.sl is not None and kv_at is None and not fresh and chunk is None
        prog = self.layer_program("context") if one_op else None
        flat, keep = st.kv_index(r, pos, active)   # where every attention layer writes its K/V
        if prog is not None:   # the same layers as the loop below, as one op (csrc/tower/: a change goes into both)
            _, x = ops.tower_layers(x, h, prog.weights, prog.ints, prog.floats, st.layer_states(st.conv, st.ssm), lens,
                                    seq_lens, flat, keep, None, r.sl.start, True)
        else:
            for i, layer in enumerate(w.layers):
                if layer.kind == "mamba":
                    conv, ssm = r.take(st.conv[i]), r.take(st.ssm[i])
                    out = mamba_mixer(h, layer.mixer, cfg, conv, ssm, seq_lens, write_state=True, chunk_size=chunk)
                    r.put(st.conv[i], conv)
                    r.put(st.ssm[i], ssm)
                elif layer.kind == "attention":
                    a = layer.mixer
                    q = ops.linear(h, a.q).view(n, L, cfg.num_attention_heads, cfg.head_dim)
                    k = ops.linear(h, a.k).view(n, L, cfg.num_key_value_heads, cfg.head_dim)
                    v = ops.linear(h, a.v).view(n, L, cfg.num_key_value_heads, cfg.head_dim)
                    if kv_at is None:
                        st.write_kv(i, flat, keep, k, v)
                    else:
                        at = kv_at[:, :, None, None].expand_as(k)
                        st.write_kv(i, flat, keep, k.gather(1, at), v.gather(1, at))
                    scale = cfg.head_dim ** -0.5
                    if fresh:  # rows start empty: plain causal attention over the pass (pads sit after it)
                        def attend(idx, m, q=q, k=k, v=v):
                            qs, ks, vs = (_rows(t, idx, m).transpose(1, 2) for t in (q, k, v))
                            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                                  enable_gqa=True).transpose(1, 2)
                    else:      # the cached keys [0, lens) then the new ones, causal among those
                        def attend(idx, m, q=q, k=k, v=v, kc=r.take(st.k[i]), vc=r.take(st.v[i])):
                            return ops.block_attention(_rows(q, idx, m), _rows(k, idx, m), _rows(v, idx, m),
                                                       _rows(kc, idx), _rows(vc, idx), _rows(lens, idx), scale,
                                                       causal=True)[0]
                    # per row length on the CPU only: CUDA promises no bit-for-bit batch invariance (its tiles and
                    # splits follow the batch anyway), and an extension's groups would copy their rows' caches
                    o = _attention_per_length(q, new_lens if ragged and q.is_cpu else None, attend)
                    out = ops.linear(o.reshape(n, L, -1), a.o)
                elif layer.kind == "moe":
                    out = moe(h, layer.mixer, cfg)
                else:
                    out = mlp(h, layer.mixer)
                if i + 1 < len(w.layers):   # the residual add and the next layer's norm, in one
                    h, x = ops.add_rms_norm(x.to(self.res_dtype), out, None, w.layers[i + 1].norm, eps)
                else:
                    x = x.to(self.res_dtype) + out
        # Lengths advance last: `lens` may be a view of them, read by every attention layer above.
        added = L if new_lens is None else torch.tensor(new_lens, dtype=torch.int32, device=dev)
        if active is not None:
            added = active.to(torch.int32) * L
        r.put(st.lens, lens + added)
        cache.sync_mirror(r, min(cache.lens_host[b] for b in r.host),
                          max(cache.lens_host[b] for b in r.host) + L)
        return x

    # ------------------------------------------------------------------------------------------------
    # denoiser tower

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, cache: ContextCache, t, rows=None, probe=None) -> torch.Tensor:
        """One denoiser pass over blocks x [B, S] (token ids; mask id for masked positions) of the cache
        rows `rows`, with per-row time t ([B] tensor or a float: fraction of the block still masked).
        Attention: one softmax over [the row's context KV | the block], no mask. Mamba: seeded from the
        row's current states, read-only. Returns logits [B, S, V] fp32 (position j predicts token j).
        The cache is not modified. With contiguous rows the pass has no host syncs and no data-dependent
        shapes (CUDA-graph capturable).
        probe(layer index, kind, hidden states) is called after every layer (analysis/diagnose.py's NaN scan).
        Decoding does not call this but denoise_commit (the LM head fused with the commit step)."""
        return self._denoiser_logits(self._denoise_hidden(x, cache, t, rows, probe))

    @torch.no_grad()
    def denoise_commit(self, x: torch.Tensor, cache: ContextCache, t, rows=None, *, mask_id: int, gamma, step,
                       steps_per_block, temperature=0.0, seed=0, block=0, kept=None, out_counts=None, out_done=None,
                       out_logprob=None, logits: bool = False):
        """denoise, then ops.threshold_unmask on its logits (the arguments after `rows`; x [B, S] int64 on the
        denoiser's device, updated in place), in one: the pass's final hidden states go to ops.lm_head_unmask,
        which on the CPU computes and scans each vocabulary slice of the masked positions' logits in cache and
        never stores them (docs/semantics.md). Returns (counts, done, logits [B, S, V] in the model dtype with
        logits=True, else None). No host syncs, like denoise."""
        h = self._denoise_hidden(x, cache, t, rows)
        return ops.lm_head_unmask(h, self.weights.denoiser.lm_head, x, mask_id, gamma, step, steps_per_block,
                                  temperature, seed, block, kept, out_counts=out_counts, out_done=out_done,
                                  out_logprob=out_logprob, logits=logits)

    def _denoise_hidden(self, x, cache: ContextCache, t, rows=None, probe=None) -> torch.Tensor:
        """denoise's pass up to the LM head: the final normed hidden states [B, S, H] in the model dtype."""
        r = cache.rows(rows)
        x = torch.as_tensor(x).to(device=self.den_device, dtype=torch.long)
        self._check_block(x, r)
        t = torch.as_tensor(t, dtype=torch.float32, device=self.den_device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"denoise: t must be a float or [{x.shape[0]}], got shape {tuple(t.shape)}")
        st = cache.den
        return self._denoiser_pass(x, r, self.time_rows(t), r.take(st.lens), st.conv, st.ssm, st, probe)

    def _denoiser_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The denoiser's LM head on its final hidden states: logits fp32."""
        return ops.linear(h, self.weights.denoiser.lm_head).float()

    @torch.no_grad()
    def mock_ar(self, tokens: torch.Tensor, cache: ContextCache, rows=None) -> torch.Tensor:
        """Mock-AR step: the denoiser without time conditioning over each row's last committed token
        ([B]; it sits at position len-1) with context KV[:len-1] and the Mamba states from before that
        token (the cache's snapshot). Returns logits [B, V] fp32 for the next token."""
        r = cache.rows(rows)
        if not cache.snapshots:
            raise ValueError("mock_ar needs a cache created with snapshot=True")
        x = torch.as_tensor(tokens).to(device=self.den_device, dtype=torch.long).reshape(-1, 1)
        self._check_block(x, r)
        st = cache.den
        ctx_lens = r.take(st.lens) - 1
        return self._denoiser_logits(self._denoiser_pass(x, r, None, ctx_lens, st.prev_conv, st.prev_ssm, st))[:, 0]

    def _check_block(self, x: torch.Tensor, r: Rows) -> None:
        if x.dim() != 2 or x.shape[0] != len(r):
            raise ValueError(f"denoiser input must be [{len(r)}, S] for the {len(r)} selected rows, "
                             f"got shape {tuple(x.shape)}")

    def _denoiser_pass(self, ids, r: Rows, modulation, ctx_lens, conv_states, ssm_states, st, probe=None):
        """The denoiser's layers over ids [B, S]: the final normed hidden states in the model dtype (the LM head's
        input). modulation: the time conditioning's per-layer (shift, scale, gate) rows [B, n, 3, H]
        (modulation[:, i, 0 / 1 / 2] is layer i's [B, H]; TimeRows), or None (mock-AR)."""
        cfg, w = self.config, self.weights.denoiser
        B, S = ids.shape
        eps = cfg.layer_norm_epsilon
        n = len(w.layers)
        x = F.embedding(ids, w.embeddings)
        shift_scale = (None, None) if modulation is None else modulation[:, 0, :2].unbind(1)
        h = ops.rms_norm(x, w.layers[0].norm, eps, *shift_scale, modulates_first(w.layers[0].kind))
        prog = self.layer_program("denoiser") if probe is None and r.sl is not None else None
        if prog is not None:   # the same layers as the loop below, as one op
            states = st.layer_states(conv_states, ssm_states)
            h, _ = ops.tower_layers(x, h, prog.weights, prog.ints, prog.floats, states, ctx_lens, None, None, None,
                                    modulation, r.sl.start, False)
            return h.to(self.dtype)
        shifts = scales = gates = [None] * n
        if modulation is not None:
            shifts, scales, gates = (m.unbind(1) for m in modulation.unbind(2))
        first = [modulates_first(layer.kind) for layer in w.layers]
        for i, layer in enumerate(w.layers):
            if layer.kind == "mamba":
                out = mamba_mixer(h, layer.mixer, cfg, r.take(conv_states[i]), r.take(ssm_states[i]))
            elif layer.kind == "attention":
                a = layer.mixer
                q = ops.linear(h, a.q).view(B, S, cfg.num_attention_heads, cfg.head_dim)
                k = ops.linear(h, a.k).view(B, S, cfg.num_key_value_heads, cfg.head_dim)
                v = ops.linear(h, a.v).view(B, S, cfg.num_key_value_heads, cfg.head_dim)
                o, _ = ops.block_attention(q, k, v, r.take(st.k[i]), r.take(st.v[i]), ctx_lens, cfg.head_dim ** -0.5)
                out = ops.linear(o.reshape(B, S, -1), a.o)
            elif layer.kind == "moe":
                out = moe(h, layer.mixer, cfg)
            else:
                out = mlp(h, layer.mixer)
            # The residual add (gated) and the next layer's norm (the last layer: the final norm), in one.
            if i + 1 < n:
                h, x = ops.add_rms_norm(x.to(self.res_dtype), out, gates[i], w.layers[i + 1].norm, eps, shifts[i + 1],
                                        scales[i + 1], first[i + 1])
            else:
                h, x = ops.add_rms_norm(x.to(self.res_dtype), out, gates[i], w.norm_f.to(self.res_dtype), eps)
            if probe is not None:
                probe(i, layer.kind, x)
        return h.to(self.dtype)
