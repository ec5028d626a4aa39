"""Peer transfer's pure parts: where a blob is asked for, and who pulls it from the registry.

The claim rule (:func:`choose`) and the claims a Mac publishes (:class:`Claims`) are what make a
rollout to N Macs cost one registry pull; :mod:`orchardist.oci.peers` does the HTTP around them,
and the agent's peer server publishes the claims.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

FETCHING = "X-Orchardist-Fetching"  # on a 404: "<since> <bytes>" while the peer pulls it from a registry
BLOB_PATH = "/v1/blobs/"  # the peer server's route: GET/HEAD <base>/v1/blobs/<digest>
RANGE = 32 << 20  # bytes per range request: small enough to spread, big enough to stream


@dataclass(frozen=True)
class Peer:
    """Another Mac's blob server: its node name (for logs) and base URL (``http://addr:port``)."""

    name: str
    url: str


def split(size: int, chunk: int = RANGE) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``size`` bytes, each at most ``chunk`` long (pure)."""
    if size <= 0:
        return []
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def content_range_ok(header: str | None, start: int, end: int, size: int) -> bool:
    """Whether a 206's ``Content-Range`` is exactly ``bytes start-(end-1)/size`` (pure)."""
    return header == f"bytes {start}-{end - 1}/{size}"


class Choice(enum.Enum):
    """Where a blob comes from, decided by :func:`choose`."""

    PEERS = "peers"  # some peer holds it complete
    WAIT = "wait"  # an earlier claimant is pulling it from the registry: wait, then take it from it
    REGISTRY = "registry"  # ours to pull from the registry (the fleet then takes it from us)


@dataclass(frozen=True)
class Probe:
    """What one peer said of a blob: complete, or being fetched since ``since`` (``bytes`` so far)."""

    peer: Peer
    complete: bool = False
    since: float | None = None
    bytes: int = 0


def choose(own_since: float, own_name: str, probes: Sequence[Probe]) -> Choice:
    """The one rule that makes a rollout to N Macs cost one registry pull (pure).

    Every Mac marks its claim (the time it started wanting the blob) before it asks the others,
    so of any two that want a blob at once, each sees the other's claim or the other sees its
    own; the older claim (then the smaller node name) pulls from the registry and the rest wait.
    """
    if any(p.complete for p in probes):
        return Choice.PEERS
    claims = [(p.since, p.peer.name) for p in probes if p.since is not None]
    if any(claim < (own_since, own_name) for claim in claims):
        return Choice.WAIT
    return Choice.REGISTRY


def parse_fetching(value: str | None) -> tuple[float, int] | None:
    """``"<since> <bytes>"`` of the fetching header, or None when absent or malformed (pure)."""
    if not value:
        return None
    since, _, got = value.partition(" ")
    try:
        return float(since), int(got or 0)
    except ValueError:
        return None


class Claims:
    """The blobs this Mac is fetching (or about to) from a registry: the peer server tells others.

    Written on the event loop by the pull; read by the peer server to answer HEAD/GET with
    :data:`FETCHING` instead of a plain 404.
    """

    def __init__(self) -> None:
        self.claims: dict[str, tuple[float, int]] = {}

    def claim(self, digest: str, since: float) -> None:
        self.claims[digest] = (since, 0)

    def progress(self, digest: str, n: int) -> None:
        if digest in self.claims:
            since, got = self.claims[digest]
            self.claims[digest] = (since, got + n)

    def release(self, digest: str) -> None:
        self.claims.pop(digest, None)

    def header(self, digest: str) -> str | None:
        claim = self.claims.get(digest)
        return None if claim is None else f"{claim[0]:.6f} {claim[1]}"
