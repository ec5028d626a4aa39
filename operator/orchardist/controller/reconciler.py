"""Runs reconciles: gathers what is (kopf's indexes + a few reads), decides purely, acts via kube.py.

One reconcile per deployment at a time; triggers that arrive while one waits join it (a burst of
replica status changes costs one reconcile, not one each). Placement across deployments is
serialised by one lock so two deployments never book the same free memory, and replicas this
process created or deleted are remembered until the watch shows them (an "assume" overlay, as
kube-scheduler has), so a reconcile right after another never double-books or double-creates.
Deterministic replica names make a forgotten overlay harmless: a second create is a 409.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

import kopf

from orchardist import log
from orchardist.api.constants import API_VERSION, MODEL_DEPLOYMENT
from orchardist.api.macnode import MacNode
from orchardist.api.modeldeployment import ModelDeployment, ModelDeploymentStatus, Scaling
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller import autoscale, live, plan, world
from orchardist.controller import status as st
from orchardist.controller.activity import Activity
from orchardist.controller.kube import Adapter, ServiceConflictError
from orchardist.controller.metrics import ControllerMetrics
from orchardist.controller.pinning import Pins
from orchardist.controller.scheduler import Mac
from orchardist.controller.world import RE_RESOLVE, Refused
from orchardist.kube import paths
from orchardist.kube.events import EventRecorder, one_line

LOG = log.get(__name__)
WRITE_MEMORY = 2.0  # seconds our own status/Service/slice writes stand in for the (lagging) watch
Key = tuple[str, str]
JSON = dict[str, Any]
V = TypeVar("V", covariant=True)
Deployment = ModelDeployment | Refused


class Store(Protocol[V]):
    """What kopf's ``Index`` offers: key -> a collection of values."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def __iter__(self) -> Any: ...
    def items(self) -> Iterable[tuple[Any, Iterable[V]]]: ...


class DemandSource(Protocol):
    """What :class:`orchardist.controller.demand.DemandWatch` offers: a deployment's demand per
    gateway Lease (None: unknown), and the deletion of the Leases that expired."""

    def get(self, namespace: str, name: str) -> Sequence[autoscale.Demand] | None: ...
    async def sweep(self, namespace: str, name: str, scaling: Scaling | None, now: datetime) -> None: ...


@dataclass
class Config:
    lease_grace: float = 40.0
    resolve_timeout: float = 60.0


@dataclass
class _Pending:
    future: asyncio.Future[None]
    force: bool = False


@dataclass
class Controller:
    """Operator-wide state of the controller (lives in kopf's memo)."""

    adapter: Adapter
    config: Config = field(default_factory=Config)
    deployments: Store[Deployment] | None = None  # (namespace, name) -> the deployment
    replicas: Store[ModelReplica] | None = None  # (namespace, deployment) -> its replicas
    macnodes: Store[MacNode] | None = None  # name -> the MacNode
    leases: Store[datetime | None] | None = None  # node name -> when its Lease was last renewed
    services: Store[JSON] | None = None  # (namespace, name) -> our Services
    slices: Store[JSON] | None = None  # (namespace, service name) -> our EndpointSlices
    demand: DemandSource | None = None  # the gateway's demand per deployment (None: never known)
    recorder: EventRecorder | None = None  # Events outside kopf's handlers (see _post)
    activity: Activity | None = None  # whether this operator is its peering's active one (None: always)
    metrics: ControllerMetrics | None = None  # reconciles and placements counted (metrics.py)
    assumed: dict[Key, dict[str, ModelReplica]] = field(default_factory=dict)  # (ns, deployment) -> name ->
    forgotten: set[Key] = field(default_factory=set)  # (ns, replica name) deleted by us
    phases: dict[str, str | None] = field(default_factory=dict)  # replica uid -> last phase seen
    verified: set[Key] = field(default_factory=set)  # deployments read live since the last relist
    phantoms: set[str] = field(default_factory=set)  # uids the index holds but a live list did not
    renewals: dict[str, datetime | None] = field(default_factory=dict)  # Leases read live after a pause
    _written: dict[Key, tuple[float, JSON | None, list[JSON]]] = field(default_factory=dict)
    _status_written: dict[Key, tuple[float, ModelDeploymentStatus]] = field(default_factory=dict)
    place_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    _pending: dict[Key, _Pending] = field(default_factory=dict)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    pins: Pins = field(init=False)

    def __post_init__(self) -> None:
        self.pins = Pins(self._secret_data, self.config.resolve_timeout)

    async def _secret_data(self, namespace: str, name: str) -> dict[str, str]:
        return await self.adapter.secret_data(namespace, name)

    # -- triggering ---------------------------------------------------------------------------

    async def trigger(
        self, namespace: str, name: str, body: Mapping[str, Any] | None = None, *, force_resolve: bool = False
    ) -> None:
        """Reconcile ``namespace/name`` soon; joins a reconcile that is queued but not started yet.
        Nothing while this operator stands by (a trigger from outside kopf, the demand watch)."""
        if self.activity is not None and not self.activity.active:
            return
        key = (namespace, name)
        pending = self._pending.get(key)
        if pending is not None:
            pending.force |= force_resolve
            await asyncio.shield(pending.future)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        mine = self._pending[key] = _Pending(future, force_resolve)
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                if self._pending.get(key) is mine:
                    del self._pending[key]
                began = time.monotonic()
                try:
                    await self._reconcile(namespace, name, body, mine.force)
                except BaseException as exc:
                    if self.metrics is not None and isinstance(exc, Exception):  # not a cancellation
                        self.metrics.reconciled(False, time.monotonic() - began)
                    if not future.done():
                        future.set_exception(exc)
                    raise
                if self.metrics is not None:
                    self.metrics.reconciled(True, time.monotonic() - began)
                if not future.done():
                    future.set_result(None)
        finally:
            if self._pending.get(key) is mine:
                del self._pending[key]

    # -- one reconcile -------------------------------------------------------------------------

    def _deployment(self, namespace: str, name: str, fallback: Mapping[str, Any] | None) -> Deployment | None:
        """The deployment from the index (parsed once per event), else the body a handler passed."""
        if self.deployments is not None:
            for entry in self.deployments.get((namespace, name), ()):
                return cast(Deployment, entry)
        return None if fallback is None else world.parse_deployment(fallback)

    async def _reconcile(
        self, namespace: str, name: str, fallback: Mapping[str, Any] | None, force: bool
    ) -> None:
        md = self._deployment(namespace, name, fallback)
        if isinstance(md, Refused):
            if not md.deleting:
                await self._refused(md)
            return
        if md is None or md.metadata.get("deletionTimestamp"):
            return  # gone or going: ownerReferences let the garbage collector remove the rest
        meta = md.metadata
        uid = str(meta.get("uid"))
        annotations = meta.get("annotations") or {}
        re_resolve = force or RE_RESOLVE in annotations
        current = self._status_of(namespace, name, md)
        pin, error = await self.pins.pin(namespace, md, current, re_resolve)
        svc_name = md.spec.service.name or name
        service, slices = await self._exposure(namespace, svc_name)
        # Placement reads and books the shared free memory: one deployment at a time, until the
        # new replicas exist (and are assumed); the rest of the plan touches only this deployment.
        async with self.place_lock:
            now = self.clock()
            everything = self._all_replicas()
            mine = [world.replica_from(r) for r in everything if world.belongs_to(r, namespace, name)]
            scaled = self._autoscale(namespace, name, md, current, sum(r.ready for r in mine), now)
            obs = world.Observed(
                name=name,
                namespace=namespace,
                uid=uid,
                generation=int(meta.get("generation") or 0),
                spec=md.spec,
                status=current,
                replicas=mine,
                macs=self._macs(now, everything),
                pin=pin,
                now=st.rfc3339(now),
                resolve_error=error,
                service=service,
                slices=slices,
            )
            decided = plan.decide(obs, scaled)
            if not decided.empty or decided.events or (namespace, name) not in self.verified:
                # Act only on what is: the watch may lag, or have missed deletions while this
                # process stood by (a takeover), so the deployment and its replicas are read live.
                live = await self._live(namespace, name, obs.generation)
                if live is None:
                    return  # gone, or a newer spec whose own event reconciles it
                current, live_replicas = live
                everything = [r for r in everything if not world.belongs_to(r, namespace, name)]
                everything += live_replicas
                mine = [world.replica_from(r) for r in live_replicas]
                scaled = self._autoscale(namespace, name, md, current, sum(r.ready for r in mine), now)
                obs = dataclasses.replace(
                    obs, status=current, replicas=mine, macs=self._macs(now, everything)
                )
                decided = plan.decide(obs, scaled)
                self.verified.add((namespace, name))
            created = await self.adapter.create_replicas(namespace, decided)
            if self.metrics is not None:
                self.metrics.placed(len(created))
            bucket = self.assumed.setdefault((namespace, name), {})
            for c in decided.create:
                if c["metadata"]["name"] in created:
                    bucket[c["metadata"]["name"]] = ModelReplica.model_validate(c)
        if self.demand is not None:
            await self.demand.sweep(namespace, name, md.spec.scaling, now)
        ref = deployment_ref(namespace, name, uid)
        try:
            await self.adapter.finish(namespace, name, uid, decided, service)
        except ServiceConflictError as exc:
            await self._post(ref, "Warning", "ServiceConflict", str(exc))
            raise kopf.TemporaryError(str(exc), delay=30) from exc
        if decided.service is not None or decided.slices or decided.delete_slices:
            written = {s["metadata"]["name"]: s for s in slices}
            written.update({s["metadata"]["name"]: s for s in decided.slices})
            for gone in decided.delete_slices:
                written.pop(gone, None)
            self._written[(namespace, svc_name)] = (
                time.monotonic(),
                decided.service or service,
                list(written.values()),
            )
        for replica, _ in decided.delete:
            bucket.pop(replica, None)
            self.forgotten.add((namespace, replica))
        if decided.status is not None:
            self._status_written[(namespace, name)] = (
                time.monotonic(),
                ModelDeploymentStatus.model_validate(decided.status),
            )
        if pin is not None and RE_RESOLVE in annotations:
            await self.adapter.forget_annotation(namespace, name, RE_RESOLVE)
        for ev in decided.events:
            await self._post(ref, ev.type, ev.reason, ev.message)
        if not decided.empty:
            LOG.info(
                "reconciled",
                namespace=namespace,
                deployment=name,
                created=len(decided.create),
                deleted=len(decided.delete),
                status=decided.status is not None,
            )

    async def _live(
        self, namespace: str, name: str, generation: int
    ) -> tuple[ModelDeploymentStatus, list[ModelReplica]] | None:
        """The deployment's status and replicas read live (see live.py); replicas the index holds
        but the list does not were deleted while the watch was not looking: left out from now on."""
        got = await live.read(
            self.adapter.kube, namespace, name, generation, leases=self._lease_index_may_lag()
        )
        if got is None:
            return None
        self.renewals = got.renewals
        uids = {str(r.metadata.get("uid")) for r in got.replicas}
        names = {str(r.metadata.get("name")) for r in got.replicas}
        if self.replicas is not None:
            for r in self.replicas.get((namespace, name), ()):
                if str(r.metadata.get("uid")) not in uids:
                    self.phantoms.add(str(r.metadata.get("uid")))
        bucket = self.assumed.get((namespace, name), {})
        for gone in [n for n in bucket if n not in names]:
            del bucket[gone]
        return got.status, got.replicas

    def _lease_index_may_lag(self) -> bool:
        """Back from a pause, until a lease grace has passed (every live Mac renewed through the
        watch since), the index may hold renewals from before the pause."""
        a = self.activity
        return a is not None and a.resumes > 1 and a.active_for() < self.config.lease_grace

    def relisted(self) -> None:
        """A watch listed again (start, expiry, or resuming after standing by): what the index holds
        may include objects deleted meanwhile, so each deployment's next reconcile reads live."""
        self.verified.clear()

    def _autoscale(
        self,
        namespace: str,
        name: str,
        md: ModelDeployment,
        current: ModelDeploymentStatus,
        ready: int,
        now: datetime,
    ) -> autoscale.Decision | None:
        """The autoscaler's count with spec.scaling (None without: spec.replicas is the count)."""
        if md.spec.scaling is None:
            return None
        leases = self.demand.get(namespace, name) if self.demand is not None else None
        demand = None if leases is None else autoscale.combine(leases, md.spec.scaling, now)
        return autoscale.decide(md.spec.scaling, md.spec.replicas, current.autoscaling, demand, ready, now)

    async def _post(self, ref: kopf.Body, type_: str, reason: str, message: str) -> None:
        """An Event (one line) through kopf's poster; a reconcile kopf did not start (the demand
        watch's) has no poster in its context, so its Events go through the shared writer instead."""
        message = one_line(message)
        try:
            kopf.event(ref, type=type_, reason=reason, message=message)
        except LookupError:
            if self.recorder is None:
                self.recorder = EventRecorder(self.adapter.kube, "orchardist-controller")
            await self.recorder.record(dict(ref), type_, reason, message)

    async def _refused(self, md: Refused) -> None:
        """A spec the API server let through but the types refuse: say so in status, do nothing else."""
        conds = {
            "Ready": st.Cond(False, "InvalidSpec", md.message),
            "Reconciling": st.Cond(False, st.AS_EXPECTED, "waiting for a person (see Stalled)"),
            "Stalled": st.Cond(True, "InvalidSpec", md.message),
            "Degraded": st.Cond(False, st.AS_EXPECTED, ""),
        }
        previous = md.status.conditions
        rendered = st.render(conds, md.generation, previous, st.rfc3339(self.clock()))
        reason, message = st.summary(conds)
        new = {
            "observedGeneration": md.generation,
            "phase": "Failed",
            "reason": reason,
            "message": message,
            "conditions": rendered,
        }
        strip = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in rendered]
        have = [c.to_json() for c in previous]
        have = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in have]
        if strip != have:
            path = paths.modeldeployment(md.namespace, md.name, status=True)
            await self.adapter.kube.merge_patch(path, {"status": new})
            kopf.event(
                deployment_ref(md.namespace, md.name, md.uid),
                type="Warning",
                reason="InvalidSpec",
                message=one_line(md.message),
            )

    def _status_of(self, namespace: str, name: str, md: ModelDeployment) -> ModelDeploymentStatus:
        """The deployment's status: what this process just wrote, while the watch may still lag."""
        recent = self._status_written.get((namespace, name))
        if recent is not None and time.monotonic() - recent[0] < WRITE_MEMORY:
            return recent[1]
        self._status_written.pop((namespace, name), None)
        return md.status

    async def _exposure(self, namespace: str, svc_name: str) -> tuple[JSON | None, list[JSON]]:
        """The Service and our EndpointSlices as they are: from the watches (free), else by GET.

        Right after this process wrote them, what it wrote is used for ``WRITE_MEMORY`` seconds, so a
        reconcile that runs before the watch catches up does not write them again.
        """
        key = (namespace, svc_name)
        recent = self._written.get(key)
        if recent is not None and time.monotonic() - recent[0] < WRITE_MEMORY:
            return recent[1], list(recent[2])
        self._written.pop(key, None)
        if self.services is None or self.slices is None:
            service, slices = await asyncio.gather(
                self.adapter.service(namespace, svc_name), self.adapter.slices(namespace, svc_name)
            )
            return service, slices
        service = next(iter(self.services.get(key, ())), None)
        return (dict(service) if service is not None else None), [dict(s) for s in self.slices.get(key, ())]

    # -- the world from the indexes ------------------------------------------------------------

    def _all_replicas(self) -> list[ModelReplica]:
        """Every replica: the watch's, minus those this process deleted, plus those it just created."""
        out: list[ModelReplica] = []
        seen: set[Key] = set()
        indexed: set[Key] = set()
        uids: set[str] = set()
        if self.replicas is not None:
            for _, replicas in self.replicas.items():
                for r in replicas:
                    key = (str(r.metadata.get("namespace")), str(r.metadata.get("name")))
                    indexed.add(key)
                    uid = str(r.metadata.get("uid"))
                    uids.add(uid)
                    if key in self.forgotten or uid in self.phantoms:
                        continue
                    seen.add(key)
                    out.append(r)
        self.forgotten &= indexed  # deleted ones the watch no longer shows need no memory
        if self.replicas is not None:
            self.phantoms &= uids
        for (ns, _), bucket in list(self.assumed.items()):
            for rname, r in list(bucket.items()):
                if (ns, rname) in indexed:
                    del bucket[rname]
                elif (ns, rname) not in seen:
                    out.append(r)
        return out

    def _macs(self, now: datetime, replicas: Iterable[ModelReplica]) -> list[Mac]:
        reserved = world.reserved_by_node(replicas)
        macs: list[Mac] = []
        if self.macnodes is None:
            return macs
        for name, nodes in self.macnodes.items():
            for node in nodes:
                renewed = next(iter(self.leases.get(name, ()) if self.leases is not None else ()), None)
                listed = self.renewals.get(str(name))
                if listed is not None and (renewed is None or listed > renewed):
                    renewed = listed  # read live after a pause; the watch has not caught up yet
                ready = world.lease_ready(renewed, now, self.config.lease_grace)
                macs.append(world.mac_from(node, ready, reserved.get(str(name), 0)))
                break
        return macs

    # -- replica events --------------------------------------------------------------------------

    def replica_phase_event(self, replica: ModelReplica, initial: bool) -> tuple[str, str, str] | None:
        """The Event to post on the deployment when a replica changes phase (None: nothing new)."""
        st_ = replica.status
        uid = str(replica.metadata.get("uid"))
        phase = st_.phase
        before = self.phases.get(uid, "unseen")
        self.phases[uid] = phase
        if initial or before == phase or (before == "unseen" and phase in (None, "Pending")):
            return None
        if st_.restarts and phase in ("Starting", "Ready"):
            return None  # an engine restarting after a crash: the deployment's Degraded says so, once
        spec = replica.spec
        who = f"{replica.metadata.get('name')} on {spec.node_name}"
        if phase == "Pulling":
            total = st_.progress.bytes_total if st_.progress else None
            size = f" ({total / (1 << 30):.1f} GiB)" if total else ""
            return "Normal", "Pulling", f"{who}: pulling {spec.model}{size}"
        if phase == "Starting":
            return "Normal", "Pulled", f"{who}: model in place, starting {spec.engine}"
        if phase == "Ready":
            return "Normal", "Started", f"{who}: serving at {st_.endpoint}"
        if phase == "Failed":
            err = st_.last_error
            reason = (err.reason if err else None) or "Failed"
            return "Warning", reason, one_line(f"{who}: {(err.message if err else None) or 'failed'}")
        return None

    def indexed_replica(self, namespace: str, deployment: str, name: str) -> ModelReplica | None:
        """The replica as the index holds it (parsed when its event arrived)."""
        if self.replicas is None:
            return None
        for r in self.replicas.get((namespace, deployment), ()):
            if r.metadata.get("name") == name:
                return cast(ModelReplica, r)
        return None

    def created_here(self, namespace: str, deployment: str, replica: str) -> bool:
        """Whether this process created the replica and still holds it as assumed."""
        return replica in self.assumed.get((namespace, deployment), {})

    def forget_replica(self, uid: str) -> None:
        self.phases.pop(uid, None)

    def needs_placement(self) -> list[Key]:
        """Deployments a new or changed Mac may help (see :func:`plan.needs_placement`)."""
        if self.deployments is None:
            return []
        return [
            key
            for key, entries in self.deployments.items()
            if any(isinstance(md, ModelDeployment) and plan.needs_placement(md) for md in entries)
        ]


def deployment_ref(namespace: str, name: str, uid: str | None) -> kopf.Body:
    """What kopf needs to post an Event about a ModelDeployment."""
    raw = {
        "apiVersion": API_VERSION,
        "kind": MODEL_DEPLOYMENT,
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
    }
    return kopf.Body(cast(kopf.RawBody, raw))
