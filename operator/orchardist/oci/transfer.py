"""Receiving one blob body into a file and a hash at disk speed (with client.py, the only HTTP here).

:func:`receive` reads a response body into a ring of page-aligned batch buffers: the event loop
fills one while one thread hashes and another writes the ones before it (each in order), so
sha256, the disk and the socket work at once. Two ways to read the body:

* the fast path, for a plain-HTTP body with a Content-Length: ``recv_into`` on the connection's
  socket straight into our buffers. aiohttp's path (parser, stream buffer, joined chunks, then our
  copy) cost a whole core per GiB, which sha256 needs on a 2-core node;
* aiohttp's own stream for everything else (TLS, chunked or encoded bodies), or when asked.

Batches that start page-aligned are written with O_DIRECT (no copy into the page cache, which
costs a core's worth of time beside sha256 on a small node); anything else goes through a
buffered fd with early writeback.

A registry that drips bytes must not hold a pull (and every pull waiting on it) forever:
:class:`Pace` cuts a body that falls below :attr:`TransferLimits.min_rate` over a window, and
gives up a blob that is not complete by its overall deadline, across all resumed requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import mmap
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from orchardist.oci.client import CHUNK
from orchardist.oci.errors import (
    DeadlineError,
    DigestMismatchError,
    RegistryUnreachableError,
    SlowTransferError,
)
from orchardist.oci.fsutil import start_writeback

SINK_BATCH = 4 << 20  # bytes handed to the hashing/writing thread at a time
SINK_BUFFERS = 4  # batches in flight: the socket keeps flowing while the threads catch up
ALIGN = 4096
READ_TIMEOUT = 120.0  # seconds without a byte before a raw body read gives up (the session's sock_read)

#: What a resumed request can cure: the connection dropped, stalled or never came up.
INTERRUPTIONS = (aiohttp.ClientError, TimeoutError, RegistryUnreachableError)


@dataclass(frozen=True)
class TransferLimits:
    """How slow and how long one blob download may be before it is cut off."""

    #: bytes/s a body must average over each ``window`` (a slower one is cut; a retry resumes)
    min_rate: int = 64 << 10
    #: seconds over which the rate is measured; also the longest wait for any byte at all
    window: float = 60.0
    #: seconds from the first request to the verified blob, retries included; never retried past
    deadline: float = 6 * 3600.0


#: the defaults (a module-level value, so signatures can name it)
DEFAULT_LIMITS = TransferLimits()


class Pace:
    """Enforces :class:`TransferLimits` on one blob: pure bookkeeping, time passed in by the caller.

    :meth:`begin` starts a request (the rate window restarts; the deadline does not);
    :meth:`check` is called after every read with the clock and the bytes so far in this request.
    """

    def __init__(self, limits: TransferLimits, what: str, now: float) -> None:
        self.limits = limits
        self.what = what
        self.deadline_at = now + limits.deadline
        self.started = now
        self.samples: deque[tuple[float, int]] = deque([(now, 0)])

    def begin(self, now: float) -> None:
        self.check_deadline(now)
        self.started = now
        self.samples = deque([(now, 0)])

    def check_deadline(self, now: float) -> None:
        if now >= self.deadline_at:
            raise DeadlineError(
                f"{self.what}: not complete within its {self.limits.deadline:g} s deadline; given up"
            )

    def wait_limit(self, now: float) -> float:
        """The longest the next read may take: a window without a byte is below any rate."""
        return max(0.0, min(self.limits.window, self.deadline_at - now))

    def check(self, now: float, received: int) -> None:
        """Raise when the deadline passed or the last window carried less than the minimum rate."""
        self.check_deadline(now)
        self.samples.append((now, received))
        window = self.limits.window
        while len(self.samples) > 1 and self.samples[1][0] <= now - window:
            self.samples.popleft()
        if now - self.started < window:
            return
        got = received - self.samples[0][1]
        if got < self.limits.min_rate * window:
            raise SlowTransferError(
                f"{self.what}: {got} bytes in the last {window:g} s, below the minimum "
                f"{self.limits.min_rate} bytes/s; connection cut"
            )

    def stalled(self, now: float) -> Exception:
        """The error for a read that got no byte within :meth:`wait_limit`."""
        try:
            self.check_deadline(now)
        except DeadlineError as exc:
            return exc
        return SlowTransferError(
            f"{self.what}: no byte in {self.limits.window:g} s, below the minimum "
            f"{self.limits.min_rate} bytes/s; connection cut"
        )


class Sink(Protocol):
    """Where :func:`receive` puts each batch, in order, from one thread: a :class:`BlobFile`, or a
    tar layer's unpacker (:mod:`orchardist.oci.unpack`). ``view`` is reused once this returns."""

    def write_at(self, view: memoryview, offset: int) -> None: ...


class BlobFile:
    """A partial blob opened twice: an O_DIRECT fd for page-aligned batches, a buffered fd for the
    rest. Where O_DIRECT is missing or refused, buffered only. Truncated to ``offset`` on open."""

    def __init__(self, path: Path, offset: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.direct: int | None = None
        try:
            os.ftruncate(self.fd, offset)
            o_direct = getattr(os, "O_DIRECT", 0)
            if o_direct:
                with contextlib.suppress(OSError):
                    self.direct = os.open(path, os.O_WRONLY | o_direct)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BlobFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None
        os.close(self.fd)

    def write_at(self, view: memoryview, offset: int) -> None:
        """Write all of ``view`` at ``offset`` (a batch buffer from :func:`receive`: page-aligned)."""
        done = 0
        if self.direct is not None and offset % ALIGN == 0:
            aligned = len(view) - len(view) % ALIGN
            try:
                while done < aligned:
                    done += os.pwrite(self.direct, view[done:aligned], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.direct)  # this filesystem refuses O_DIRECT: buffered from here on
                self.direct = None
        start = done
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        if done > start:
            start_writeback(self.fd, offset + start, done - start)


class Body:
    """A blob response body read into caller buffers: ``readinto`` returns 0 at the end."""

    kind = ""

    async def readinto(self, view: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Done with the body (the connection is not reused after a raw read)."""


class StreamBody(Body):
    """Through aiohttp's stream: any transfer encoding, TLS, everything."""

    kind = "stream"

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.chunks = resp.content.iter_chunked(CHUNK).__aiter__()
        self.left = memoryview(b"")

    async def readinto(self, view: memoryview) -> int:
        if not self.left:
            try:
                self.left = memoryview(await self.chunks.__anext__())
            except StopAsyncIteration:
                return 0
        n = min(len(view), len(self.left))
        view[:n] = self.left[:n]
        self.left = self.left[n:]
        return n


class RawBody(Body):
    """A plain-HTTP, Content-Length body read with ``recv_into`` on a dup of the connection's socket.

    aiohttp's transport is paused first (which also stops its read timer, hence our own timeout)
    and the connection is closed afterwards, never reused half-read.
    """

    kind = "raw"

    def __init__(self, resp: aiohttp.ClientResponse, sock: socket.socket, head: bytes, length: int) -> None:
        self.resp = resp
        self.sock = sock
        self.head = memoryview(head)
        self.left = length - len(head)
        self.loop = asyncio.get_running_loop()

    @classmethod
    def open(cls, resp: aiohttp.ClientResponse) -> RawBody | None:
        """The raw reader for ``resp``, or None when the body is not a plain Content-Length one."""
        conn = resp.connection
        transport = conn.transport if conn is not None else None
        protocol = conn.protocol if conn is not None else None
        length = resp.headers.get("Content-Length")
        if (
            transport is None
            or protocol is None
            or length is None
            or not length.isdigit()
            or "Transfer-Encoding" in resp.headers
            or "Content-Encoding" in resp.headers
            or transport.get_extra_info("sslcontext") is not None
            or resp.content.exception() is not None
        ):
            return None
        raw = transport.get_extra_info("socket")
        if raw is None:
            return None
        head = resp.content.read_nowait(-1)  # body bytes aiohttp received with the headers
        protocol.pause_reading()
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        return cls(resp, sock, head, int(length))

    async def readinto(self, view: memoryview) -> int:
        if self.head:
            n = min(len(view), len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        if self.left <= 0:
            return 0
        async with asyncio.timeout(READ_TIMEOUT):
            n = await self.loop.sock_recv_into(self.sock, view[: self.left])
        self.left -= n
        return n

    def close(self) -> None:
        self.sock.close()
        self.resp.close()


def open_body(resp: aiohttp.ClientResponse, *, fast: bool = True) -> Body:
    """The fast raw reader when ``fast`` and the response allows it, else aiohttp's stream."""
    return (RawBody.open(resp) if fast else None) or StreamBody(resp)


def _hash_all(h: Any, view: memoryview) -> None:
    h.update(view)  # hashlib releases the GIL on big buffers: runs beside the receiving loop


async def receive(
    body: Body,
    f: Sink,
    h: Any,
    offset: int,
    *,
    size: int,
    digest: str,
    on_bytes: Callable[[int], None],
    pace: Pace | None = None,
) -> int:
    """Receive ``body`` into ``f`` and ``h`` from ``offset``; returns the new offset; closes ``body``.

    Every byte in the file is in the hash when this returns or raises, so a resume continues from
    the file's size. More bytes than ``size`` is a lying registry: DigestMismatchError.
    """
    loop = asyncio.get_running_loop()
    hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash")
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-write")
    views = [memoryview(mmap.mmap(-1, SINK_BATCH)) for _ in range(SINK_BUFFERS)]  # page-aligned
    pending: list[list[asyncio.Future[None]]] = [[] for _ in views]  # the work still reading each buffer
    cur, fill = 0, 0
    received = 0
    if pace is not None:
        pace.begin(loop.time())
    try:
        while n := await _read(body, views[cur][fill:], pace, loop):
            received += n
            if pace is not None:
                pace.check(loop.time(), received)
            if offset + fill + n > size:
                raise DigestMismatchError(
                    f"blob {digest}: the registry sent more than the {size} "
                    "bytes the manifest declares; discarded"
                )
            fill += n
            if fill == SINK_BATCH:
                pending[cur] = [
                    loop.run_in_executor(hasher, _hash_all, h, views[cur]),
                    loop.run_in_executor(writer, f.write_at, views[cur], offset),
                ]
                offset += fill
                on_bytes(fill)
                cur, fill = (cur + 1) % len(views), 0
                if pending[cur]:
                    await asyncio.gather(*pending[cur])
                    pending[cur] = []
    finally:
        try:
            if any(pending):
                await asyncio.shield(asyncio.gather(*(fut for futs in pending for fut in futs)))
            if fill:  # the tail (under one batch): hashed and written in the threads too
                tail = views[cur][:fill]
                await asyncio.shield(
                    asyncio.gather(
                        loop.run_in_executor(hasher, _hash_all, h, tail),
                        loop.run_in_executor(writer, f.write_at, tail, offset),
                    )
                )
                offset += fill
                on_bytes(fill)
        finally:
            body.close()
            hasher.shutdown(wait=True)
            writer.shutdown(wait=True)
    return offset


async def _read(body: Body, view: memoryview, pace: Pace | None, loop: asyncio.AbstractEventLoop) -> int:
    if pace is None:
        return await body.readinto(view)
    try:
        async with asyncio.timeout(pace.wait_limit(loop.time())):
            return await body.readinto(view)
    except TimeoutError:
        raise pace.stalled(loop.time()) from None


def hash_prefix(path: Path, length: int) -> Any:
    """sha256 state over the first ``length`` bytes of ``path`` (resuming a partial download)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining:
            chunk = f.read(min(CHUNK * 4, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h
