"""Pulling one model into the store: missing blobs fetched (verified, resumable), then materialized.

:func:`download` is one blob: it streams into ``tmp/<hex>.partial`` through
:mod:`orchardist.oci.transfer`, resumes with a Range request after a cut (retried by the project's
one backoff policy, :mod:`orchardist.retry`), checks the sha256 and fsyncs. :class:`Puller` runs a
whole model: room made by GC first, the config, then the layers a few at a time (each blob fetched
once however many pulls want it), then the model directory. Disk work runs in threads so the
event loop keeps serving other pulls and the agent meanwhile.

Downloads are keyed by where the bytes come from (registry, repository, digest): a pull from a
slow or hostile registry never holds up a pull of the same digest from another one, and the two
never share a partial file. Once verified, a blob is shared by everything that names its digest
(its bytes hash to that digest, whoever served them), and whoever finishes first wins; the
model directory is built once per manifest digest under a lock that covers only local work.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tenacity

from orchardist import log, retry
from orchardist.oci.client import CONFIG_LIMIT, Manifest, RegistryClient
from orchardist.oci.errors import DigestMismatchError, RegistryUnreachableError, StoreFullError
from orchardist.oci.fsutil import atomic_write, fsync_path
from orchardist.oci.index import ModelRecord, StoreIndex, blob_list, hex_of, stored_blobs
from orchardist.oci.layouts import Layer, Layout, read_layout
from orchardist.oci.materialize import materialize
from orchardist.oci.peers import PeerSource
from orchardist.oci.progress import Tracker
from orchardist.oci.reference import Reference
from orchardist.oci.transfer import (
    DEFAULT_LIMITS,
    INTERRUPTIONS,
    BlobFile,
    Pace,
    TransferLimits,
    hash_prefix,
    open_body,
    receive,
)

_log = log.get(__name__)


@dataclass
class _Received:
    """Where a download stands: bytes in the partial file, and the hash over exactly those."""

    offset: int
    h: Any


async def download(
    client: RegistryClient,
    repo: str,
    layer: Layer,
    partial: Path,
    on_bytes: Callable[[int], None],
    *,
    attempts: int,
    fast: bool = True,
    on_request: Callable[[], None] = lambda: None,
    limits: TransferLimits = DEFAULT_LIMITS,
) -> None:
    """Fetch ``layer`` into ``partial`` (verified and fsynced on return); resume whatever is there.

    A digest mismatch discards the partial file and is not retried; interruptions (a slow body
    included) are retried up to ``attempts`` requests in all, each resuming after the last byte
    written; past ``limits.deadline`` the download is given up (:class:`DeadlineError`).
    """
    loop = asyncio.get_running_loop()
    pace = Pace(limits, f"blob {layer.digest[:19]} of {client.registry}/{repo}", loop.time())
    got = await asyncio.to_thread(_resume_point, partial, layer.size)
    if got.offset:
        on_bytes(got.offset)

    async def one_request() -> None:
        pace.check_deadline(loop.time())
        on_request()
        async with client.open_blob(repo, layer.digest, got.offset) as resp:
            if resp.status == 200 and got.offset:
                _log.info("registry ignored Range; restarting blob", digest=layer.digest)
                on_bytes(-got.offset)
                got.offset, got.h = 0, hashlib.sha256()
            body = open_body(resp, fast=fast)
            _log.debug("blob body", digest=layer.digest, offset=got.offset, reader=body.kind)
            with BlobFile(partial, got.offset) as f:
                got.offset = await receive(
                    body,
                    f,
                    got.h,
                    got.offset,
                    size=layer.size,
                    digest=layer.digest,
                    on_bytes=on_bytes,
                    pace=pace,
                )
        if got.offset < layer.size:
            raise RegistryUnreachableError(f"blob {layer.digest}: connection closed at byte {got.offset}")

    def resume_from_disk(state: tenacity.RetryCallState) -> None:
        # Every byte in the partial file went through the hash too: resume right after it.
        got.offset = partial.stat().st_size if partial.exists() else 0
        outcome = state.outcome
        _log.info(
            "blob download interrupted; resuming",
            digest=layer.digest,
            offset=got.offset,
            error=str(outcome.exception()) if outcome is not None else "",
        )

    try:
        if got.offset < layer.size:
            async for attempt in retry.retrying(
                attempts=attempts, retry_on=INTERRUPTIONS, before_sleep=resume_from_disk
            ):
                with attempt:
                    await one_request()
    except INTERRUPTIONS as exc:
        raise RegistryUnreachableError(
            f"blob {layer.digest[:19]}: download interrupted {attempts} times, last: {exc}"
        ) from exc
    except DigestMismatchError:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise
    digest = "sha256:" + got.h.hexdigest()
    if digest != layer.digest:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise DigestMismatchError(f"blob {layer.digest}: received content hashes to {digest}; discarded")
    await asyncio.to_thread(fsync_path, partial)


def _resume_point(partial: Path, size: int) -> _Received:
    """What an earlier try left in ``partial``: its length and hash (nothing when it is too long)."""
    try:
        have = partial.stat().st_size
    except FileNotFoundError:
        have = 0
    if not have or have > size:
        return _Received(0, hashlib.sha256())
    return _Received(have, hash_prefix(partial, have))


def source_tag(registry: str, repo: str) -> str:
    """A short, filename-safe name for where a download comes from (keys its lock and partial file)."""
    return hashlib.sha256(f"{registry}/{repo}".encode()).hexdigest()[:16]


class Puller:
    """Fetches models into a :class:`StoreIndex`; the store facade owns pins and calls :meth:`pull_new`.

    ``active`` counts the blobs of pulls in progress (GC spares them); ``budget_bytes()`` and
    ``used_bytes()`` read the facade's budget and usage; ``make_room(need_bytes)`` and ``save()``
    are its GC and index write.
    """

    def __init__(
        self,
        index: StoreIndex,
        *,
        budget_bytes: Callable[[], int],
        used_bytes: Callable[[], int],
        make_room: Callable[[int], Awaitable[object]],
        save: Callable[[], Awaitable[None]],
        max_parallel: int,
        attempts: int,
        fast: bool,
        limits: TransferLimits = DEFAULT_LIMITS,
        keep_archives: bool = False,
    ) -> None:
        self.index = index
        self.budget_bytes = budget_bytes
        self.used_bytes = used_bytes
        self.make_room = make_room
        self.save = save
        self.max_parallel = max_parallel
        self.attempts = attempts
        self.fast = fast
        self.limits = limits
        self.keep_archives = keep_archives
        self.active: Counter[str] = Counter()
        self.blob_gets = 0  # blob requests made (observability and tests)
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def pull_new(
        self,
        client: RegistryClient,
        r: Reference,
        manifest: Manifest,
        tracker: Tracker,
        peers: PeerSource | None = None,
    ) -> ModelRecord:
        """Download what is missing and materialize the model; returns its (saved) record.

        With ``peers``, each missing blob is asked of the fleet first (:meth:`PeerSource.obtain`).
        """
        digest = manifest.digest
        layout = read_layout(manifest.data)
        blobs = blob_list(layout)
        layers = list({e.layer.digest: e.layer for e in layout.entries}.values())
        total = sum(layer.size for layer in layers)
        extracted_estimate = sum(e.layer.size for e in layout.entries if e.archive)
        budget = self.budget_bytes()
        if total + extracted_estimate > budget:
            raise StoreFullError(
                f"{r}: needs {total + extracted_estimate} bytes, more than the store budget of {budget}"
            )
        self.active.update(blobs)
        try:
            missing = [layer for layer in layers if layer.digest not in self.index.blobs]
            await self.make_room(
                sum(layer.size for layer in missing) + extracted_estimate + layout.config.size
            )
            tracker.start(digest, total, len(layers))
            tracker.add(total - sum(layer.size for layer in missing))
            await self._ensure_small(client, r.repository, layout.config)
            sem = asyncio.Semaphore(self.max_parallel)
            try:
                async with asyncio.TaskGroup() as tg:
                    for layer in missing:
                        tg.create_task(self._ensure_blob(client, r.repository, layer, tracker, sem, peers))
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            async with self.lock("materialize:" + digest):  # local work only: no network inside
                record = self.index.models.get(digest)
                if record is not None and self.index.model_path(digest).is_dir():
                    return record  # a pull of the same manifest from another source built it
                tracker.set_phase("materializing")
                files, extracted = await self._materialize(layout, digest, extracted_estimate)
                await asyncio.to_thread(atomic_write, self.index.manifest_path(digest), manifest.raw)
                kept = blobs if self.keep_archives else stored_blobs(layout)
                record = ModelRecord(
                    reference=str(r),
                    layout=layout.name,
                    format=layout.format_with(p for p, _ in files),
                    blobs=kept,
                    files=sorted(files),
                    blob_bytes=sum(self.index.blobs[b] for b in kept),
                    extracted_bytes=extracted,
                    last_used=time.time(),
                )
                self.index.models[digest] = record
                await self.save()
                await self._drop_archives([b for b in blobs if b not in kept])
        finally:
            self.active.subtract(blobs)
            self.active += Counter()  # drop zero counts
        return record

    async def _materialize(
        self, layout: Layout, digest: str, estimate: int
    ) -> tuple[list[tuple[str, int]], int]:
        """The model directory, archives limited to the room left in the budget (uncompressed).

        Room was made for the archives' compressed size; one that expands further gets one more
        try after GC makes room for twice that, so a near-full store evicts what a real archive
        needs while a compression bomb still stops at a bounded size (and evicts little).
        """
        budget = self.budget_bytes()
        limit = max(0, budget - self.used_bytes())
        try:
            return await self._build(layout, digest, limit)
        except StoreFullError:
            if limit >= 2 * estimate:
                raise
        await self.make_room(2 * estimate)
        return await self._build(layout, digest, max(0, budget - self.used_bytes()))

    async def _build(self, layout: Layout, digest: str, limit: int) -> tuple[list[tuple[str, int]], int]:
        path = self.index.model_path(digest)
        return await asyncio.to_thread(materialize, layout, self.index.blob_path, path, extract_limit=limit)

    async def _ensure_small(self, client: RegistryClient, repo: str, layer: Layer) -> None:
        if layer.digest in self.index.blobs:
            return
        tag = source_tag(client.registry, repo)
        async with self.lock(f"blob:{tag}:{layer.digest}"):
            if layer.digest in self.index.blobs:
                return
            data = await client.get_blob(repo, layer.digest, limit=CONFIG_LIMIT)
            tmp = await asyncio.to_thread(self.index.write_small, layer.digest, data, tag)
            await self._commit(layer.digest, tmp)

    async def _ensure_blob(
        self,
        client: RegistryClient,
        repo: str,
        layer: Layer,
        tracker: Tracker,
        sem: asyncio.Semaphore,
        peers: PeerSource | None = None,
    ) -> None:
        tag = source_tag(client.registry, repo)
        async with sem, self.lock(f"blob:{tag}:{layer.digest}"):
            if layer.digest in self.index.blobs:  # fetched meanwhile, from this source or another
                tracker.add(layer.size)
            else:
                partial = self.index.tmp_dir / f"{hex_of(layer.digest)}.{tag}.partial"

                async def from_registry(on_bytes: Callable[[int], None]) -> None:
                    await download(
                        client,
                        repo,
                        layer,
                        partial,
                        on_bytes,
                        attempts=self.attempts,
                        fast=self.fast,
                        on_request=self._count_get,
                        limits=self.limits,
                    )

                if peers is None:
                    await from_registry(tracker.add)
                else:  # peer bytes go to their own partial file: never mixed with a registry's
                    from_peers = self.index.tmp_dir / f"{hex_of(layer.digest)}.{tag}-peers.partial"
                    source = await peers.obtain(
                        layer.digest, layer.size, from_peers, tracker.add, from_registry
                    )
                    partial = from_peers if source == "peers" else partial
                try:
                    await self._commit(layer.digest, partial)
                finally:
                    if peers is not None:
                        peers.claims.release(layer.digest)  # held until the blob is servable
        tracker.layer_done()

    def _count_get(self) -> None:
        self.blob_gets += 1

    async def _drop_archives(self, digests: list[str]) -> None:
        """Tar layers live on as the files extracted from them (stored once): their blobs go, unless
        another model keeps the blob or another pull in flight still needs it. The record was saved
        first, so a crash in between leaves only an unreferenced blob for GC."""
        held = {b for rec in self.index.models.values() for b in rec.blobs}
        gone = [d for d in digests if d not in held and self.active[d] <= 1 and d in self.index.blobs]
        for d in gone:
            self.index.blobs.pop(d, None)
        if gone:
            await asyncio.to_thread(self.index.delete, [], gone, [])
            _log.info("archive layers kept only as their files", blobs=len(gone))

    async def _commit(self, digest: str, tmp: Path) -> None:
        if digest in self.index.blobs:  # another source finished first: same bytes, keep theirs
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            return
        self.index.blobs[digest] = await asyncio.to_thread(self.index.commit_blob, digest, tmp)


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real failure of a task group (not the cancellations it caused)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
