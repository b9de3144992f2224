"""Prefix-affinity routing, as pure functions (no Ray): which replica a request should go to.

A request's affinity key hashes the head of its prompt (the first `chars` characters of a text prompt or of
the chat messages, the first `tokens` ids of a token-id prompt), so requests that share that head (a system
prompt, few-shot examples, a document asked several questions, a conversation that grows) share the key.
Keys map to replicas by rendezvous (highest-random-weight) hashing: every router process ranks the replicas
the same way without sharing any state, and when a replica joins or leaves only the keys it wins or held
move. The key's replica is taken while its load (ongoing requests) exceeds the least loaded replica's by at
most `max_imbalance`; past that the request goes to the least loaded one (the prefix is then prefilled a
second time there, which is what bounds a hot prefix's queue).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

DEFAULT_PREFIX_CHARS = 256     # ~64 tokens of BPE text
DEFAULT_PREFIX_TOKENS = 64
DEFAULT_MAX_IMBALANCE = 16     # ongoing requests: a batch of `twotower serve`'s default --max-batch (the fleet uses
                               # each replica's max_batch: its rows, nearly free to fill on a GPU)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prompt_head(body: dict, chars: int = DEFAULT_PREFIX_CHARS, tokens: int = DEFAULT_PREFIX_TOKENS) -> str | None:
    """The head of an OpenAI completions / chat body's prompt that keys its routing: text (its first `chars`
    characters; chat messages as `role: content` lines) or token ids (its first `tokens` ids, comma-separated,
    after a '#'). None where the body carries no prompt the server would accept (the replica reports the error)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                     # a batch of one prompt, as the server accepts it
    if isinstance(prompt, str):
        return prompt[:chars]
    if isinstance(prompt, list) and prompt and all(isinstance(v, int) and not isinstance(v, bool) for v in prompt):
        return "#" + ",".join(map(str, prompt[:tokens]))
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
        text = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in msgs)
        return text[:chars]
    return None


def affinity_key(body: bytes | dict, chars: int = DEFAULT_PREFIX_CHARS, tokens: int = DEFAULT_PREFIX_TOKENS) -> int | None:
    """A request body's (JSON bytes or the parsed object) affinity key: a 64-bit hash of `prompt_head`, or None
    (no prompt: GET routes, bodies that are not JSON objects)."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body) if body else None
        except ValueError:
            return None
    if not isinstance(body, dict):
        return None
    head = prompt_head(body, chars, tokens)
    return None if head is None else _digest(head.encode("utf-8", "surrogatepass"))


def rendezvous_order(key: int, replicas) -> list[str]:
    """Replica ids by descending weight hash(key, id): the first is the key's replica."""
    k = key.to_bytes(8, "big")
    return sorted(replicas, key=lambda r: (_digest(k + str(r).encode()), str(r)), reverse=True)


def rank_replicas(key: int | None, loads: Mapping[str, int], max_imbalance: int = DEFAULT_MAX_IMBALANCE) -> list[str]:
    """Replica ids, most preferred first, for a request with affinity `key` (None: no affinity) given each
    replica's load (ongoing requests): the key's replica first while its load is within `max_imbalance` of
    the least loaded one's, then the rest from least to most loaded (equal loads in the key's rendezvous
    order, so the choice is the same in every router)."""
    if not isinstance(max_imbalance, int) or isinstance(max_imbalance, bool) or max_imbalance < 0:
        raise ValueError(f"max_imbalance must be an int >= 0, got {max_imbalance!r}")
    if not loads:
        return []
    order = rendezvous_order(0 if key is None else key, loads)
    pos = {r: i for i, r in enumerate(order)}
    by_load = sorted(order, key=lambda r: (loads[r], pos[r]))
    if key is None or loads[order[0]] - loads[by_load[0]] > max_imbalance:
        return by_load
    return [order[0]] + [r for r in by_load if r != order[0]]
