"""Blobs from other Macs of the fleet: the client side of peer transfer (with client.py and
transfer.py, the only HTTP of this package).

A Mac that holds a verified blob serves it to the fleet (the agent's ``peer_server``); a Mac about
to pull asks those peers first (who pulls from the registry: :mod:`orchardist.oci.peering`). From
one holder the blob comes as one body through the registry's fast path; from several it is cut
into ranges (:func:`split`) fetched in parallel, written in place, and hashed in order as the
prefix completes. Nothing a peer sends is trusted:

* a range must answer 206 with exactly the ``Content-Range`` asked and exactly its length
  (a peer that sends more, less, or another range loses the range and is dropped);
* a peer slower than :attr:`PeerLimits.min_rate` over a window is cut and dropped;
* the whole blob must hash to its digest, or the file is deleted and :class:`PeerFetchError`
  raised: the caller then pulls from the registry. A lying peer costs one blob's transfer,
  never a bad blob in the store.

Ranges a dropped peer held go back to the queue for the others; with no peer left the fetch fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from orchardist import log
from orchardist.oci.errors import OCIError, RegistryUnreachableError
from orchardist.oci.peering import (
    BLOB_PATH,
    FETCHING,
    RANGE,
    Choice,
    Claims,
    Peer,
    Probe,
    choose,
    content_range_ok,
    parse_fetching,
    split,
)
from orchardist.oci.transfer import Pace, TransferLimits

_log = log.get(__name__)

POLL = 0.25  # seconds between looks at a peer that is fetching what we wait for
READ = 4 << 20  # bytes read from a range body before each write


class PeerFetchError(OCIError):
    """No peer delivered the blob intact: the caller falls back to the registry."""


@dataclass(frozen=True)
class PeerLimits:
    """How slow a peer may be before it is dropped (a peer is on the LAN: far stricter than a registry)."""

    #: bytes/s a range must average over each window
    min_rate: int = 4 << 20
    #: seconds over which the rate is measured; also the longest wait for a first byte
    window: float = 10.0
    #: range requests in flight per peer
    per_peer: int = 2

    def transfer(self) -> TransferLimits:
        return TransferLimits(min_rate=self.min_rate, window=self.window, deadline=3600.0)


class RangeError(Exception):
    """One range from one peer failed; the peer is dropped and the range handed to another."""


@dataclass
class _Fetch:
    """One blob's fetch: the queue of ranges left, which are done, and the in-order hash."""

    size: int
    todo: deque[tuple[int, int]]
    done: dict[int, int] = field(default_factory=dict)  # start -> end of finished ranges
    hashed: int = 0
    h: Any = field(default_factory=hashlib.sha256)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # a range finished
    returned: asyncio.Event = field(default_factory=asyncio.Event)  # a range or the last one came back
    in_flight: int = 0

    def finished(self) -> bool:
        return not self.todo and not self.in_flight


class PeerSource:
    """Fetches whole blobs from peers; ``token`` is the bearer credential the peers check, or a
    callable read at each request (a token renewed while a long pull runs)."""

    def __init__(
        self,
        peers: Sequence[Peer],
        token: str | Callable[[], str | None] | None,
        *,
        name: str = "",
        claims: Claims | None = None,
        limits: PeerLimits | None = None,
        range_size: int = RANGE,
        wait_deadline: float = 3600.0,
    ) -> None:
        self.peers = list(peers)
        self.token = token
        self.name = name  # this Mac's node name: the tie-break of equal claims
        self.claims = claims if claims is not None else Claims()
        self.wait_deadline = wait_deadline
        self.limits = limits or PeerLimits()
        self.range_size = range_size
        self.bytes_from: dict[str, int] = {}  # peer name -> bytes it delivered (observability, tests)
        self.dropped: set[str] = set()  # peers dropped for a failed range

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        token = self.token() if callable(self.token) else self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def session(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.limits.window, sock_read=self.limits.window)
        return aiohttp.ClientSession(timeout=timeout, auto_decompress=False)

    async def probe(self, session: aiohttp.ClientSession, digest: str, size: int) -> list[Probe]:
        """What every peer says of the blob (asked at once; an unreachable peer says nothing).

        Complete means 200 with the blob's exact size; a 404 may carry the peer's claim.
        """

        async def ask(peer: Peer) -> Probe | None:
            try:
                async with (
                    asyncio.timeout(self.limits.window),
                    session.head(peer.url + BLOB_PATH + digest, headers=self._headers()) as resp,
                ):
                    if resp.status == 200 and resp.headers.get("Content-Length") == str(size):
                        return Probe(peer, complete=True)
                    claim = parse_fetching(resp.headers.get(FETCHING)) if resp.status == 404 else None
                    return Probe(peer, since=claim[0], bytes=claim[1]) if claim else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return None

        found = await asyncio.gather(*(ask(p) for p in self.peers))
        return [p for p in found if p is not None]

    async def obtain(
        self,
        digest: str,
        size: int,
        partial: Path,
        on_bytes: Callable[[int], None],
        from_registry: Callable[[Callable[[int], None]], Awaitable[None]],
    ) -> str:
        """The blob into the store's hands from peers, or else from the registry; returns the source.

        Follows :func:`choose`: take it from a peer that holds it; wait for an older claimant while
        its bytes advance (a claimant that stops for a window, vanishes or fails is passed over);
        else claim it and call ``from_registry`` (whose byte counter our claim reports to peers).
        A failed peer fetch falls back to the registry at once. ``partial`` is for peer bytes only.
        After "registry" the claim stands until the caller :meth:`Claims.release` s it, once the
        blob is committed: a peer must never see neither a claim nor the blob in between.
        """
        try:
            source = await self._from_peers(digest, size, partial, on_bytes)
        except BaseException:  # cancelled while deciding: nobody should wait for this Mac
            self.claims.release(digest)
            raise
        if source == "peers":
            return source

        def counted(n: int) -> None:
            self.claims.progress(digest, n)
            on_bytes(n)

        try:
            await from_registry(counted)
        except BaseException:
            self.claims.release(digest)
            raise
        return "registry"  # still claimed: the caller releases once the blob is in the store

    async def _from_peers(
        self, digest: str, size: int, partial: Path, on_bytes: Callable[[int], None]
    ) -> str:
        """ "peers" when a peer delivered the blob; else "registry", with our claim standing."""
        loop = asyncio.get_running_loop()
        give_up_waiting = loop.time() + self.wait_deadline
        async with self.session() as session:
            while True:
                self.claims.claim(digest, time.time())
                probes = await self.probe(session, digest, size)
                choice = choose(self.claims.claims[digest][0], self.name, probes)
                if choice is Choice.WAIT and loop.time() < give_up_waiting:
                    self.claims.release(digest)  # a waiter claims nothing
                    _log.info("waiting for a peer's pull", digest=digest, peers=[p.peer.name for p in probes])
                    if not await self._wait(session, digest, size, give_up_waiting):
                        give_up_waiting = 0.0  # a claimant stalled: never wait again for this blob
                    continue
                break
            if choice is Choice.PEERS:
                self.claims.release(digest)
                try:
                    await self.fetch(digest, size, partial, on_bytes, session=session)
                    return "peers"
                except PeerFetchError as exc:
                    _log.warning("peers failed; pulling from the registry", digest=digest, error=str(exc))
                self.claims.claim(digest, time.time())
        return "registry"

    async def _wait(self, session: aiohttp.ClientSession, digest: str, size: int, deadline: float) -> bool:
        """Until a peer holds the blob or its claimant went away (True), or no claimant made
        progress for a window or the deadline passed (False)."""
        loop = asyncio.get_running_loop()
        seen: dict[str, int] = {}
        moved = loop.time()
        while loop.time() < deadline:
            await asyncio.sleep(POLL)
            probes = await self.probe(session, digest, size)
            if any(p.complete for p in probes):
                return True
            claimants = {p.peer.name: p.bytes for p in probes if p.since is not None}
            if not claimants:
                return True  # the claimant gave up or went away: decide again
            if any(seen.get(name, -1) < got for name, got in claimants.items()):
                moved = loop.time()
            seen = claimants
            if loop.time() - moved > self.limits.window:
                _log.warning("peer pull stalled; deciding again", digest=digest, claimants=claimants)
                return False
        return False

    async def fetch(
        self,
        digest: str,
        size: int,
        partial: Path,
        on_bytes: Callable[[int], None],
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        """Fetch the blob into ``partial`` (verified and fsynced on return) or raise PeerFetchError.

        ``on_bytes`` hears every byte kept; bytes of a failed fetch are taken back (negative).
        """
        counted = 0

        def count(n: int) -> None:
            nonlocal counted
            counted += n
            on_bytes(n)

        try:
            if session is None:
                async with self.session() as own:
                    await self._fetch(own, digest, size, partial, count)
            else:
                await self._fetch(session, digest, size, partial, count)
        except BaseException:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            if counted:
                on_bytes(-counted)
            raise

    async def _fetch(
        self,
        session: aiohttp.ClientSession,
        digest: str,
        size: int,
        partial: Path,
        on_bytes: Callable[[int], None],
    ) -> None:
        holders = [p.peer for p in await self.probe(session, digest, size) if p.complete]
        if not holders:
            raise PeerFetchError(f"blob {digest[:19]}: no peer holds it")
        if len(holders) == 1:  # one source: one stream on the registry's fast path (hash inline)
            await self._whole(session, holders[0], digest, size, partial, on_bytes)
            return
        state = _Fetch(size=size, todo=deque(split(size, self.range_size)))
        fd = await asyncio.to_thread(os.open, partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            await asyncio.to_thread(os.ftruncate, fd, size)
            hasher = asyncio.create_task(self._hash_in_order(fd, state))
            try:
                await asyncio.gather(
                    *(self._serve_peer(session, p, digest, fd, state, on_bytes) for p in holders)
                )
                if _covered(state) < size:
                    raise PeerFetchError(f"blob {digest[:19]}: every peer holding it failed")
                try:
                    await hasher
                except OSError as exc:
                    raise PeerFetchError(f"blob {digest[:19]}: {exc}") from exc
            finally:
                hasher.cancel()
            await asyncio.to_thread(os.fsync, fd)
        finally:
            await asyncio.to_thread(os.close, fd)
        got = "sha256:" + state.h.hexdigest()
        if got != digest:
            raise PeerFetchError(f"blob {digest[:19]}: peers' bytes hash to {got}; discarded")
        _log.info("blob from peers", digest=digest, bytes=size, peers=dict(self.bytes_from))

    async def _whole(
        self,
        session: aiohttp.ClientSession,
        peer: Peer,
        digest: str,
        size: int,
        partial: Path,
        on_bytes: Callable[[int], None],
    ) -> None:
        """The blob from one peer as one body (resumed once after a cut), verified while it arrives."""
        from orchardist.oci.layouts import Layer
        from orchardist.oci.pull import download  # pull.py uses this module: imported when needed

        try:
            await download(
                _OnePeer(self, session, peer, size),  # type: ignore[arg-type]
                "",
                Layer(digest, size, ""),
                partial,
                on_bytes,
                attempts=2,
                limits=self.limits.transfer(),
            )
        except (OCIError, aiohttp.ClientError, OSError) as exc:
            self.dropped.add(peer.name)
            raise PeerFetchError(f"blob {digest[:19]} from peer {peer.name}: {exc}") from exc
        self.bytes_from[peer.name] = self.bytes_from.get(peer.name, 0) + size
        _log.info("blob from peers", digest=digest, bytes=size, peers=dict(self.bytes_from))

    async def _serve_peer(
        self,
        session: aiohttp.ClientSession,
        peer: Peer,
        digest: str,
        fd: int,
        state: _Fetch,
        on_bytes: Callable[[int], None],
    ) -> None:
        """Workers for one peer take ranges until all are done; the first failure drops the peer.

        A worker with nothing to take waits while ranges are in flight elsewhere: one of them may
        come back from a failed peer.
        """
        failed = asyncio.Event()

        async def worker() -> None:
            while not failed.is_set() and not state.finished():
                if not state.todo:
                    state.returned.clear()
                    await state.returned.wait()
                    continue
                start, end = state.todo.popleft()
                state.in_flight += 1
                try:
                    await self._range(session, peer, digest, fd, start, end, state.size, on_bytes)
                except (RangeError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                    state.todo.appendleft((start, end))  # for a peer still standing
                    if not failed.is_set():
                        failed.set()
                        self.dropped.add(peer.name)
                        _log.warning("peer dropped", peer=peer.name, digest=digest, error=str(exc))
                    return
                else:
                    state.done[start] = end
                    state.wake.set()
                finally:
                    state.in_flight -= 1
                    state.returned.set()

        await asyncio.gather(*(worker() for _ in range(self.limits.per_peer)))

    async def _range(
        self,
        session: aiohttp.ClientSession,
        peer: Peer,
        digest: str,
        fd: int,
        start: int,
        end: int,
        size: int,
        on_bytes: Callable[[int], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        pace = Pace(self.limits.transfer(), f"blob {digest[:19]} from peer {peer.name}", loop.time())
        headers = self._headers({"Range": f"bytes={start}-{end - 1}"})
        kept = 0
        try:
            async with session.get(peer.url + BLOB_PATH + digest, headers=headers) as resp:
                if resp.status != 206 or not content_range_ok(
                    resp.headers.get("Content-Range"), start, end, size
                ):
                    raise RangeError(f"answered {resp.status} {resp.headers.get('Content-Range')!r}")
                offset = start
                while offset < end:
                    try:  # whole batches: one write (one thread hop) per READ bytes
                        async with asyncio.timeout(pace.wait_limit(loop.time())):
                            data = await resp.content.readexactly(min(READ, end - offset))
                    except TimeoutError:
                        raise RangeError(str(pace.stalled(loop.time()))) from None
                    except asyncio.IncompleteReadError as exc:
                        raise RangeError(f"range cut at byte {offset + len(exc.partial)}") from None
                    await asyncio.to_thread(os.pwrite, fd, data, offset)
                    offset += len(data)
                    kept += len(data)
                    on_bytes(len(data))
                    try:
                        pace.check(loop.time(), offset - start)
                    except OCIError as exc:
                        raise RangeError(str(exc)) from None
                if await resp.content.read(1):
                    raise RangeError(f"sent more than the {end - start} bytes of range {start}-{end - 1}")
        except BaseException:
            if kept:
                on_bytes(-kept)
            raise
        self.bytes_from[peer.name] = self.bytes_from.get(peer.name, 0) + (end - start)

    async def _hash_in_order(self, fd: int, state: _Fetch) -> None:
        """Hash finished ranges in file order as the prefix completes (beside the transfers)."""
        while state.hashed < state.size:
            end = state.done.get(state.hashed)
            if end is None:
                state.wake.clear()
                await state.wake.wait()
                continue
            await asyncio.to_thread(_hash_span, fd, state.h, state.hashed, end)
            state.hashed = end


class _OnePeer:
    """What :func:`orchardist.oci.pull.download` needs of a registry client, served by one peer."""

    def __init__(self, source: PeerSource, session: aiohttp.ClientSession, peer: Peer, size: int) -> None:
        self.source = source
        self.session = session
        self.peer = peer
        self.size = size
        self.registry = f"peer {peer.name}"

    @contextlib.asynccontextmanager
    async def open_blob(
        self, repo: str, digest: str, offset: int = 0
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The body from ``offset``: 206 with exactly that range, or 200 with the whole blob."""
        extra = {"Range": f"bytes={offset}-{self.size - 1}"} if offset else None
        try:
            async with self.session.get(
                self.peer.url + BLOB_PATH + digest, headers=self.source._headers(extra)
            ) as resp:
                whole = resp.status == 200 and resp.content_length == self.size
                ranged = resp.status == 206 and content_range_ok(
                    resp.headers.get("Content-Range"), offset, self.size, self.size
                )
                if not (whole or ranged):
                    raise PeerFetchError(f"answered {resp.status} {resp.headers.get('Content-Range')!r}")
                yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryUnreachableError(f"{self.registry}: {exc}") from exc


def _covered(state: _Fetch) -> int:
    return sum(end - start for start, end in state.done.items())


def _hash_span(fd: int, h: Any, start: int, end: int) -> None:
    offset = start
    while offset < end:
        data = os.pread(fd, min(READ, end - offset), offset)
        if not data:
            raise OSError(f"short read at {offset}")
        h.update(data)
        offset += len(data)
