"""Which replica serves a request: prefix-aware, bandwidth-weighted, bounded-load consistent hashing.

Pure: a function of the candidates (their weight and requests outstanding) and the request's prefix.

- With a prefix (the start of the conversation), consistent hashing sends the same prefix to the
  same replica, so a conversation returns to the engine that holds its prompt cache. Each replica
  owns ring points in proportion to its Mac's memory bandwidth (decode speed is bandwidth-bound, so
  a faster Mac should take a larger share of new prefixes).
- Bounded loads (CHWBL): a replica already above ``load_factor`` times its weighted share of the
  requests in flight is passed over for the next one on the ring, so a hot prefix spills over
  instead of queueing behind one engine.
- Without a prefix: the least outstanding requests per unit of weight.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

#: How far above its weighted share of the load a replica may go before a prefix spills over.
LOAD_FACTOR = 1.25
#: Ring points of a replica of average weight.
POINTS = 64


@dataclass(frozen=True)
class Candidate:
    """One ready replica as the picker sees it."""

    id: str
    #: Relative speed (memory bandwidth); any positive scale, only ratios matter.
    weight: float
    #: Requests sent to it and not yet answered (by this gateway).
    outstanding: int = 0


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=64)
def _ring(members: tuple[tuple[str, float], ...], points: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Sorted ring points and their owners; cached, since the replica set rarely changes."""
    mean = sum(w for _, w in members) / len(members)
    owned: list[tuple[int, str]] = []
    for member, weight in members:
        count = max(1, round(points * weight / mean))
        owned.extend((_hash(f"{member}#{i}"), member) for i in range(count))
    owned.sort()
    return tuple(h for h, _ in owned), tuple(m for _, m in owned)


def capacity(candidate: Candidate, candidates: Sequence[Candidate], load_factor: float = LOAD_FACTOR) -> int:
    """The most requests ``candidate`` may hold, counting the one being placed (CHWBL's bound)."""
    total = sum(c.outstanding for c in candidates) + 1
    share = candidate.weight / sum(c.weight for c in candidates)
    return max(1, math.ceil(load_factor * total * share))


def least_loaded(candidates: Sequence[Candidate]) -> Candidate:
    """The fewest outstanding requests per unit of weight; ties go to the faster, then by id."""
    return min(candidates, key=lambda c: ((c.outstanding + 1) / c.weight, -c.weight, c.id))


def pick(
    candidates: Sequence[Candidate],
    prefix: str | None,
    *,
    exclude: Collection[str] = (),
    load_factor: float = LOAD_FACTOR,
    points: int = POINTS,
) -> Candidate | None:
    """The replica for a request with this prefix (None: no candidate left after ``exclude``)."""
    usable = [c for c in candidates if c.id not in exclude and c.weight > 0]
    if not usable:
        return None
    if not prefix:
        return least_loaded(usable)
    by_id = {c.id: c for c in usable}
    hashes, owners = _ring(tuple(sorted((c.id, c.weight) for c in usable)), points)
    start = bisect.bisect_left(hashes, _hash(prefix))
    seen: set[str] = set()
    for step in range(len(hashes)):
        owner = owners[(start + step) % len(hashes)]
        if owner in seen:
            continue
        seen.add(owner)
        candidate = by_id[owner]
        if candidate.outstanding + 1 <= capacity(candidate, usable, load_factor):
            return candidate
        if len(seen) == len(usable):
            break
    return least_loaded(usable)


def prefix_of(body: object, length: int = 256) -> str | None:
    """The start of a request's conversation: what an engine's prompt cache can reuse.

    Chat: the messages up to and including the first user message (the system prompt and the
    opening question stay the same on every turn of a conversation); completions: the prompt.
    At most ``length`` characters; None when the request has no text to hash.
    """
    if not isinstance(body, dict):
        return None
    parts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            parts.append(f"{message.get('role', '')}:{_text(message.get('content'))}")
            if message.get("role") == "user":
                break
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else None
        if isinstance(prompt, str):
            parts.append(prompt)
    joined = "\n".join(parts)[:length]
    return joined or None


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""
