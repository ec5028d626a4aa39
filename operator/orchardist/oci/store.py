"""The node's content-addressed model store: the one object the agent and the CLI use.

This is a thin facade over the modules that do the work: :mod:`~orchardist.oci.index` (what is
on disk; the layout is described there), :mod:`~orchardist.oci.gc` (the pure eviction policy),
:mod:`~orchardist.oci.pull` (fetching and verifying), :mod:`~orchardist.oci.materialize` (model
directories) and :mod:`~orchardist.oci.transfer` (the fast body path). It owns what ties them
together: pins, the per-model locks, and when the index is written.

Pins (running or pulling models) are in memory: the agent re-pins what it runs after a restart.
GC evicts least-recently-used unpinned models. One process owns a store root at a time (the
agent, or one CLI run): it holds an exclusive ``flock`` on ``<root>/.lock`` from open to
:meth:`ContentStore.close` (or exit), and a second opener gets :class:`StoreLockedError` instead
of evicting pins it cannot see. Every other lock is in-process. In async paths the disk work (deleting evicted
models, fsync, index writes, materializing) runs in threads; the in-memory maps change only on
the event loop thread, before the disk work starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orchardist import log
from orchardist.oci.auth import Credentials
from orchardist.oci.client import RegistryClient
from orchardist.oci.errors import StoreLockedError, UnknownLayoutError
from orchardist.oci.gc import Candidate, Eviction, plan_eviction
from orchardist.oci.index import ModelRecord, StoreIndex
from orchardist.oci.materialize import export
from orchardist.oci.peers import PeerSource
from orchardist.oci.progress import ProgressCallback, Tracker
from orchardist.oci.pull import Puller, source_tag
from orchardist.oci.reference import Reference, parse
from orchardist.oci.transfer import DEFAULT_LIMITS, TransferLimits

_log = log.get(__name__)


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


class ContentStore:
    """Blobs by digest, model directories by manifest digest, LRU GC under ``budget_bytes``.

    ``fast_path=False`` reads every blob body through aiohttp's stream instead of the raw socket
    (the fallback TLS and chunked responses take anyway; kept selectable to compare and test).
    ``limits`` are the minimum rate and deadline of each blob download.
    """

    def __init__(
        self,
        root: Path | str,
        budget_bytes: int,
        *,
        insecure: Iterable[str] = (),
        max_parallel: int = 3,
        retries: int = 8,
        fast_path: bool = True,
        limits: TransferLimits = DEFAULT_LIMITS,
        keep_archives: bool = False,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_root(self.root)
        self._release = weakref.finalize(self, os.close, self._lock_fd)
        self.budget_bytes = budget_bytes
        self.insecure = tuple(insecure)
        self.max_parallel = max_parallel
        self.retries = retries
        self.index = StoreIndex(self.root)
        self.blob_dir = self.index.blob_dir
        self.manifest_dir = self.index.manifest_dir
        self.model_dir = self.index.model_dir
        self.tmp_dir = self.index.tmp_dir
        self._pins: dict[str, int] = {}
        self._gc_lock = asyncio.Lock()  # one eviction at a time; a pull waits for one in flight
        self._save_lock = asyncio.Lock()
        self._puller = Puller(
            self.index,
            budget_bytes=lambda: self.budget_bytes,
            used_bytes=lambda: self.usage().used_bytes,
            make_room=self.gc_async,
            save=self._save,
            max_parallel=max_parallel,
            attempts=retries + 1,
            fast=fast_path,
            limits=limits,
            keep_archives=keep_archives,
        )
        try:
            self.index.open()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the store root for another process (also released when this object or process ends)."""
        self._release()

    @property
    def blob_gets(self) -> int:
        """Blob requests this store made (observability and tests)."""
        return self._puller.blob_gets

    # ---- pins, queries ----------------------------------------------------------------------

    def pin(self, digest: str) -> None:
        """Protect a model (running or pulling) from GC; pins nest."""
        self._pins[digest] = self._pins.get(digest, 0) + 1

    def unpin(self, digest: str) -> None:
        if self._pins.get(digest, 0) <= 1:
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
        return self._pins.get(digest, 0) > 0

    def cached(self) -> list[tuple[str, int]]:
        """(manifest digest, bytes on disk) of every materialized model, newest use first."""
        models = self.index.models
        return [(d, r.size) for d, r in sorted(models.items(), key=lambda kv: -kv[1].last_used)]

    def get(self, digest: str) -> ModelDir | None:
        record = self.index.models.get(digest)
        return None if record is None else self._model_dir(digest, record)

    def usage(self) -> Usage:
        partial = sum(size for _, size in self.index.partials().values()) + self._puller.unpacked_bytes()
        used = (
            sum(self.index.blobs.values())
            + sum(r.extracted_bytes for r in self.index.models.values())
            + partial
        )
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        return Usage(used, self.budget_bytes, free, len(self.index.models), len(self.index.blobs))

    def blob_path(self, digest: str) -> Path:
        return self.index.blob_path(digest)

    def _model_dir(self, digest: str, r: ModelRecord) -> ModelDir:
        return ModelDir(
            path=self.index.model_path(digest),
            digest=digest,
            reference=r.reference,
            layout=r.layout,
            files=tuple(r.files),
            total_bytes=r.size,
            format=r.format,
        )

    # ---- GC: decided by orchardist.oci.gc, applied here ---------------------------------------

    def _plan_and_forget(self, need_bytes: int) -> Eviction:
        """Decide what to evict and drop it from the in-memory maps (the disk is the caller's job)."""
        plan = plan_eviction(
            {d: Candidate(r.blobs, r.extracted_bytes, r.last_used) for d, r in self.index.models.items()},
            self.index.blobs,
            pinned={d for d, n in self._pins.items() if n > 0},
            active=set(self._puller.active),
            partials=self.index.partials(),
            budget_bytes=self.budget_bytes,
            need_bytes=need_bytes,
            unpacking_bytes=self._puller.unpacked_bytes(),
        )
        for digest in plan.models:
            self.index.models.pop(digest, None)
        for digest in plan.blobs:
            self.index.blobs.pop(digest, None)
        if plan.models:
            _log.info(
                "store gc evicted models",
                evicted=list(plan.models),
                used=plan.used_bytes,
                budget=self.budget_bytes,
            )
        return plan

    def gc(self, need_bytes: int = 0) -> list[str]:
        """Evict LRU unpinned models until usage + ``need_bytes`` fits the budget; returns them.

        Blocking; async code uses :meth:`gc_async`. Unreferenced blobs and stale partial downloads
        go first; a blob used by a pinned model or by a pull in progress is never removed.
        """
        plan = self._plan_and_forget(need_bytes)
        self.index.delete(list(plan.models), list(plan.blobs), list(plan.partials))
        self.index.write(self.index.snapshot())
        return list(plan.models)

    async def gc_async(self, need_bytes: int = 0) -> list[str]:
        """:meth:`gc` with the deleting and the index write in a thread."""
        async with self._gc_lock:
            plan = self._plan_and_forget(need_bytes)
            if not plan.empty:
                await asyncio.to_thread(
                    self.index.delete, list(plan.models), list(plan.blobs), list(plan.partials)
                )
            await self._save()
        return list(plan.models)

    async def _save(self) -> None:
        """Write the index; the snapshot is taken under the lock, so the last write is the newest."""
        async with self._save_lock:
            await asyncio.to_thread(self.index.write, self.index.snapshot())

    # ---- pull -------------------------------------------------------------------------------

    async def pull(
        self,
        ref: str | Reference,
        *,
        auth: Credentials | None = None,
        progress: ProgressCallback | None = None,
        keep_pinned: bool = False,
        peers: PeerSource | None = None,
    ) -> ModelDir:
        """Resolve, download missing blobs (verified, resumable), materialize; idempotent.

        With ``peers`` each missing blob is asked of other Macs of the fleet before the registry.

        A reference pinned by digest that is already in the store is served without the network.
        With ``keep_pinned`` the model stays pinned on return (the caller unpins when it stops).
        """
        r = parse(ref) if isinstance(ref, str) else ref
        tracker = Tracker(progress, str(r))
        tracker.emit(force=True)
        if r.digest and await self._has_model(r.digest):
            return await self._finish_cached(r.digest, tracker, keep_pinned)
        async with RegistryClient.for_ref(r, credentials=auth, insecure=self.insecure) as client:
            manifest = await client.resolve(r)
            digest = manifest.digest
            self.pin(digest)
            try:
                # Keyed by source: a slow registry never holds up the same model from another one.
                async with self._puller.lock(f"model:{source_tag(r.registry, r.repository)}:{digest}"):
                    if await self._has_model(digest):
                        return await self._finish_cached(digest, tracker, keep_pinned)
                    record = await self._puller.pull_new(client, r, manifest, tracker, peers)
                if keep_pinned:
                    self.pin(digest)
            finally:
                self.unpin(digest)
        tracker.set_phase("done")
        _log.info("model pulled", reference=str(r), digest=digest, layout=record.layout, bytes=record.size)
        return self._model_dir(digest, record)

    async def _has_model(self, digest: str) -> bool:
        """A recorded model whose directory is still there (one removed behind our back is forgotten)."""
        if digest not in self.index.models:
            return False
        if self.index.model_path(digest).is_dir():
            return True
        self.index.models.pop(digest)
        await self._save()
        return False

    async def _finish_cached(self, digest: str, tracker: Tracker, keep_pinned: bool) -> ModelDir:
        record = self.index.models[digest]
        record.last_used = time.time()
        if keep_pinned:
            self.pin(digest)
        await self._save()
        tracker.start(digest, record.blob_bytes, len(record.blobs))
        tracker.add(record.blob_bytes)
        tracker.set_phase("done")
        return self._model_dir(digest, record)

    async def export(self, model: ModelDir, dest: Path) -> Path:
        """Materialize a model directory at ``dest`` (the CLI's ``--dest``): links when possible."""
        return await asyncio.to_thread(export, model.path, dest)


def _lock_root(root: Path) -> int:
    """An fd holding an exclusive flock on ``root/.lock`` (with our pid in it), or StoreLockedError."""
    path = root / ".lock"
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLockedError(
            f"model store {root} is in use by another process (pid {holder}); one process owns a store"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


__all__ = ["ContentStore", "ModelDir", "StoreLockedError", "UnknownLayoutError", "Usage"]
