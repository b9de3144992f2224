"""The replicas' request router: Ray Serve's RequestRouter interface with the prefix-affinity policy of
`policy.rank_replicas` (set as the replica deployment's `request_router_config`; it runs in each caller's
process, the ingress replicas here).

Ray Serve's HTTP proxy streams a request's body to the replica only after routing it, so a router of the
HTTP ingress never sees the prompt. The ingress therefore reads the body and calls the replicas through a
handle with (scope, body) as arguments, which this router reads (Ray Serve LLM splits its OpenAI ingress
from its LLM servers for the same reason)."""
from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .policy import DEFAULT_MAX_IMBALANCE, DEFAULT_PREFIX_CHARS, DEFAULT_PREFIX_TOKENS, affinity_key, rank_replicas


class PrefixAffinityRouter(RequestRouter):
    """Requests whose prompts share a head go to one replica while it is within `max_imbalance` ongoing
    requests of the least loaded replica, else to the least loaded (kwargs: prefix_chars, prefix_tokens,
    max_imbalance; see `policy`). Loads are Ray's counts of each replica's ongoing requests as this router
    sees them (its queue-length cache: updated on every send and completion, probed when unknown)."""

    def initialize_state(self, prefix_chars: int = DEFAULT_PREFIX_CHARS, prefix_tokens: int = DEFAULT_PREFIX_TOKENS,
                         max_imbalance: int = DEFAULT_MAX_IMBALANCE) -> None:
        for name, v, lo in (("prefix_chars", prefix_chars, 1), ("prefix_tokens", prefix_tokens, 1),
                            ("max_imbalance", max_imbalance, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"PrefixAffinityRouter: {name} must be an int >= {lo}, got {v!r}")
        self.prefix_chars, self.prefix_tokens, self.max_imbalance = prefix_chars, prefix_tokens, max_imbalance

    def request_key(self, pending_request: PendingRequest | None) -> int | None:
        """The affinity key of a forwarded HTTP request (args: scope, body); None for other calls."""
        args = pending_request.args if pending_request is not None else None
        if not args or len(args) != 2 or not isinstance(args[1], (bytes, bytearray)):
            return None
        return affinity_key(args[1], self.prefix_chars, self.prefix_tokens)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        loads = {i: cache.get(r.replica_id) or 0 for i, r in by_id.items()}
        # one rank per replica: Ray takes the first whose queue is below its max_ongoing_requests
        return [[by_id[i]] for i in rank_replicas(self.request_key(pending_request), loads, self.max_imbalance)]
