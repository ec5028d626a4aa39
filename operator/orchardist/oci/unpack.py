"""Tar layers unpacked while they download: hashed and extracted at once, kept only once verified.

A tar layer the store will not keep as a blob never lands on disk as an archive (that would be the
model twice). Its body goes through :func:`~orchardist.oci.transfer.receive`, the same path as a
blob: one thread hashes every batch (sha256 of the compressed bytes, the layer digest) while
another hands it to a :class:`Pipe`, from which a worker thread decompresses and extracts with the
one extractor, :func:`~orchardist.oci.safepath.extract_tar` (paths, links, entry and header
limits), into a staging directory inside the store. The uncompressed bytes of all the layers of
one pull draw on one :class:`Allowance` (the room left in the store), so a compression bomb stops
there however many layers unpack at once.

The pipe signals the end of the body only once it had exactly the declared size and hashed to the
layer digest, so the tar reader never sees a clean end of a cut or forged stream. Only then, and
when the tar ended cleanly, is the staging directory renamed to ``layers/<hex>.<random>``; on a
mismatch, a cut, a refused entry or cancellation it is removed and nothing of it is used.

A stream does not resume: the decompressor's and the tar reader's state live in memory, so an
interrupted layer starts over from byte 0 in a fresh staging directory (up to ``attempts``
requests, the blob's retry policy). Layers kept as blobs resume with Range
(:func:`orchardist.oci.pull.download`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import hashlib
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import tenacity

from orchardist import log, retry
from orchardist.oci.client import RegistryClient
from orchardist.oci.errors import DigestMismatchError, OCIError, RegistryUnreachableError, StoreFullError
from orchardist.oci.fsutil import fsync_path, remove_trees
from orchardist.oci.index import hex_of
from orchardist.oci.layouts import Layer
from orchardist.oci.safepath import extract_tar
from orchardist.oci.transfer import DEFAULT_LIMITS, INTERRUPTIONS, Pace, TransferLimits, open_body, receive

_log = log.get(__name__)

READ = 1 << 20  # the most the counter asks of the decompressor at once when the reader says "all"


@dataclass(frozen=True)
class Unpacked:
    """A verified tar layer as files: its directory and the (path, size) of each file in it."""

    path: Path
    files: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        return sum(s for _, s in self.files)


class Allowance:
    """Uncompressed bytes the tar layers of one pull may still write, shared by their threads.

    ``room`` is what it started with; :attr:`staged` is what sits in staging directories now
    (the store counts it as used). A layer that fails gives its bytes back; one that is kept
    moves them to the store's count of unpacked layers (:meth:`kept`).
    """

    def __init__(self, room: int) -> None:
        self.room = max(0, room)
        self.widened = False
        self.staged = 0
        self._left = self.room
        self._lock = threading.Lock()

    def take(self, n: int, what: str) -> None:
        with self._lock:
            self._left -= n
            self.staged += n
            if self._left < 0:
                raise StoreFullError(
                    f"{what}: expands past the {self.room} bytes left in the store budget "
                    "(counted uncompressed); extraction stopped"
                )

    def give_back(self, n: int) -> None:
        with self._lock:
            self._left += n
            self.staged -= n

    def kept(self, n: int) -> None:
        with self._lock:
            self.staged -= n

    def widen(self, room: int) -> None:
        """After GC made more room: what is left from now on (used once per pull)."""
        with self._lock:
            self.widened = True
            self.room = self._left = max(0, room)


class _Counted:
    """The decompressed stream as the tar reader sees it, every byte taken from the allowance."""

    def __init__(self, src: Any, allowance: Allowance, what: str) -> None:
        self.src = src
        self.allowance = allowance
        self.what = what
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.src.read(n if n >= 0 else READ)
        self.bytes += len(data)
        self.allowance.take(len(data), self.what)
        return data


class StoppedError(OCIError):
    """The other side of a :class:`Pipe` gave up (its own error is the one to report)."""


class Pipe:
    """Batches from :func:`receive`'s writing thread to the extracting thread, one at a time.

    :meth:`write_at` hands over a batch and returns once the reader has taken all of it (its
    buffer is then reused: nothing is copied but what the reader asks for). Either side can stop
    the other: :meth:`abort` (the download gave up: the reader raises) and :meth:`stop_reading`
    (the reader is done: a writer raises instead of waiting forever). :meth:`finish` is the end
    of a verified body.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._view: memoryview | None = None
        self._offset = 0
        self._eof = False
        self._aborted = False
        self._reader_gone = False

    def write_at(self, view: memoryview, offset: int) -> None:
        with self._cond:
            if offset != self._offset:  # receive() writes in order: anything else is a bug upstream
                raise StoppedError(f"batch at {offset}, expected {self._offset}")
            self._offset += len(view)
            if not len(view):
                return
            self._view = view
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._view is None or self._reader_gone or self._aborted)
            if self._view is not None:
                self._view = None
                raise StoppedError("the unpacking side stopped")

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._view is not None or self._eof or self._aborted)
            if self._aborted:
                raise StoppedError("the download stopped")
            view = self._view
            if view is None:
                return b""
            take = len(view) if n < 0 else min(n, len(view))
            data = bytes(view[:take])
            self._view = view[take:] if take < len(view) else None
            if self._view is None:
                self._cond.notify_all()
            return data

    def finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def stop_reading(self) -> None:
        with self._cond:
            self._reader_gone = True
            self._cond.notify_all()


def _decompressed(pipe: Pipe, archive: str) -> Any:
    """The layer's tar stream. Decompressed here (not by extract_tar) so that the byte counter,
    which sits between decompressor and tar reader as in extract_tar, is shared across layers."""
    src = cast(IO[bytes], pipe)  # read() is all the decompressors use
    if archive == "tar+zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(src)
    if archive == "tar+gzip":
        return gzip.GzipFile(fileobj=src, mode="rb")
    return src


def _extract(pipe: Pipe, staging: Path, counted: _Counted) -> list[tuple[str, int]]:
    """The worker thread: extract, then take the rest of the body (tar padding, trailing bytes:
    hashed, never extracted, as when extracting from a blob)."""
    try:
        files = extract_tar(cast(IO[bytes], counted), staging, None, counted.what)  # read() is all it uses
        while pipe.read(READ):
            pass
        return files
    finally:
        pipe.stop_reading()


def _place(staging: Path, final: Path) -> None:
    staging.rename(final)
    fsync_path(final.parent)


async def _discard(pipe: Pipe, extractor: asyncio.Future[Any], *dirs: Path) -> BaseException | None:
    """Stop the worker, wait for it, remove what it wrote (staging, or placed when cancelled
    just after); the worker's own error if any."""
    pipe.abort()
    await asyncio.wait([extractor])
    await asyncio.to_thread(remove_trees, dirs)
    error = extractor.exception()
    return None if error is None or isinstance(error, StoppedError) else error


async def fetch_unpacked(
    client: RegistryClient,
    repo: str,
    layer: Layer,
    archive: str,
    layers_dir: Path,
    allowance: Allowance,
    on_bytes: Callable[[int], None],
    *,
    attempts: int,
    fast: bool = True,
    on_request: Callable[[], None] = lambda: None,
    limits: TransferLimits = DEFAULT_LIMITS,
) -> Unpacked:
    """Download ``layer`` and extract it on the way into ``layers_dir``; verified on return.

    Interruptions are retried up to ``attempts`` requests in all, each from byte 0 (the bytes of
    a failed try are taken back from ``on_bytes``); past ``limits.deadline`` it is given up. An
    archive refused before its last byte arrived is refused as such; a body that does not hash
    to the digest is a :class:`DigestMismatchError`, as for a blob.
    """
    loop = asyncio.get_running_loop()
    what = f"layer {layer.digest[:19]}"
    pace = Pace(limits, f"{what} of {client.registry}/{repo}", loop.time())

    async def one_request() -> Unpacked:
        pace.check_deadline(loop.time())
        on_request()
        staging = layers_dir / f".staging-{hex_of(layer.digest)[:12]}-{uuid.uuid4().hex[:8]}"
        final = layers_dir / f"{hex_of(layer.digest)}.{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(staging.mkdir)
        pipe = Pipe()
        counted = _Counted(_decompressed(pipe, archive), allowance, what)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-unpack")
        extractor = loop.run_in_executor(pool, _extract, pipe, staging, counted)
        pool.shutdown(wait=False)  # its one thread ends with the extraction
        reported = 0

        def count(n: int) -> None:
            nonlocal reported
            reported += n
            on_bytes(n)

        try:
            h = hashlib.sha256()
            async with client.open_blob(repo, layer.digest, 0) as resp:
                body = open_body(resp, fast=fast)
                _log.debug("layer body unpacked on the way", digest=layer.digest, reader=body.kind)
                got = await receive(
                    body, pipe, h, 0, size=layer.size, digest=layer.digest, on_bytes=count, pace=pace
                )
            if got < layer.size:
                raise RegistryUnreachableError(f"{what}: connection closed at byte {got}")
            digest = "sha256:" + h.hexdigest()
            if digest != layer.digest:
                raise DigestMismatchError(f"{what}: received content hashes to {digest}; discarded")
            pipe.finish()
            files = await asyncio.shield(extractor)  # a cancelled wait must not orphan the worker
            await asyncio.to_thread(_place, staging, final)
        except BaseException as exc:
            error = await asyncio.shield(_discard(pipe, extractor, staging, final))
            allowance.give_back(counted.bytes)
            if reported:
                on_bytes(-reported)
            if isinstance(exc, StoppedError) and error is not None:
                raise error from None
            raise
        allowance.kept(counted.bytes)
        return Unpacked(final, tuple(files))

    def restarting(state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        _log.info(
            "layer download interrupted; starting it over (an unpacking stream does not resume)",
            digest=layer.digest,
            error=str(outcome.exception()) if outcome is not None else "",
        )

    try:
        async for attempt in retry.retrying(
            attempts=attempts, retry_on=INTERRUPTIONS, before_sleep=restarting
        ):
            with attempt:
                return await one_request()
    except INTERRUPTIONS as exc:
        raise RegistryUnreachableError(f"{what}: download interrupted {attempts} times, last: {exc}") from exc
    raise AssertionError("unreachable: the retry loop returns or raises")
