"""Watch the ModelReplicas bound to this Mac and converge each one (the agent's "kubelet" loop).

One queue, one consumer: watch deliveries, engine changes, pull progress and a slow tick all land
in the queue, and each replica is converged by the pure ``reconcile.decide`` + ``status_patch``.
Side effects go to adapters: the API server (:class:`orchardist.kube.Kube`, the shared informer
and Event writer), the content store (:mod:`.pulls`, pins) and the engine supervisor
(:mod:`.engine_adapter`). The watch narrows to ``spec.nodeName=<node>`` on the server (the CRD
lists the field in ``selectableFields``).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from orchardist import log
from orchardist.api.projection import node_namespace, projected_secret
from orchardist.kube import Kube, paths
from orchardist.kube.events import EventRecorder
from orchardist.kube.informer import RELIST, Delivery, Informer, to_queue
from orchardist.oci.auth import Credentials
from orchardist.oci.peering import Claims
from orchardist.oci.peers import PeerSource
from orchardist.oci.store import ContentStore

from .engine_adapter import EngineAdapter
from .peer_auth import TokenReviewer
from .peer_identity import PeerToken, discover
from .peer_server import PeerServer
from .peers import FleetPeers, hint_of
from .pulls import Pulls, default_budget
from .reconcile import Act, Observed, ReplicaView, condition_events, decide, free_bytes, now_iso, status_patch
from .replica_cache import ReplicaCache, gone_view, status_json, view_of

if TYPE_CHECKING:
    from orchardist.api.modelreplica import ModelReplica

    from .config import AgentConfig
    from .node import NodeAgent

LOG = log.get(__name__)

#: Every replica is looked at again this often even without events (pull retries, engine states
#: the supervisor reports without a notification).
TICK_S = 5.0

#: How long the loop waits for peer transfer's set-up before it starts watching replicas.
PEERS_SETUP_S = 10.0

Key = tuple[str, str]


class ReplicaLoop:
    """Converges every ModelReplica bound to this node; owns the node's memory reservations."""

    def __init__(
        self,
        kube: Kube,
        node: NodeAgent,
        cfg: AgentConfig,
        address: str,
        store: ContentStore,
        engines: EngineAdapter,
        fleet: FleetPeers | None = None,
    ) -> None:
        self.kube = kube
        self.node = node
        self.cfg = cfg
        self.address = address
        self.store = store
        self.engines = engines
        self.cache = ReplicaCache()
        self.reservations: dict[Key, int] = {}
        self.pinned: dict[Key, str] = {}  # the digest each replica holds a store pin on
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.fleet = fleet
        self.peer_server: PeerServer | None = None
        self.pulls = Pulls(
            store,
            self._notify("progress"),
            self._pin,
            self._publish_cache,
            peers=self._peers,
        )
        self.events = EventRecorder(
            kube, "orchardist-agent", host=node.name, reporting_controller="orchardist.io/agent"
        )
        self.informer: Informer | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._peering: asyncio.Task[None] | None = None

    @classmethod
    def create(cls, kube: Kube, node: NodeAgent, cfg: AgentConfig, address: str) -> ReplicaLoop:
        budget = cfg.store_budget if cfg.store_budget is not None else default_budget(cfg.store)
        store = ContentStore(cfg.store, budget)
        return cls(kube, node, cfg, address, store, EngineAdapter(cfg, listen=address))

    def _peers(self, key: Key) -> PeerSource | None:
        obj = self.cache.objects.get(key)
        if self.fleet is None or obj is None:
            return None
        return self.fleet.source(hint_of(obj.metadata))

    async def serve_peers(self, stop: asyncio.Event) -> None:
        """Peer transfer under this Mac's node identity: serve verified blobs to the fleet's agents
        and keep a peer token for pulls (renewed in the background). Off (said once) with
        ``--peer-port 0`` or credentials that are not this node's agent ServiceAccount; a port in
        use leaves pulls working alone."""
        port = self.cfg.peer_port
        if not port:
            LOG.info("peer transfer off", reason="--peer-port 0")
            return
        identity = await discover(self.kube, self.node.name, stop)
        if identity is None:
            return
        token = PeerToken(self.kube, identity)
        try:
            await token.mint()
        except Exception as exc:  # the renewal loop retries; pulls use registries meanwhile
            LOG.warning("cannot mint the peer token yet", error=str(exc) or repr(exc))
        fleet = FleetPeers(self.node.name, port, token.current, Claims(), self.address)
        verify = TokenReviewer(self.kube, identity.namespace)
        held = lambda d: self.store.index.blobs.get(d)  # noqa: E731  (the index is read at each request)
        server = PeerServer(verify, self.store.blob_path, held, fleet.claims)
        try:
            await server.start(self.cfg.bind_address or self.address, port)
            self.peer_server = server
        except OSError as exc:
            LOG.warning("cannot serve blobs to peers", port=port, error=str(exc))
        self.fleet = fleet
        renew = asyncio.create_task(token.run(stop), name="peer-token")
        self._background.add(renew)
        renew.add_done_callback(self._background.discard)

    def _notify(self, kind: str) -> Callable[[Key], None]:
        def put(key: Key) -> None:
            self.queue.put_nowait((kind, key))

        return put

    def watch(self, resource_version: str | None = None) -> Informer:
        """Start the informer thread that feeds the queue (list, then watch this node's replicas)."""
        informer = Informer(
            self.kube.raw,
            paths.modelreplica(),
            to_queue(asyncio.get_running_loop(), self.queue),
            query={"fieldSelector": f"spec.nodeName={self.node.name}"},
            name="replica-watch",
        )
        informer.start(resource_version)
        self.informer = informer
        return informer

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def engine_changed(key: Key) -> None:  # from the supervisor, maybe off the loop's thread
            loop.call_soon_threadsafe(self.queue.put_nowait, ("engine", key))

        await self.engines.start(engine_changed)
        # Peers are set up before the first replica arrives, unless the API server is slow to say
        # who this agent is: then beside the loop (pulls meanwhile use registries).
        self._peering = asyncio.create_task(self.serve_peers(stop), name="peers")
        await asyncio.wait({self._peering}, timeout=PEERS_SETUP_S)
        self._publish_cache()
        self.watch()
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopper}, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    if not stop.is_set():
                        await self.converge_all()
                    continue
                try:
                    await self.handle(getter.result())
                except Exception as exc:  # one bad event must not end the loop
                    LOG.exception("replica event failed", error=repr(exc))
        finally:
            stopper.cancel()
            if self.informer is not None:
                self.informer.stop()

    async def handle(self, item: Delivery) -> None:
        kind, payload = item
        if kind == RELIST:
            for key in self.cache.relist(payload):
                await self.converge(key, gone=True)
            await self._forget_orphans()
            await self.converge_all()
        elif kind in ("ADDED", "MODIFIED"):
            await self.converge(self.cache.update(payload))
        elif kind == "DELETED":
            key, last = self.cache.delete(payload)
            await self.converge(key, gone=True, last=last)
        elif kind in ("engine", "progress") and self._tracked(payload):
            await self.converge(payload)

    def _tracked(self, key: Key) -> bool:
        return key in self.cache.objects or key in self.reservations

    async def converge_all(self) -> None:
        # Replicas whose engine already runs first (adopted after a restart: they hold their
        # memory), then the oldest first, so admission is first come, first served.
        objects = self.cache.objects
        order = sorted(
            objects,
            key=lambda k: (
                self.engines.view(k) is None,
                str(objects[k].metadata.get("creationTimestamp", "")),
            ),
        )
        for key in order:
            await self.converge(key)

    async def _forget_orphans(self) -> None:
        """Engines recorded for replicas that no longer exist (deleted while the agent was away)."""
        for key in list(self.engines.keys()):
            if key not in self.cache.objects:
                LOG.info("stopping the engine of a vanished replica", replica="/".join(key))
                await self.engines.stop(key)
                self._unpin(key)
                self.reservations.pop(key, None)
        self._publish_memory()

    # -- one replica ------------------------------------------------------------------------

    def observe(self, replica: ReplicaView) -> Observed:
        key = replica.key
        cached = bool(replica.digest) and self.store.get(replica.digest) is not None
        return Observed(
            free_bytes=free_bytes(self.node.working_set(), self.reservations, key),
            reserved=key in self.reservations,
            cached=cached,
            pull=None if cached else self.pulls.view(key, time.monotonic()),
            engine=self.engines.view(key),
            engine_installed=self.engines.installed(replica.engine, replica.engine_version),
            address=self.address,
        )

    async def converge(self, key: Key, *, gone: bool = False, last: ModelReplica | None = None) -> None:
        obj = self.cache.objects.get(key)
        if obj is None and not gone:
            return
        known = obj if obj is not None else last
        view = view_of(known, deleting=gone) if known is not None else gone_view(key)
        try:
            acts = decide(view, self.observe(view))
            if not gone and Act.START not in acts and self.engines.unexposed(key):
                acts = (*acts, Act.START)  # an adopted engine: the START re-opens its proxy
            for act in acts:
                await self._act(act, view)
            if gone or obj is None:
                return
            await self._patch_status(view, obj, self.observe(view))
        except Exception as exc:
            LOG.exception("converge failed", replica=f"{key[0]}/{key[1]}", error=repr(exc))

    async def _patch_status(self, view: ReplicaView, obj: ModelReplica, observed: Observed) -> None:
        current = status_json(obj)
        due = self.pulls.take_progress_due(view.key)
        patch = status_patch(view, observed, current, now_iso(), with_progress=due)
        if not patch:
            return
        path = paths.modelreplica(view.namespace, view.name, status=True)
        updated = await self.kube.patch_existing(path, {"status": patch})
        if updated is None:
            return  # deleted meanwhile; the watch says so next
        self.cache.wrote(updated)
        if "phase" in patch:
            LOG.info("replica status", replica=f"{view.namespace}/{view.name}", phase=patch["phase"])
        for kind, reason, message in condition_events(current.get("conditions"), patch.get("conditions")):
            self._spawn(self.events.record(updated, kind, reason, message))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _act(self, act: Act, view: ReplicaView) -> None:
        key = view.key
        if act is Act.RESERVE:
            self.reservations[key] = view.reserved_bytes
            if view.digest and self.store.get(view.digest) is not None:
                self._pin(key, view.digest)  # an adopted engine's model: pins do not survive a restart
            self._publish_memory()
        elif act is Act.PULL:
            self.pulls.start(view, lambda: self._pull_auth(view))
        elif act is Act.START:
            model = self.store.get(view.digest)
            obj = self.cache.objects.get(key)
            if model is None or obj is None:
                return  # evicted or deleted meanwhile: the next pass sees it
            self._pin(key, view.digest)
            api_key = await self._api_key(view)
            await self.engines.ensure(key, obj.spec, model.path, api_key, port=public_port(obj))
            LOG.info("engine started", replica=f"{key[0]}/{key[1]}", engine=view.engine)
        elif act is Act.STOP:
            await self.engines.stop(key)
            LOG.info("engine stopped", replica=f"{key[0]}/{key[1]}")
        elif act in (Act.RELEASE, Act.FORGET):
            self.pulls.forget(key)
            self._unpin(key)
            self.reservations.pop(key, None)
            self._publish_memory()

    def _pin(self, key: Key, digest: str) -> None:
        if self.pinned.get(key) == digest:
            return
        self._unpin(key)
        self.store.pin(digest)
        self.pinned[key] = digest

    def _unpin(self, key: Key) -> None:
        digest = self.pinned.pop(key, None)
        if digest is not None:
            self.store.unpin(digest)

    def _publish_cache(self) -> None:
        cached = [{"digest": d, "sizeBytes": n} for d, n in self.store.cached()]
        usage = self.store.usage()
        self.node.set_store(used=usage.used_bytes, free=usage.free_bytes, budget=usage.budget_bytes)
        self.node.state.cached_models = cached
        self.node.changed()

    def _publish_memory(self) -> None:
        total = sum(self.reservations.values())
        if self.node.state.allocated_bytes != total:
            self.node.state.allocated_bytes = total
            self.node.changed()

    # -- Secrets -----------------------------------------------------------------------------

    async def _secret_data(self, namespace: str, name: str) -> dict[str, str]:
        # The agent may read only the copies the controller projects for this node.
        where = node_namespace(self.node.name), projected_secret(namespace, name)
        secret = await self.kube.get(paths.secret(*where))
        if secret is None:
            raise LookupError(f"Secret {namespace}/{name} not found (projected as {'/'.join(where)})")
        return dict(secret.get("data") or {})

    async def _pull_auth(self, view: ReplicaView) -> Credentials | None:
        if not view.pull_secret:
            return None
        from orchardist.oci import auth, reference

        data = await self._secret_data(view.namespace, view.pull_secret)
        return auth.from_secret_data(data, reference.parse(view.model))

    async def _api_key(self, view: ReplicaView) -> str | None:
        if view.api_key_secret is None:
            return None
        name, item = view.api_key_secret
        raw = (await self._secret_data(view.namespace, name)).get(item)
        return base64.b64decode(raw).decode() if raw else None

    async def shutdown(self, *, stop_engines: bool) -> None:
        if self.informer is not None:
            self.informer.stop()
        self.pulls.cancel_all()
        for task in list(self._background):  # Events being written, the peer token's renewal
            task.cancel()
        if self._peering is not None:
            self._peering.cancel()
        if self.peer_server is not None:
            await self.peer_server.close()
        await self.engines.close(stop_engines=stop_engines)


def public_port(obj: ModelReplica) -> int | None:
    """The port of the replica's reported endpoint (``address:port``), kept across agent restarts."""
    _, sep, port = str(status_json(obj).get("endpoint") or "").rpartition(":")
    return int(port) if sep and port.isdigit() else None
