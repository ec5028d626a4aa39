"""Whether a caller of the peer server is another Mac of this fleet, and which one.

A caller presents its peer token (``Authorization: Bearer``; minted as :mod:`.peer_identity` says).
The API server decides, through a TokenReview with ``spec.audiences: ["orchardist.io/peers"]``: the
token must be authenticated, for that audience, and name an agent ServiceAccount of this agent's
own namespace (``system:serviceaccount:<ns>:orchardist-agent-<node>``); another ServiceAccount is
403. The node name is the caller's identity for logs and rate limits.

Answers are kept by the token's sha256 so a rollout's many range requests cost one TokenReview:
an accepted token until its ``exp`` (read from the JWT only after the API server accepted it) or
:attr:`ReviewCache.fresh` seconds, whichever is first (so a deleted ServiceAccount is refused
within that time); a refusal for :attr:`ReviewCache.refused_for` seconds, so a hostile caller
cannot turn the server into a TokenReview flood (the per-address rate limit stays in front, and
tokens that cannot pass, not shaped as a JWT, for another audience or expired by their own
claims, are refused without asking). Both maps are bounded. When the API server cannot be asked,
an accepted token keeps working until its own ``exp``; a new one gets 503 with Retry-After, and
the caller takes the blob from another peer or the registry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchardist import log
from orchardist.kube import paths

from .peer_identity import AUDIENCE, AUTHN, parse_username

if TYPE_CHECKING:
    from orchardist.kube import Kube

LOG = log.get(__name__)

MAX_TOKEN = 16 * 1024  # bytes: a ServiceAccount token is about 1 KiB


@dataclass(frozen=True)
class Verdict:
    """200 with the caller's node, or the status to refuse with (401, 403, 503) and why."""

    status: int
    node: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


#: The peer server's check of a bearer token (injectable: the p2p benchmark runs without a cluster).
Verifier = Callable[[str], Awaitable[Verdict]]

UNAVAILABLE = Verdict(503, reason="peer tokens cannot be checked now")
BUSY = Verdict(503, reason="too many peer tokens being checked")


def bearer(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``; None without one or when oversized (pure)."""
    if not header or not header.startswith("Bearer "):
        return None
    token = header.removeprefix("Bearer ").strip()
    return token if token and len(token) <= MAX_TOKEN else None


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT-shaped token, not verified (only to refuse early or read ``exp`` after
    the API server accepted it); None when not a JWT (pure)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def precheck(token: str, now: float) -> str | None:
    """Why a token cannot pass whatever the API server says (by its own claims), or None (pure)."""
    claims = unverified_claims(token)
    if claims is None:
        return "not a ServiceAccount token"
    aud = claims.get("aud")
    if AUDIENCE not in (aud if isinstance(aud, list) else [aud]):
        return f"not a token for {AUDIENCE}"
    exp = _number(claims.get("exp"))
    if exp is not None and exp <= now:
        return "expired"
    return None


def judge(status: Mapping[str, Any], namespace: str) -> Verdict:
    """The TokenReview's answer as a verdict: authenticated, for our audience, an agent of our
    namespace (pure)."""
    if status.get("authenticated") is not True:
        return Verdict(401, reason="not accepted by the API server")
    audiences = status.get("audiences")
    if not isinstance(audiences, list) or AUDIENCE not in audiences:
        return Verdict(401, reason=f"not a token for {AUDIENCE}")
    username = str((status.get("user") or {}).get("username") or "")
    who = parse_username(username)
    if who is None or who.namespace != namespace:
        return Verdict(403, reason=f"{username or '(no name)'} is not an agent of this fleet")
    return Verdict(200, node=who.node)


@dataclass
class _Entry:
    verdict: Verdict
    fresh: float  # served without asking again until then (wall clock)
    valid: float  # still served when the API server cannot be asked, until then


class ReviewCache:
    """The API server's answers by token digest: accepted and refused kept apart, each bounded, so
    refusals never push out accepted tokens."""

    def __init__(self, *, fresh: float = 600.0, refused_for: float = 10.0, max_entries: int = 4096) -> None:
        self.fresh = fresh
        self.refused_for = refused_for
        self.max_entries = max_entries
        self._accepted: dict[str, _Entry] = {}
        self._refused: dict[str, _Entry] = {}

    def get(self, key: str, now: float) -> Verdict | None:
        """A verdict still fresh at ``now``, else None (ask the API server)."""
        entry = self._accepted.get(key) or self._refused.get(key)
        return entry.verdict if entry is not None and now < entry.fresh else None

    def stale(self, key: str, now: float) -> Verdict | None:
        """An accepted verdict whose token has not expired: used while the API server cannot be asked."""
        entry = self._accepted.get(key)
        return entry.verdict if entry is not None and now < entry.valid else None

    def put(self, key: str, verdict: Verdict, now: float, exp: float | None = None) -> None:
        """Keep ``verdict``: accepted until ``exp`` (fresh at most :attr:`fresh`), refused briefly."""
        if verdict.ok:
            valid = exp if exp is not None else now + self.fresh
            self._keep(self._accepted, key, _Entry(verdict, min(valid, now + self.fresh), valid), now)
        else:
            until = now + self.refused_for
            self._keep(self._refused, key, _Entry(verdict, until, until), now)

    def _keep(self, into: dict[str, _Entry], key: str, entry: _Entry, now: float) -> None:
        into.pop(key, None)
        if len(into) >= self.max_entries:
            for old in [k for k, e in into.items() if e.valid <= now]:
                del into[old]
        while len(into) >= self.max_entries:
            del into[next(iter(into))]  # the oldest kept
        into[key] = entry

    def __len__(self) -> int:
        return len(self._accepted) + len(self._refused)


class TokenReviewer:
    """The peer server's verifier: TokenReviews through the Kubernetes adapter, answers cached, one
    review in flight per token (concurrent requests with one token wait for it). At most
    ``max_pending`` reviews at once (503 beyond): each holds a worker thread, which the agent's
    own API calls (its heartbeat) share."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        *,
        cache: ReviewCache | None = None,
        timeout: float = 5.0,
        max_pending: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.namespace = namespace  # the release namespace: callers must be agents of it
        self.cache = cache or ReviewCache()
        self.timeout = timeout
        self.max_pending = max_pending
        self.clock = clock
        self.reviews = 0  # TokenReviews sent (observability, tests)
        self._pending: dict[str, asyncio.Future[Verdict]] = {}

    async def __call__(self, token: str) -> Verdict:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        cached = self.cache.get(key, now)
        if cached is not None:
            return cached
        early = precheck(token, now)
        if early is not None:
            return Verdict(401, reason=early)
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                return BUSY
            pending = asyncio.ensure_future(self._review(key, token))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _review(self, key: str, token: str) -> Verdict:
        body = {"apiVersion": AUTHN, "kind": "TokenReview", "spec": {"token": token, "audiences": [AUDIENCE]}}
        self.reviews += 1
        try:
            out = await asyncio.to_thread(
                self.kube.raw.request, "POST", paths.tokenreview(), body=body, timeout=self.timeout
            )
        except Exception as exc:  # unreachable, timed out, refused (RBAC): nothing learned of the token
            stale = self.cache.stale(key, self.clock())
            error = (str(exc) or repr(exc)).splitlines()[0]
            LOG.warning("cannot review a peer's token", error=error, cached=stale is not None)
            return stale or UNAVAILABLE
        now = self.clock()
        verdict = judge(out.get("status") or {}, self.namespace)
        exp = _number((unverified_claims(token) or {}).get("exp")) if verdict.ok else None
        self.cache.put(key, verdict, now, exp)
        if verdict.ok:
            LOG.info("peer authenticated", node=verdict.node, expires_in=round(exp - now) if exp else None)
        else:
            LOG.info("peer refused", status=verdict.status, reason=verdict.reason)
        return verdict
