"""The store's eviction policy, as a pure function: what to delete to fit the disk budget.

The store gathers the facts (models with their blobs, sizes and last use; pins; blobs of pulls in
progress; partial downloads) and applies the answer; this module only decides, so every rule is
a row in a table test. Rules, in order:

1. A blob no model uses and no pull in progress needs goes first, as does a partial download no
   pull is resuming.
2. Then least-recently-used unpinned models go, one at a time, until usage plus ``need_bytes``
   fits ``budget_bytes``; each eviction frees the blobs only it used.
3. A pinned model, and a blob a kept model or an active pull uses, is never evicted: when those
   alone exceed the budget the plan stops short and says so (``fits=False``).

Tar layers that pulls in progress unpack while they download (``unpacking_bytes``) count as used
and are never evicted: their pulls remove them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A materialized model as GC sees it."""

    blobs: Sequence[str]
    extracted_bytes: int  # files unpacked from archives: on disk besides the blobs
    last_used: float


@dataclass(frozen=True)
class Eviction:
    """What to delete, and the usage once it is gone."""

    models: tuple[str, ...]  # manifest digests, in eviction order (oldest use first)
    blobs: tuple[str, ...]  # blob digests no kept model or active pull needs
    partials: tuple[str, ...]  # names of partial downloads no pull is resuming
    used_bytes: int
    fits: bool

    @property
    def empty(self) -> bool:
        return not (self.models or self.blobs or self.partials)


def plan_eviction(
    models: Mapping[str, Candidate],
    blobs: Mapping[str, int],
    *,
    pinned: Collection[str],
    active: Collection[str],
    partials: Mapping[str, tuple[str, int]],
    budget_bytes: int,
    need_bytes: int = 0,
    unpacking_bytes: int = 0,
) -> Eviction:
    """Decide which models, blobs and partial downloads to delete (see the module docstring).

    ``blobs`` maps blob digest to size; ``partials`` maps a partial file's name to (the blob digest
    it downloads, its size so far); ``active`` are blob digests of pulls in progress.
    """
    kept = dict(models)
    stale = tuple(sorted(name for name, (digest, _) in partials.items() if digest not in active))
    partial_bytes = unpacking_bytes + sum(size for name, (_, size) in partials.items() if name not in stale)

    def referenced() -> set[str]:
        keep = set(active)
        for m in kept.values():
            keep.update(m.blobs)
        return keep

    def used(live_blobs: Collection[str]) -> int:
        return (
            sum(blobs[b] for b in live_blobs) + sum(m.extracted_bytes for m in kept.values()) + partial_bytes
        )

    live = referenced() & blobs.keys()
    evicted: list[str] = []
    victims = sorted((d for d in kept if d not in pinned), key=lambda d: (kept[d].last_used, d))
    for digest in victims:
        if used(live) + need_bytes <= budget_bytes:
            break
        del kept[digest]
        evicted.append(digest)
        live = referenced() & blobs.keys()
    now = used(live)
    return Eviction(
        models=tuple(evicted),
        blobs=tuple(sorted(b for b in blobs if b not in live)),
        partials=stale,
        used_bytes=now,
        fits=now + need_bytes <= budget_bytes,
    )
