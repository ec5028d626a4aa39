"""This Mac's verified blobs, served read-only to the other Macs of the fleet.

``GET``/``HEAD /v1/blobs/<digest>`` (Range supported): only blobs the store committed, which
were verified against their digest while they arrived; partial downloads are never served. A
blob this Mac is itself pulling from a registry answers 404 with ``X-Orchardist-Fetching``, so
peers wait for it instead of pulling it too (:func:`orchardist.oci.peering.choose`).

Who may ask: another Mac of the fleet, by its node identity. The caller presents its peer token
(``Authorization: Bearer``), a token of its own agent ServiceAccount for the audience
``orchardist.io/peers`` that the API server refuses for anything else (:mod:`.peer_identity`), so
the Mac receiving it cannot replay it against the cluster. The verifier (:mod:`.peer_auth`: a
cached TokenReview) says which node it is; no token or a refused one is 401, a valid token of a
ServiceAccount that is not an agent of this fleet 403, and 503 with Retry-After when the API
server cannot be asked for a token not seen before. The verifier is injected: the p2p benchmark
runs without a cluster and passes its own.

Limits: ``requests_per_second`` per caller address before the token is looked at and again per
authenticated node (429), and at most ``max_streams`` blob bodies at once (503 with Retry-After:
the caller takes the range from another peer or the registry), so a misbehaving peer cannot take
the Mac's disk, network or API server quota from its engines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from orchardist import log
from orchardist.oci.index import valid_digest
from orchardist.oci.peering import BLOB_PATH, FETCHING, Claims

from .peer_auth import Verifier, bearer
from .proxy.server import listen_socket

LOG = log.get(__name__)

MAX_CALLERS = 4096  # token buckets kept (one per caller address and one per node)


@dataclass(frozen=True)
class ServeLimits:
    """How much of the Mac the fleet may take."""

    max_streams: int = 8
    requests_per_second: float = 50.0
    burst: float = 100.0


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class PeerServerStats:
    """Counters (observability, tests): bodies sent and refusals by status."""

    bodies: int = 0
    refused: dict[int, int] = field(default_factory=dict)


def admit(bucket: _Bucket | None, limits: ServeLimits, now: float) -> tuple[bool, _Bucket]:
    """One request against a caller's token bucket: admitted or not, and the bucket after (pure)."""
    if bucket is None:
        bucket = _Bucket(limits.burst, now)
    tokens = min(limits.burst, bucket.tokens + (now - bucket.at) * limits.requests_per_second)
    if tokens < 1.0:
        return False, _Bucket(tokens, now)
    return True, _Bucket(tokens - 1.0, now)


class PeerServer:
    """The blob server; ``blob_size(digest)`` says whether the store holds a verified blob."""

    def __init__(
        self,
        verify: Verifier,
        blob_path: Callable[[str], Path],
        blob_size: Callable[[str], int | None],
        claims: Claims,
        *,
        limits: ServeLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verify = verify
        self.blob_path = blob_path
        self.blob_size = blob_size
        self.claims = claims
        self.limits = limits or ServeLimits()
        self.clock = clock
        self.stats = PeerServerStats()
        self.streams = 0  # blob bodies being sent
        self._buckets: dict[str, _Bucket] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", BLOB_PATH + "{digest}", self.blob)
        app.router.add_route("HEAD", BLOB_PATH + "{digest}", self.blob)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        sock = listen_socket(host, port)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        LOG.info("peer server listening", address=host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _refuse(self, status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
        self.stats.refused[status] = self.stats.refused.get(status, 0) + 1
        return web.Response(status=status, text=reason + "\n", headers=headers)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        if not self._admit("address " + (request.remote or "")):
            return self._refuse(429, "too many requests", {"Retry-After": "1"})
        token = bearer(request.headers.get("Authorization"))
        if token is None:
            return self._refuse(401, "peer token required")
        verdict = await self.verify(token)
        if not verdict.ok:
            later = {"Retry-After": "5"} if verdict.status == 503 else None  # ask another peer meanwhile
            return self._refuse(verdict.status, verdict.reason, later)
        if not self._admit("node " + verdict.node):
            return self._refuse(429, "too many requests", {"Retry-After": "1"})
        digest = request.match_info["digest"]
        if not valid_digest(digest):
            return self._refuse(400, "not a sha256 digest")
        size = self.blob_size(digest)
        if size is None:
            claim = self.claims.header(digest)
            return self._refuse(404, "blob not held", {FETCHING: claim} if claim else None)
        if request.method == "HEAD":
            return web.Response(status=200, headers={"Content-Length": str(size), "Accept-Ranges": "bytes"})
        if self.streams >= self.limits.max_streams:
            return self._refuse(503, "busy", {"Retry-After": "1"})
        self.streams += 1
        self.stats.bodies += 1
        LOG.debug("blob sent to a peer", node=verdict.node, digest=digest, range=request.headers.get("Range"))
        return _Counted(self.blob_path(digest), self._stream_done)

    def _admit(self, caller: str) -> bool:
        """One request against the caller's token bucket (an address or a node)."""
        if caller not in self._buckets and len(self._buckets) >= MAX_CALLERS:
            self._buckets.clear()  # a fleet has far fewer Macs: whoever fills this starts everyone afresh
        ok, self._buckets[caller] = admit(self._buckets.get(caller), self.limits, self.clock())
        return ok

    def _stream_done(self) -> None:
        self.streams -= 1


class _Counted(web.FileResponse):
    """A blob body (sendfile, Range handled by aiohttp) that says when it is sent or failed."""

    def __init__(self, path: Path, done: Callable[[], None]) -> None:
        super().__init__(path, chunk_size=1 << 20)
        self._done: Callable[[], None] | None = done

    async def prepare(self, request: web.BaseRequest) -> Any:
        try:
            return await super().prepare(request)
        finally:
            if self._done is not None:
                self._done()
                self._done = None
