"""Per-key rate limits: token buckets for requests and for tokens, pure.

A bucket holds at most one minute's allowance and refills continuously. Requests cost 1 when they
are admitted. Tokens are known only once the engine answers, so a request is admitted while the
token bucket is not in debt and its usage is charged afterwards (the bucket may go below zero;
the key then waits until it has paid the debt back). Retry-After is the time until the next
admission could succeed.

With several gateway instances each enforces its :func:`share` of a key's limits, ``ceil(limit /
instances)``: the key's total holds when the Service spreads requests evenly over the instances (as
Envoy's local rate limits assume); a client that lands on one instance only gets that share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def share(limit: float | None, instances: int) -> float | None:
    """One instance's part of a per-minute limit: ``ceil(limit / instances)`` (None: unlimited)."""
    if limit is None:
        return None
    return float(math.ceil(limit / max(1, instances)))


@dataclass(frozen=True)
class Bucket:
    """What is left of an allowance at ``updated`` (monotonic seconds)."""

    level: float
    updated: float


def refill(bucket: Bucket | None, per_minute: float, now: float) -> Bucket:
    """The bucket at ``now``: full when new, never above one minute's allowance."""
    if bucket is None:
        return Bucket(per_minute, now)
    level = min(per_minute, bucket.level + (now - bucket.updated) * per_minute / 60.0)
    return Bucket(level, now)


def wait_for(bucket: Bucket, per_minute: float, need: float) -> float:
    """Seconds until the bucket holds ``need`` (0 when it does)."""
    missing = need - bucket.level
    return 0.0 if missing <= 0 else missing * 60.0 / per_minute


@dataclass(frozen=True)
class Decision:
    """An admission: ``retry_after`` is None when admitted, else whole seconds to wait."""

    requests: Bucket | None
    tokens: Bucket | None
    retry_after: int | None


def admit(
    requests: Bucket | None,
    tokens: Bucket | None,
    *,
    requests_per_minute: float | None,
    tokens_per_minute: float | None,
    now: float,
) -> Decision:
    """Admit one request if both allowances permit; the request bucket is charged only when admitted."""
    waits: list[float] = []
    if requests_per_minute is not None:
        requests = refill(requests, requests_per_minute, now)
        waits.append(wait_for(requests, requests_per_minute, 1.0))
    if tokens_per_minute is not None:
        tokens = refill(tokens, tokens_per_minute, now)
        # In debt (or empty): wait until at least one token is back.
        waits.append(wait_for(tokens, tokens_per_minute, 1.0) if tokens.level < 1 else 0.0)
    longest = max(waits, default=0.0)
    if longest > 0:
        return Decision(requests, tokens, max(1, math.ceil(longest)))
    if requests is not None and requests_per_minute is not None:
        requests = Bucket(requests.level - 1, now)
    return Decision(requests, tokens, None)


def charge(tokens: Bucket | None, tokens_per_minute: float | None, used: int, now: float) -> Bucket | None:
    """The token bucket after a request used ``used`` tokens (None: the key has no token limit)."""
    if tokens_per_minute is None:
        return tokens
    current = refill(tokens, tokens_per_minute, now)
    return Bucket(current.level - used, now)


class Limiter:
    """The buckets of every key (the only state; decisions are the functions above).

    ``instances``: how many gateway instances share each key's limits (each enforces its share).
    """

    def __init__(self, instances: int = 1) -> None:
        self.instances = max(1, instances)
        self._requests: dict[str, Bucket | None] = {}
        self._tokens: dict[str, Bucket | None] = {}

    def admit(
        self, key: str, requests_per_minute: float | None, tokens_per_minute: float | None, now: float
    ) -> int | None:
        """None when admitted, else the Retry-After in seconds."""
        decision = admit(
            self._requests.get(key),
            self._tokens.get(key),
            requests_per_minute=share(requests_per_minute, self.instances),
            tokens_per_minute=share(tokens_per_minute, self.instances),
            now=now,
        )
        self._requests[key] = decision.requests
        self._tokens[key] = decision.tokens
        return decision.retry_after

    def charge(self, key: str, tokens_per_minute: float | None, used: int, now: float) -> None:
        per_minute = share(tokens_per_minute, self.instances)
        self._tokens[key] = charge(self._tokens.get(key), per_minute, used, now)
