"""kopf wiring: thin handlers that feed indexes and trigger reconciles; nothing is decided here.

- ModelDeployment: ``resume``/``create``/``update`` handlers and a ``timer`` (the level-based
  resync that notices Leases running out) all call :meth:`Controller.trigger`.
- ModelReplica: an ``event`` handler posts pull/start/failure Events on the owning deployment and
  re-triggers its reconcile, so the EndpointSlice follows readiness within a reconcile (< 1 s).
- MacNode: an ``event`` handler retries the deployments a Mac may help (``plan.needs_placement``)
  when one appears or changes, and reconciles everything when one is deleted.
- MacNodes whose Lease expired: a background sweep every resync (``nodehealth.py``) marks them
  NotReady, as Kubernetes' node lifecycle controller does (a kopf timer would put a finalizer on
  every MacNode).
- Demand Leases (the gateway's, one per deployment, in its namespace): a labelled watch of their
  own (``demand.py``; kopf allows one selector per resource and the Macs' Leases use it), each
  change triggering the deployment's reconcile (autoscaling, ``autoscale.py``).
- Indexes (MacNodes, Leases in ``orchardist-system``, ModelReplicas, ModelDeployments) are the
  controller's view of the cluster, holding our kinds already parsed into the API types and each
  Lease as its renewal time; kopf holds handlers back until they are filled, so a restarted
  operator never mistakes "not listed yet" for "absent".
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from orchardist import kube as kube_setup
from orchardist import log
from orchardist.api.constants import GROUP, LABEL_DEPLOYMENT, VERSION
from orchardist.api.macnode import MacNode
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller import world
from orchardist.controller.activity import Activity
from orchardist.controller.demand import DemandWatch
from orchardist.controller.kube import ensure_peering
from orchardist.controller.metrics import AgentsExposure
from orchardist.controller.nodehealth import NodeHealth
from orchardist.controller.probes import Probes
from orchardist.controller.projection import Projector
from orchardist.controller.reconciler import Controller, deployment_ref
from orchardist.controller.world import LABEL_MANAGED_BY, MANAGED_BY, SERVICE_NAME_LABEL, SLICE_MANAGED_BY

LOG = log.get(__name__)
SYSTEM_NAMESPACE = kube_setup.SYSTEM_NAMESPACE
FINALIZER = f"{GROUP}/controller"


@dataclass(frozen=True)
class Options:
    namespaces: Sequence[str] | None = None  # None: every namespace
    kubeconfig: str | Path | None = None
    peering: str | None = "orchardist"  # None: standalone
    priority: int = 0
    peering_lifetime: int = 30
    resync_seconds: float = 10.0
    health_port: int = 0  # /healthz and /readyz (probes.py); 0: not served


def settings(opts: Options, identity: str) -> kopf.OperatorSettings:
    """kopf settings; each non-default says why."""
    s = kopf.OperatorSettings()
    # Our own Events only (kopf.event with our reasons); log records stay logs, rendered by structlog.
    s.posting.loggers = False
    s.posting.level = logging.WARNING
    s.posting.reporting_component = "orchardist-controller"
    s.posting.reporting_instance = identity[:128]
    s.posting.event_name_prefix = "orchardist-"
    # State kopf keeps on our objects carries our group, not kopf's (as crate-operator does).
    s.persistence.finalizer = FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Only the heartbeat Leases of the Macs, not every Lease of the cluster (leader elections etc.).
    s.watching.field_selectors["coordination.k8s.io", "leases"] = f"metadata.namespace={SYSTEM_NAMESPACE}"
    # Only the Services and EndpointSlices this controller manages (read from watches, not GETs).
    s.watching.label_selectors["v1", "services"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    s.watching.label_selectors["discovery.k8s.io", "v1", "endpointslices"] = (
        f"{SLICE_MANAGED_BY}={MANAGED_BY}"
    )
    # Leader election: one operator acts; a standby takes over when the leader's record expires.
    if opts.peering:
        s.peering.name = opts.peering
        s.peering.priority = opts.priority
        s.peering.lifetime = opts.peering_lifetime
        s.peering.stealth = True
    else:
        s.peering.standalone = True
    return s


class NamedConnection(kopf.ConnectionInfo):
    """kopf's credentials that also name the controller: kopf's own writes (finalizers, its
    annotations, peering) carry no fieldManager, so the API server names them after the
    User-Agent; kopf keeps a User-Agent its session was given (else it sends ``kopf/<version>``)."""

    def as_http_headers(self) -> dict[str, str]:
        return {**super().as_http_headers(), "User-Agent": kube_setup.user_agent(kube_setup.CONTROLLER)}


def connection_info(kubeconfig: str | Path | None) -> kopf.ConnectionInfo:
    """kopf's credentials from the same place every Orchardist process reads them (orchardist.kube)."""
    cfg = kube_setup.api_client(kubeconfig, manager=kube_setup.CONTROLLER).configuration
    keys = dict(cfg.api_key or {})
    auth = keys.get("authorization") or keys.get("BearerToken")
    token = auth.split(" ", 1)[1] if auth and " " in auth else auth
    return NamedConnection(
        server=str(cfg.host),
        ca_path=cfg.ssl_ca_cert or None,
        insecure=not cfg.verify_ssl,
        scheme="Bearer" if token else None,
        token=token or None,
        certificate_path=cfg.cert_file or None,
        private_key_path=cfg.key_file or None,
        username=cfg.username or None,
        password=cfg.password or None,
    )


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def register(registry: kopf.OperatorRegistry, ctl: Controller, opts: Options) -> None:
    """Declare every handler on ``registry`` (no import-time side effects)."""
    served = set(opts.namespaces) if opts.namespaces is not None else None

    def serves(namespace: str | None, **_: Any) -> bool:
        return served is None or namespace in served

    def in_system(namespace: str | None, **_: Any) -> bool:
        return namespace == SYSTEM_NAMESPACE

    md = (GROUP, VERSION, "modeldeployments")
    # Each agent reads only its replicas' Secrets, copied into its node's namespace (projection.py).
    projector = Projector(
        ctl.adapter.kube,
        lambda: [r for _, rs in (ctl.replicas or {}).items() for r in rs],
        SYSTEM_NAMESPACE,
    )
    background: list[asyncio.Task[None]] = []
    acting: list[asyncio.Task[None]] = []  # the loops that run only while active (see follow)
    # Whether this operator is the active one of its peering (kopf says so only in its log).
    activity = ctl.activity = Activity(peering=bool(opts.peering))
    activity.install()
    # Macs whose Lease expired are shown NotReady (the dead agent cannot say so itself).
    health = NodeHealth(
        ctl.adapter.kube,
        lambda: ctl.macnodes,
        lambda: ctl.leases,
        ctl.config.lease_grace,
        replicas=lambda: ctl.replicas,  # ... and their replicas Unknown
    )
    mr = (GROUP, VERSION, "modelreplicas")
    mn = (GROUP, VERSION, "macnodes")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(opts.kubeconfig)

    # Our three kinds are parsed here, once per watch event; everything after reads the models.
    @kopf.index(*md, id="md_index", when=serves, registry=registry)
    def md_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): world.parse_deployment(_snapshot(body))}

    @kopf.index(*mr, id="mr_index", registry=registry)
    def mr_index(
        namespace: str | None, name: str, labels: kopf.Labels, body: kopf.Body, **_: Any
    ) -> dict[Any, Any]:
        replica = world.parse(ModelReplica, _snapshot(body))
        if isinstance(replica, str):
            LOG.warning("replica left out", namespace=namespace, replica=name, error=replica)
            return {}
        return {(namespace, labels.get(LABEL_DEPLOYMENT, "")): replica}

    @kopf.index(*mn, id="mn_index", registry=registry)
    def mn_index(name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        node = world.parse(MacNode, _snapshot(body))
        if isinstance(node, str):
            LOG.warning("MacNode left out", node=name, error=node)
            return {}
        return {name: node}

    @kopf.index("v1", "services", id="svc_index", registry=registry)
    def svc_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, name): _snapshot(body)}

    @kopf.index("discovery.k8s.io", "v1", "endpointslices", id="slice_index", registry=registry)
    def slice_index(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, labels.get(SERVICE_NAME_LABEL, "")): _snapshot(body)}

    @kopf.index("coordination.k8s.io", "v1", "leases", id="lease_index", when=in_system, registry=registry)
    def lease_index(name: str, spec: kopf.Spec, **_: Any) -> dict[Any, Any]:
        return {name: world.renewed_at(spec)}

    @kopf.on.startup(registry=registry)
    async def startup(**kwargs: Any) -> None:
        # The indexes are live: kopf keeps filling these objects for the operator's lifetime.
        ctl.deployments, ctl.replicas = kwargs["md_index"], kwargs["mr_index"]
        ctl.macnodes, ctl.leases = kwargs["mn_index"], kwargs["lease_index"]
        ctl.services, ctl.slices = kwargs["svc_index"], kwargs["slice_index"]
        if opts.health_port:
            background.append(asyncio.create_task(Probes(opts.health_port, health.listed.is_set).run()))
        # The agents' metrics endpoints, for Prometheus (a selector-less Service + EndpointSlice).
        agents = AgentsExposure(ctl.adapter.kube, lambda: ctl.macnodes)

        def follow(active: bool) -> None:
            """The loops beside kopf's handlers act only while this operator is the active one: a
            standby's indexes are not watched, so it would mark live Macs NotReady and take Secret
            copies away. Back from a pause (not from the start, when kopf lists first), the indexes
            may hold what was deleted meanwhile: reconciles read live, Macs are judged after a grace."""
            for task in acting:
                task.cancel()
            acting.clear()
            if not active:
                return
            back = activity.resumes > 1
            if back:
                ctl.relisted()
            settle = opts.resync_seconds if back else 0.0
            grace = ctl.config.lease_grace if back else 0.0
            acting.append(asyncio.create_task(_later(settle, projector.run(opts.resync_seconds))))
            acting.append(asyncio.create_task(_later(grace, health.run(opts.resync_seconds))))
            acting.append(asyncio.create_task(_later(settle, agents.run(opts.resync_seconds))))

        activity.on_change.append(follow)
        follow(activity.active)
        # The gateway's demand Leases live in the deployments' namespaces: a watch of their own.
        ctl.demand = watch = DemandWatch(ctl.adapter.kube.raw, lambda ns, n: _quietly(ctl.trigger(ns, n)))
        background.append(asyncio.create_task(watch.run()))
        if opts.peering:
            peering_namespaces = None if served is None else sorted({*served, SYSTEM_NAMESPACE})
            await ensure_peering(ctl.adapter.kube, opts.peering, peering_namespaces)
        LOG.info(
            "controller started",
            namespaces=sorted(served) if served else "all",
            peering=opts.peering,
            priority=opts.priority,
            lease_grace=ctl.config.lease_grace,
        )

    @kopf.on.probe(id="listed", registry=registry)
    def listed(**_: Any) -> bool:
        """In the health endpoint's answer: whether every watched kind has been listed."""
        return health.listed.is_set()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        activity.uninstall()
        activity.on_change.clear()
        for task in [*background, *acting]:
            task.cancel()

    @kopf.on.resume(*md, id="reconcile-resume", when=serves, backoff=2, registry=registry)
    @kopf.on.create(*md, id="reconcile-create", when=serves, backoff=2, registry=registry)
    async def reconcile(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        health.listed.set()  # kopf calls handlers only once every index is filled
        await ctl.trigger(str(namespace), name, _snapshot(body))

    @kopf.on.update(*md, id="reconcile-update", when=serves, backoff=2, registry=registry)
    async def reconcile_update(
        namespace: str | None, name: str, body: kopf.Body, diff: kopf.Diff, **_: Any
    ) -> None:
        model_changed = any(tuple(d[1])[:2] == ("spec", "model") or tuple(d[1]) == ("spec",) for d in diff)
        await ctl.trigger(str(namespace), name, _snapshot(body), force_resolve=model_changed)

    @kopf.on.timer(*md, id="resync", interval=opts.resync_seconds, when=serves, backoff=2, registry=registry)
    async def resync(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        await ctl.trigger(str(namespace), name, _snapshot(body))

    @kopf.on.event(*mr, id="replica-changed", registry=registry)
    async def replica_changed(
        event: kopf.RawEvent, body: kopf.Body, name: str, namespace: str | None, labels: kopf.Labels, **_: Any
    ) -> None:
        projector.poke()  # any replica: its Mac's projection follows it
        owner = labels.get(LABEL_DEPLOYMENT)
        if not owner or namespace is None or not serves(namespace):
            return
        etype = event.get("type")
        # kopf indexes before it calls handlers: the index holds this event's replica, parsed.
        replica = None if etype == "DELETED" else ctl.indexed_replica(namespace, owner, name)
        if etype == "DELETED":
            ctl.forget_replica(str(body.metadata.uid))
        elif replica is not None:
            ev = ctl.replica_phase_event(replica, initial=etype is None)
            if ev is not None:
                uid = next((o.get("uid") for o in replica.metadata.get("ownerReferences") or ()), None)
                kopf.event(deployment_ref(namespace, owner, uid), type=ev[0], reason=ev[1], message=ev[2])
        if etype is None:  # a listing: at start, or again after a pause (a takeover) or an expiry
            ctl.relisted()  # the index may still hold replicas deleted meanwhile
            return  # resume handlers (at start) and the resync timer reconcile every deployment anyway
        unreported = replica is not None and replica.status.phase is None
        if etype == "ADDED" and unreported and ctl.created_here(namespace, owner, name):
            return  # our own create coming back: the reconcile that made it already counted it
        await _quietly(ctl.trigger(namespace, owner))

    @kopf.on.event(*mn, id="macnode-changed", registry=registry)
    async def macnode_changed(event: kopf.RawEvent, **_: Any) -> None:
        projector.poke()  # the indexes are filled: the projection may run
        health.listed.set()  # and the Lease index too: a Lease missing now is missing
        etype = event.get("type")
        if etype is None:
            return
        if etype == "DELETED":
            keys = [k for k in (ctl.deployments or {}) if serves(k[0])]
        else:
            keys = ctl.needs_placement()
        await asyncio.gather(*(_quietly(ctl.trigger(ns, name)) for ns, name in keys))


async def _later(delay: float, coro: Coroutine[Any, Any, None]) -> None:
    """``coro`` after ``delay`` seconds (closed unstarted when cancelled before)."""
    try:
        await asyncio.sleep(delay)
    except asyncio.CancelledError:
        coro.close()
        raise
    await coro


async def _quietly(coro: Any) -> None:
    """A reconcile triggered by another object's event: failures are logged; the timer retries."""
    try:
        await coro
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        LOG.info("reconcile deferred", error=str(exc))
    except Exception as exc:  # the owner's own handlers and the timer retry; one log line is enough
        LOG.warning("reconcile failed", error=f"{type(exc).__name__}: {exc}")


__all__ = ["FINALIZER", "Options", "connection_info", "register", "settings"]
