"""Pulling one model into the store: missing blobs fetched (verified, resumable), then materialized.

One blob is :func:`orchardist.oci.download.download` (a partial file, resumed with Range after
a cut, verified and fsynced). :class:`Puller` runs a whole model: room made by GC first, the
config, then the layers a few at a time (each blob fetched once however many pulls want it), then
the model directory. Disk work runs in threads so the event loop keeps serving other pulls and
the agent meanwhile.

Downloads are keyed by where the bytes come from (registry, repository, digest): a pull from a
slow or hostile registry never holds up a pull of the same digest from another one, and the two
never share a partial file. Once verified, a blob is shared by everything that names its digest
(its bytes hash to that digest, whoever served them), and whoever finishes first wins; the
model directory is built once per manifest digest under a lock that covers only local work.

A tar layer the store would drop once the model is built (no ``keep_archives``, not also a raw
file) is unpacked while it downloads instead
(:mod:`orchardist.oci.unpack`): the model is on disk once during the pull too, not blob plus
files. Such a layer comes from the registry even when the pull has peers: no Mac keeps its blob,
so none could serve it (``keep_archives`` keeps tar blobs, and with it peers serve them too). It
does not resume mid-stream; a cut one starts over from byte 0. Its directory
is shared like a blob by the pulls in flight that need it, linked into each model, and removed
when the last of them ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchardist import log
from orchardist.oci.client import CONFIG_LIMIT, Manifest, RegistryClient
from orchardist.oci.download import download
from orchardist.oci.errors import StoreFullError
from orchardist.oci.fsutil import atomic_write, remove_trees
from orchardist.oci.index import ModelRecord, StoreIndex, blob_list, hex_of, stored_blobs, unpackable
from orchardist.oci.layouts import Layer, Layout, read_layout
from orchardist.oci.materialize import materialize
from orchardist.oci.peers import PeerSource
from orchardist.oci.progress import Tracker
from orchardist.oci.reference import Reference
from orchardist.oci.transfer import DEFAULT_LIMITS, TransferLimits
from orchardist.oci.unpack import Allowance, Unpacked, fetch_unpacked

_log = log.get(__name__)


@dataclass
class _Unpacking:
    """What the tar layers one pull unpacks on the way share: the room, widened at most once."""

    allowance: Allowance
    estimate: int  # the layers' compressed bytes: GC makes room for twice this, no more
    raw: list[Layer]  # the pull's other downloads (their bytes are not in the room)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
        # tar layers unpacked for pulls in flight, by digest and archive kind (the same bytes read
        # as another kind are other files)
        self.unpacked: dict[tuple[str, str], Unpacked] = {}
        self.allowances: set[Allowance] = set()  # their pulls' room: bytes still arriving count
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
        kinds = unpackable(layout)
        # Without keep_archives no Mac keeps a tar blob, so peers could not serve one (and a claim
        # on it would only make the others wait): such layers stream from the registry.
        streams = {} if self.keep_archives else kinds
        extracted_estimate = sum(e.layer.size for e in layout.entries if e.archive)
        need = total - sum(layer.size for layer in layers if layer.digest in streams) + extracted_estimate
        budget = self.budget_bytes()
        if need > budget:
            raise StoreFullError(f"{r}: needs {need} bytes, more than the store budget of {budget}")
        self.active.update(blobs)
        unpacking: _Unpacking | None = None
        try:
            missing = [
                layer
                for layer in layers
                if layer.digest not in self.index.blobs
                and (layer.digest, kinds.get(layer.digest)) not in self.unpacked
            ]
            raw = [layer for layer in missing if layer.digest not in streams]
            await self.make_room(sum(layer.size for layer in raw) + extracted_estimate + layout.config.size)
            tracker.start(digest, total, len(layers))
            tracker.add(total - sum(layer.size for layer in missing))
            await self._ensure_small(client, r.repository, layout.config)
            unpacking = _Unpacking(
                Allowance(self._room(raw)), sum(x.size for x in missing if x.digest in streams), raw
            )
            self.allowances.add(unpacking.allowance)
            sem = asyncio.Semaphore(self.max_parallel)
            try:
                async with asyncio.TaskGroup() as tg:
                    for layer in missing:
                        if layer.digest in streams:
                            job = self._ensure_unpacked(
                                client, r.repository, layer, streams[layer.digest], tracker, sem, unpacking
                            )
                        else:
                            job = self._ensure_blob(client, r.repository, layer, tracker, sem, peers)
                        tg.create_task(job)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            async with self.lock("materialize:" + digest):  # local work only: no network inside
                record = self.index.models.get(digest)
                if record is not None and self.index.model_path(digest).is_dir():
                    return record  # a pull of the same manifest from another source built it
                tracker.set_phase("materializing")
                files, extracted = await self._materialize(layout, digest)
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
            if unpacking is not None:
                self.allowances.discard(unpacking.allowance)
            await self._drop_unpacked(blobs)
            self.active.subtract(blobs)
            self.active += Counter()  # drop zero counts
        return record

    def unpacked_bytes(self) -> int:
        """Disk used by tar layers unpacked for pulls in flight: done, and still arriving."""
        return sum(u.size for u in self.unpacked.values()) + sum(a.staged for a in self.allowances)

    def _room(self, raw: list[Layer]) -> int:
        """Room for uncompressed bytes: the budget less what is used and the downloads to come."""
        to_come = sum(layer.size for layer in raw if layer.digest not in self.index.blobs)
        return self.budget_bytes() - self.used_bytes() - to_come

    async def _materialize(self, layout: Layout, digest: str) -> tuple[list[tuple[str, int]], int]:
        """The model directory, archives limited to the room left in the budget (uncompressed).

        Room was made for the archives' compressed size; one that expands further gets one more
        try after GC makes room for twice that, so a near-full store evicts what a real archive
        needs while a compression bomb still stops at a bounded size (and evicts little). Layers
        unpacked on the way were counted then (:meth:`_unpack_with_room`) and are only linked.
        """
        unpacked = {
            e.layer.digest: self.unpacked[(e.layer.digest, e.archive)]
            for e in layout.entries
            if e.archive and (e.layer.digest, e.archive) in self.unpacked
        }
        estimate = sum(e.layer.size for e in layout.entries if e.archive and e.layer.digest not in unpacked)
        budget = self.budget_bytes()
        limit = max(0, budget - self.used_bytes())
        try:
            return await self._build(layout, digest, limit, unpacked)
        except StoreFullError:
            if limit >= 2 * estimate:
                raise
        await self.make_room(2 * estimate)
        return await self._build(layout, digest, max(0, budget - self.used_bytes()), unpacked)

    async def _build(
        self, layout: Layout, digest: str, limit: int, unpacked: dict[str, Unpacked]
    ) -> tuple[list[tuple[str, int]], int]:
        path = self.index.model_path(digest)
        return await asyncio.to_thread(
            materialize, layout, self.index.blob_path, path, extract_limit=limit, unpacked=unpacked
        )

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

    async def _ensure_unpacked(
        self,
        client: RegistryClient,
        repo: str,
        layer: Layer,
        archive: str,
        tracker: Tracker,
        sem: asyncio.Semaphore,
        unpacking: _Unpacking,
    ) -> None:
        """A tar layer unpacked while it downloads; shared with other pulls like a blob."""
        tag = source_tag(client.registry, repo)
        async with sem, self.lock(f"blob:{tag}:{layer.digest}"):
            if (layer.digest, archive) in self.unpacked or layer.digest in self.index.blobs:  # meanwhile
                tracker.add(layer.size)
            else:
                got = await self._unpack_with_room(client, repo, layer, archive, tracker, unpacking)
                if (layer.digest, archive) in self.unpacked:  # another source was first: same files
                    await asyncio.to_thread(remove_trees, [got.path])
                else:
                    self.unpacked[(layer.digest, archive)] = got
        tracker.layer_done()

    async def _unpack_with_room(
        self,
        client: RegistryClient,
        repo: str,
        layer: Layer,
        archive: str,
        tracker: Tracker,
        unpacking: _Unpacking,
    ) -> Unpacked:
        """Within the pull's allowance; past it, the rule of :meth:`_materialize`: one more try
        (from byte 0) once GC made room for twice the layers' compressed size, unless that much
        room was there from the start (then it is a bomb)."""
        wider = False
        while True:
            try:
                return await fetch_unpacked(
                    client,
                    repo,
                    layer,
                    archive,
                    self.index.layers_dir,
                    unpacking.allowance,
                    tracker.add,
                    attempts=self.attempts,
                    fast=self.fast,
                    on_request=self._count_get,
                    limits=self.limits,
                )
            except StoreFullError:
                if wider:
                    raise
                async with unpacking.lock:
                    if not unpacking.allowance.widened:
                        if unpacking.allowance.room >= 2 * unpacking.estimate:
                            raise
                        await self.make_room(2 * unpacking.estimate)
                        unpacking.allowance.widen(self._room(unpacking.raw))
                wider = True
                _log.info("layer expands past the room left; trying again after GC", digest=layer.digest)

    async def _drop_unpacked(self, digests: list[str]) -> None:
        """Unpacked layers live on as the model's files (linked): each directory goes when the last
        pull in flight that needs it ends, built or failed (a failed one starts them over)."""
        gone = [
            self.unpacked.pop(k).path
            for k in list(self.unpacked)
            if k[0] in digests and self.active[k[0]] <= 1
        ]
        if gone:  # one thread call: it finishes even if this pull is being cancelled
            await asyncio.to_thread(remove_trees, gone)

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


__all__ = ["Puller", "download", "first_error", "source_tag"]  # download: for peers' one-holder path
