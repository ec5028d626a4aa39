"""The node's content-addressed model store.

Layout under ``root``::

    blobs/sha256/<hex>       verified blobs, read-only, each stored once whatever uses it
    manifests/sha256/<hex>   the raw manifest of each materialized model
    models/<hex>/            a model directory, files linked from blobs (clone/hardlink/copy)
    tmp/<hex>.partial        a download in progress: kept after a cut so the next try resumes
    index.json               model records (reference, blobs, files, last use), written atomically

The index is a cache of what is on disk: on open it is checked against the disk and rebuilt from
the manifests when missing or torn. Pins (running or pulling models) are in memory: the agent
re-pins what it runs after a restart. GC evicts least-recently-used unpinned models.

One process owns a store root at a time (the agent, or one CLI run): locks are in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp

from orchardist import log
from orchardist.oci.auth import Credentials
from orchardist.oci.client import CHUNK, CONFIG_LIMIT, Manifest, RegistryClient, sha256_digest
from orchardist.oci.errors import (
    DigestMismatchError,
    OCIError,
    RegistryUnreachableError,
    StoreFullError,
    UnknownLayoutError,
)
from orchardist.oci.fsutil import atomic_write, fsync_path, link_or_copy, remove_tree, start_writeback
from orchardist.oci.layouts import Layer, Layout, read_layout
from orchardist.oci.progress import ProgressCallback, Tracker
from orchardist.oci.reference import Reference, parse
from orchardist.oci.safepath import check_tree, ensure_dir, extract_tar, prepare, safe_relpath

_log = log.get(__name__)

INDEX_VERSION = 1
SINK_BATCH = 4 << 20  # bytes handed to the hashing/writing thread at a time
SINK_BUFFERS = 4  # batches in flight: the socket keeps flowing while the threads catch up


@dataclass(frozen=True)
class ModelDir:
    """A materialized model: what the agent hands to an engine."""

    path: Path
    digest: str
    reference: str
    layout: str
    files: tuple[tuple[str, int], ...]
    total_bytes: int
    format: str | None = None


@dataclass(frozen=True)
class Usage:
    used_bytes: int
    budget_bytes: int
    free_bytes: int
    models: int
    blobs: int


@dataclass
class _Record:
    reference: str
    layout: str
    format: str | None
    blobs: list[str]
    files: list[tuple[str, int]]
    blob_bytes: int
    extracted_bytes: int
    last_used: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.blob_bytes + self.extracted_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "layout": self.layout,
            "format": self.format,
            "blobs": self.blobs,
            "files": [list(f) for f in self.files],
            "blobBytes": self.blob_bytes,
            "extractedBytes": self.extracted_bytes,
            "lastUsed": self.last_used,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Record:
        return cls(
            reference=str(d["reference"]),
            layout=str(d["layout"]),
            format=d.get("format"),
            blobs=[str(b) for b in d["blobs"]],
            files=[(str(p), int(s)) for p, s in d["files"]],
            blob_bytes=int(d["blobBytes"]),
            extracted_bytes=int(d["extractedBytes"]),
            last_used=float(d["lastUsed"]),
        )


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


class ContentStore:
    """Blobs by digest, model directories by manifest digest, LRU GC under ``budget_bytes``."""

    def __init__(
        self,
        root: Path | str,
        budget_bytes: int,
        *,
        insecure: Iterable[str] = (),
        max_parallel: int = 3,
        retries: int = 8,
    ) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.insecure = tuple(insecure)
        self.max_parallel = max_parallel
        self.retries = retries
        self.blob_dir = self.root / "blobs" / "sha256"
        self.manifest_dir = self.root / "manifests" / "sha256"
        self.model_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        for d in (self.blob_dir, self.manifest_dir, self.model_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._pins: Counter[str] = Counter()
        self._active: Counter[str] = Counter()  # blobs of pulls in progress
        self._locks: dict[str, asyncio.Lock] = {}
        self._blobs: dict[str, int] = {}
        self._models: dict[str, _Record] = {}
        self.blob_gets = 0  # blob downloads started by this store (observability and tests)
        self._open()

    # ---- opening: the index is checked against the disk ------------------------------------

    def _open(self) -> None:
        for p in self.blob_dir.iterdir():
            if len(p.name) == 64 and p.is_file():
                self._blobs["sha256:" + p.name] = p.stat().st_size
            else:
                p.unlink(missing_ok=True)
        for p in self.model_dir.iterdir():
            if p.name.startswith(".staging-"):
                remove_tree(p)
        for p in self.root.glob(".index.json.*.tmp"):  # an index write cut short by a crash
            p.unlink(missing_ok=True)
        loaded: dict[str, Any] = {}
        index = self.root / "index.json"
        try:
            raw: dict[str, Any] = (
                json.loads(index.read_text()) if index.exists() else {"version": INDEX_VERSION}
            )
            if raw.get("version") == INDEX_VERSION:
                loaded = raw.get("models") or {}
        except (OSError, ValueError, AttributeError):
            _log.warning("store index unreadable (torn write?); rebuilding it from disk", root=str(self.root))
        for digest, rec in loaded.items():
            try:
                record = _Record.from_json(rec)
            except (KeyError, TypeError, ValueError):
                continue
            if self._intact(digest, record):
                self._models[digest] = record
        for p in self.manifest_dir.iterdir():
            digest = "sha256:" + p.name
            if digest in self._models:
                continue
            rebuilt = self._rebuild(digest, p)
            if rebuilt is not None:
                self._models[digest] = rebuilt
            else:
                p.unlink(missing_ok=True)
        for p in self.model_dir.iterdir():
            if "sha256:" + p.name not in self._models:
                remove_tree(p)
        self._save()

    def _intact(self, digest: str, record: _Record) -> bool:
        path = self.model_dir / _hex(digest)
        return (
            path.is_dir()
            and (self.manifest_dir / _hex(digest)).is_file()
            and all(b in self._blobs for b in record.blobs)
        )

    def _rebuild(self, digest: str, manifest_path: Path) -> _Record | None:
        """A record from a manifest on disk, if its blobs and model directory are all there."""
        try:
            raw = manifest_path.read_bytes()
            if sha256_digest(raw) != digest:
                return None
            data = json.loads(raw)
            layout = read_layout(data)
        except (OSError, ValueError, OCIError):
            return None
        blobs = self._blob_list(layout)
        path = self.model_dir / _hex(digest)
        if not path.is_dir() or not all(b in self._blobs for b in blobs):
            return None
        files = []
        for dirpath, _, names in os.walk(path):
            for n in names:
                full = Path(dirpath) / n
                if not full.is_symlink():
                    files.append((str(full.relative_to(path)), full.stat().st_size))
        extracted = sum(s for p, s in files if layout.find(p) is None)
        return _Record(
            reference=str(data.get("annotations", {}).get("org.opencontainers.image.ref.name", "")),
            layout=layout.name,
            format=layout.format,
            blobs=blobs,
            files=sorted(files),
            blob_bytes=sum(self._blobs[b] for b in blobs),
            extracted_bytes=extracted,
            last_used=path.stat().st_mtime,
        )

    @staticmethod
    def _blob_list(layout: Layout) -> list[str]:
        return list(dict.fromkeys([layout.config.digest, *(e.layer.digest for e in layout.entries)]))

    def _save(self) -> None:
        body = {"version": INDEX_VERSION, "models": {d: r.to_json() for d, r in sorted(self._models.items())}}
        atomic_write(self.root / "index.json", json.dumps(body, indent=1).encode())

    # ---- pins, queries ----------------------------------------------------------------------

    def pin(self, digest: str) -> None:
        """Protect a model (running or pulling) from GC; pins nest."""
        self._pins[digest] += 1

    def unpin(self, digest: str) -> None:
        if self._pins[digest] <= 1:
            self._pins.pop(digest, None)
        else:
            self._pins[digest] -= 1

    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        self.pin(digest)
        try:
            yield
        finally:
            self.unpin(digest)

    def is_pinned(self, digest: str) -> bool:
        return self._pins[digest] > 0

    def cached(self) -> list[tuple[str, int]]:
        """(manifest digest, bytes on disk) of every materialized model, newest use first."""
        return [(d, r.size) for d, r in sorted(self._models.items(), key=lambda kv: -kv[1].last_used)]

    def get(self, digest: str) -> ModelDir | None:
        record = self._models.get(digest)
        return None if record is None else self._model_dir(digest, record)

    def usage(self) -> Usage:
        used = self._used_bytes()
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        return Usage(used, self.budget_bytes, free, len(self._models), len(self._blobs))

    def _used_bytes(self) -> int:
        partial = 0
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                partial += p.stat().st_size
        return sum(self._blobs.values()) + sum(r.extracted_bytes for r in self._models.values()) + partial

    def _model_dir(self, digest: str, r: _Record) -> ModelDir:
        return ModelDir(
            path=self.model_dir / _hex(digest),
            digest=digest,
            reference=r.reference,
            layout=r.layout,
            files=tuple(r.files),
            total_bytes=r.size,
            format=r.format,
        )

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / _hex(digest)

    # ---- GC ---------------------------------------------------------------------------------

    def gc(self, need_bytes: int = 0) -> list[str]:
        """Evict LRU unpinned models until usage + ``need_bytes`` fits the budget. Returns evicted digests.

        Unreferenced blobs and stale partial downloads go first; a blob used by a pinned model or
        by a pull in progress is never removed.
        """
        evicted: list[str] = []
        self._drop_unreferenced()
        while self._used_bytes() + need_bytes > self.budget_bytes:
            victims = sorted(
                (d for d in self._models if not self.is_pinned(d)), key=lambda d: self._models[d].last_used
            )
            if not victims:
                break
            digest = victims[0]
            self._models.pop(digest)
            remove_tree(self.model_dir / _hex(digest))
            (self.manifest_dir / _hex(digest)).unlink(missing_ok=True)
            evicted.append(digest)
            self._drop_unreferenced()
        if evicted:
            _log.info(
                "store gc evicted models", evicted=evicted, used=self._used_bytes(), budget=self.budget_bytes
            )
        self._save()
        return evicted

    def _drop_unreferenced(self) -> None:
        keep = set(self._active)
        for r in self._models.values():
            keep.update(r.blobs)
        for digest in [b for b in self._blobs if b not in keep]:
            self.blob_path(digest).unlink(missing_ok=True)
            self._blobs.pop(digest, None)
        for p in self.tmp_dir.iterdir():
            if "sha256:" + p.name.split(".")[0] not in self._active:
                p.unlink(missing_ok=True)

    # ---- pull -------------------------------------------------------------------------------

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def pull(
        self,
        ref: str | Reference,
        *,
        auth: Credentials | None = None,
        progress: ProgressCallback | None = None,
        keep_pinned: bool = False,
    ) -> ModelDir:
        """Resolve, download missing blobs (verified, resumable), materialize; idempotent.

        A reference pinned by digest that is already in the store is served without the network.
        With ``keep_pinned`` the model stays pinned on return (the caller unpins when it stops).
        """
        r = parse(ref) if isinstance(ref, str) else ref
        tracker = Tracker(progress, str(r))
        tracker.emit(force=True)
        if r.digest and self._has_model(r.digest):
            return self._finish_cached(r.digest, tracker, keep_pinned)
        async with RegistryClient.for_ref(r, credentials=auth, insecure=self.insecure) as client:
            manifest = await client.resolve(r)
            digest = manifest.digest
            self.pin(digest)
            try:
                async with self._lock("model:" + digest):
                    if self._has_model(digest):
                        return self._finish_cached(digest, tracker, keep_pinned)
                    model = await self._pull_new(client, r, manifest, tracker)
                if keep_pinned:
                    self.pin(digest)
                return model
            finally:
                self.unpin(digest)

    def _has_model(self, digest: str) -> bool:
        """A recorded model whose directory is still there (one removed behind our back is forgotten)."""
        if digest not in self._models:
            return False
        if (self.model_dir / _hex(digest)).is_dir():
            return True
        self._models.pop(digest)
        self._save()
        return False

    def _finish_cached(self, digest: str, tracker: Tracker, keep_pinned: bool) -> ModelDir:
        record = self._models[digest]
        record.last_used = time.time()
        self._save()
        if keep_pinned:
            self.pin(digest)
        tracker.start(digest, record.blob_bytes, len(record.blobs))
        tracker.add(record.blob_bytes)
        tracker.set_phase("done")
        return self._model_dir(digest, record)

    async def _pull_new(
        self, client: RegistryClient, r: Reference, manifest: Manifest, tracker: Tracker
    ) -> ModelDir:
        digest = manifest.digest
        layout = read_layout(manifest.data)
        blobs = self._blob_list(layout)
        layers = list({e.layer.digest: e.layer for e in layout.entries}.values())
        total = sum(layer.size for layer in layers)
        extracted_estimate = sum(e.layer.size for e in layout.entries if e.archive)
        if total + extracted_estimate > self.budget_bytes:
            raise StoreFullError(
                f"{r}: needs {total + extracted_estimate} bytes, "
                f"more than the store budget of {self.budget_bytes}"
            )
        self._active.update(blobs)
        try:
            missing = [layer for layer in layers if layer.digest not in self._blobs]
            self.gc(need_bytes=sum(layer.size for layer in missing) + extracted_estimate + layout.config.size)
            tracker.start(digest, total, len(layers))
            tracker.add(total - sum(layer.size for layer in missing))
            await self._ensure_small(client, r.repository, layout.config)
            sem = asyncio.Semaphore(self.max_parallel)
            try:
                async with asyncio.TaskGroup() as tg:
                    for layer in missing:
                        tg.create_task(self._ensure_blob(client, r.repository, layer, tracker, sem))
            except BaseExceptionGroup as group:
                raise _first_error(group) from None
            tracker.set_phase("materializing")
            files, extracted = await asyncio.to_thread(self._materialize, digest, layout)
            atomic_write(self.manifest_dir / _hex(digest), manifest.raw)
            record = _Record(
                reference=str(r),
                layout=layout.name,
                format=layout.format,
                blobs=blobs,
                files=sorted(files),
                blob_bytes=sum(self._blobs[b] for b in blobs),
                extracted_bytes=extracted,
                last_used=time.time(),
            )
            self._models[digest] = record
            self._save()
        finally:
            self._active.subtract(blobs)
            self._active += Counter()  # drop zero counts
        tracker.set_phase("done")
        _log.info("model pulled", reference=str(r), digest=digest, layout=layout.name, bytes=record.size)
        return self._model_dir(digest, record)

    async def _ensure_small(self, client: RegistryClient, repo: str, layer: Layer) -> None:
        if layer.digest in self._blobs:
            return
        async with self._lock(layer.digest):
            if layer.digest in self._blobs:
                return
            data = await client.get_blob(repo, layer.digest, limit=CONFIG_LIMIT)
            self._commit_bytes(layer.digest, data)

    def _commit_bytes(self, digest: str, data: bytes) -> None:
        tmp = self.tmp_dir / f"{_hex(digest)}.small"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._commit(digest, tmp)

    def _commit(self, digest: str, tmp: Path) -> None:
        tmp.chmod(0o444)
        tmp.replace(self.blob_path(digest))
        fsync_path(self.blob_dir)
        self._blobs[digest] = self.blob_path(digest).stat().st_size

    async def _ensure_blob(
        self, client: RegistryClient, repo: str, layer: Layer, tracker: Tracker, sem: asyncio.Semaphore
    ) -> None:
        async with sem, self._lock(layer.digest):
            if layer.digest in self._blobs:  # a concurrent pull fetched it meanwhile
                tracker.add(layer.size)
            else:
                await self._download(client, repo, layer, tracker)
        tracker.layer_done()

    async def _download(self, client: RegistryClient, repo: str, layer: Layer, tracker: Tracker) -> None:
        """Stream one blob to ``tmp/<hex>.partial`` hashing inline; resume with Range after a cut."""
        partial = self.tmp_dir / f"{_hex(layer.digest)}.partial"
        h = hashlib.sha256()
        offset = 0
        if partial.exists():
            offset = partial.stat().st_size
            if offset > layer.size:
                offset = 0
            else:
                h = await asyncio.to_thread(_hash_prefix, partial, offset)
                tracker.add(offset)
        failures = 0
        while offset < layer.size:
            try:
                self.blob_gets += 1
                async with client.open_blob(repo, layer.digest, offset) as resp:
                    if resp.status == 200 and offset:
                        _log.info("registry ignored Range; restarting blob", digest=layer.digest)
                        tracker.add(-offset)
                        offset, h = 0, hashlib.sha256()
                    with _BlobFile(partial, offset) as f:
                        offset = await _stream(resp, f, h, offset, layer, tracker)
                if offset < layer.size:
                    raise RegistryUnreachableError(f"blob {layer.digest}: connection closed at byte {offset}")
            except (aiohttp.ClientError, TimeoutError, RegistryUnreachableError) as exc:
                # Every byte in the partial file went through the hash too: resume right after it.
                offset = partial.stat().st_size if partial.exists() else 0
                failures += 1
                if failures > self.retries:
                    raise RegistryUnreachableError(
                        f"blob {layer.digest[:19]}: download interrupted {failures} times, last: {exc}"
                    ) from exc
                _log.info(
                    "blob download interrupted; resuming", digest=layer.digest, offset=offset, error=str(exc)
                )
                await asyncio.sleep(min(0.2 * 2**failures, 10.0))
            except DigestMismatchError:
                partial.unlink(missing_ok=True)
                raise
        got = "sha256:" + h.hexdigest()
        if got != layer.digest:
            partial.unlink(missing_ok=True)
            raise DigestMismatchError(f"blob {layer.digest}: received content hashes to {got}; discarded")
        await asyncio.to_thread(fsync_path, partial)
        self._commit(layer.digest, partial)

    # ---- materialize ------------------------------------------------------------------------

    def _materialize(self, digest: str, layout: Layout) -> tuple[list[tuple[str, int]], int]:
        """Build the model directory in a staging dir, check it, then rename it into place."""
        staging = self.model_dir / f".staging-{_hex(digest)[:12]}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        files: list[tuple[str, int]] = []
        extracted = 0
        try:
            for e in layout.entries:
                blob = self.blob_path(e.layer.digest)
                if e.archive is None:
                    dest = prepare(staging, safe_relpath(e.path), "file")
                    link_or_copy(blob, dest)
                    files.append((e.path, e.layer.size))
                    continue
                into = ensure_dir(staging, safe_relpath(e.path)) if e.path else staging
                compression = {"tar": None, "tar+gzip": "gzip", "tar+zstd": "zstd"}[e.archive]
                with open(blob, "rb") as f:
                    got = extract_tar(f, into, compression, f"layer {e.layer.digest[:19]}")
                prefix = f"{e.path}/" if e.path else ""
                files.extend((prefix + p, s) for p, s in got)
                extracted += sum(s for _, s in got)
            check_tree(staging)
            final = self.model_dir / _hex(digest)
            remove_tree(final)
            staging.rename(final)
            fsync_path(self.model_dir)
        except BaseException:
            remove_tree(staging)
            raise
        return files, extracted

    async def export(self, model: ModelDir, dest: Path) -> Path:
        """Materialize a model directory at ``dest`` (the CLI's ``--dest``): links when possible."""
        return await asyncio.to_thread(_export, model.path, dest)


def _export(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for dirpath, dirnames, names in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirnames:
            full = Path(dirpath) / d
            if full.is_symlink():
                continue
            ensure_dir(dest, PurePosixPath(*(rel / d).parts))
        for n in names:
            s = Path(dirpath) / n
            target = prepare(dest, PurePosixPath(*(rel / n).parts), "file")
            if s.is_symlink():
                target.symlink_to(s.readlink())
            else:
                link_or_copy(s, target)
        for d in dirnames:
            full = Path(dirpath) / d
            if full.is_symlink():
                prepare(dest, PurePosixPath(*(rel / d).parts), "file").symlink_to(full.readlink())
    return dest


def _hash_all(h: Any, view: memoryview) -> None:
    h.update(view)  # hashlib releases the GIL on big buffers: runs beside the receiving loop


class _BlobFile:
    """The partial blob opened twice: page-aligned batches go through O_DIRECT (the disk reads our
    buffer, no copy into the page cache, which costs a core's worth of time beside sha256 on a small
    node), anything else through a buffered fd. Where O_DIRECT is missing or refused, buffered only."""

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

    def __enter__(self) -> _BlobFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None
        os.close(self.fd)

    def write_at(self, view: memoryview, offset: int) -> None:
        """Write all of ``view`` at ``offset`` (a batch buffer from _stream: page-aligned memory)."""
        done = 0
        if self.direct is not None and offset % _ALIGN == 0:
            aligned = len(view) - len(view) % _ALIGN
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


_ALIGN = 4096
READ_TIMEOUT = 120.0  # seconds without a byte before a raw body read gives up (the session's sock_read)


class _Body:
    """A blob response body read into caller buffers: ``readinto`` returns 0 at the end."""

    async def readinto(self, view: memoryview) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Done with the body (the connection is not reused after a raw read)."""


class _ChunkedBody(_Body):
    """Through aiohttp's stream: any transfer encoding, TLS, everything."""

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


class _RawBody(_Body):
    """A plain-HTTP, Content-Length body read with recv_into straight into our buffers.

    aiohttp's path (parser, stream buffer, joined chunks, then our copy) cost a whole core per
    GiB, which sha256 needs on a 2-core node. Its transport is paused and the connection closed
    afterwards, never reused half-read.
    """

    def __init__(self, resp: aiohttp.ClientResponse, sock: socket.socket, head: bytes, length: int) -> None:
        self.resp = resp
        self.sock = sock
        self.head = memoryview(head)
        self.left = length - len(head)
        self.loop = asyncio.get_running_loop()

    @classmethod
    def open(cls, resp: aiohttp.ClientResponse) -> _RawBody | None:
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
        protocol.pause_reading()  # the transport stops reading and aiohttp's own read timer stops too
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


def _open_body(resp: aiohttp.ClientResponse) -> _Body:
    return _RawBody.open(resp) or _ChunkedBody(resp)


async def _stream(
    resp: aiohttp.ClientResponse, f: _BlobFile, h: Any, offset: int, layer: Layer, tracker: Tracker
) -> int:
    """Receive into ``f`` and ``h`` from ``offset``; returns the new offset.

    The body is read into a ring of page-aligned batch buffers: the event loop fills one while a
    thread hashes and another writes the ones before it (each in order), so sha256, the disk and the
    socket work at once. Every byte in the file is in the hash when this returns or raises (a resume continues
    from the file's size).
    """
    loop = asyncio.get_running_loop()
    hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-hash")
    writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-write")
    views = [memoryview(mmap.mmap(-1, SINK_BATCH)) for _ in range(SINK_BUFFERS)]  # page-aligned
    pending: list[list[asyncio.Future[None]]] = [[] for _ in views]  # the work still reading each buffer
    cur, fill = 0, 0
    body = _open_body(resp)
    try:
        while n := await body.readinto(views[cur][fill:]):
            if offset + fill + n > layer.size:
                raise DigestMismatchError(
                    f"blob {layer.digest}: the registry sent more than the {layer.size} "
                    "bytes the manifest declares; discarded"
                )
            fill += n
            if fill == SINK_BATCH:
                pending[cur] = [
                    loop.run_in_executor(hasher, _hash_all, h, views[cur]),
                    loop.run_in_executor(writer, f.write_at, views[cur], offset),
                ]
                offset += fill
                tracker.add(fill)
                cur, fill = (cur + 1) % len(views), 0
                if pending[cur]:
                    await asyncio.gather(*pending[cur])
                    pending[cur] = []
    finally:
        try:
            if any(pending):
                await asyncio.shield(asyncio.gather(*(fut for futs in pending for fut in futs)))
            if fill:
                _hash_all(h, views[cur][:fill])
                f.write_at(views[cur][:fill], offset)
                offset += fill
                tracker.add(fill)
        finally:
            body.close()
            hasher.shutdown(wait=True)
            writer.shutdown(wait=True)
    return offset


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real failure of a task group (not the cancellations it caused)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


def _hash_prefix(path: Path, length: int) -> Any:
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


__all__ = ["ContentStore", "ModelDir", "UnknownLayoutError", "Usage"]
