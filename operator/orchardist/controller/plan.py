"""The reconcile plan of one ModelDeployment: from what is, to what to do. Pure.

``decide(Observed) -> Plan``: which ModelReplicas to create (bound, with their memory plans) and
delete, the Service and EndpointSlices to have, the status to write and the Events to post. The
adapter (``kube.py``) executes the plan; running ``decide`` again on the result asks for nothing.

Rules, level-based (no memory of earlier runs):
- Replicas on a Mac that is gone, or that has a NoExecute taint they do not tolerate, are deleted
  (and replaced); on a NotReady Mac (Lease older than the grace) they are *lost*: not counted,
  replaced elsewhere, marked (annotation ``orchardist.io/lost``, so the fact survives restarts) and
  kept until the Mac returns (then they go, if the others cover the deployment) or is deleted.
- Scale down removes, in order: replicas on NotReady Macs, old revisions, not-ready replicas (least
  progress first), then those on the most crowded and most loaded Macs.
- A rollout (new digest, engine, version, args, env or plan inputs = a new revision label) creates
  new replicas first, up to ``replicas + maxSurge`` in all, and removes a ready old replica only
  while the ready count stays at or above ``replicas - maxUnavailable``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchardist.api.constants import API_VERSION, LABEL_DEPLOYMENT, LABEL_NODE, LABEL_REVISION
from orchardist.api.modeldeployment import ModelDeploymentSpec
from orchardist.controller import scheduler, status
from orchardist.controller.scheduler import Fit, FitFn, Mac

MANAGED_BY = "orchardist-controller"  # a label value: no slash
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
RE_RESOLVE = "orchardist.io/re-resolve"
LOST = "orchardist.io/lost"  # on a replica: its Mac went NotReady and it was replaced


# ------------------------------------------------------------------------------------------------
# Observed state


@dataclass(frozen=True, slots=True)
class Replica:
    """One ModelReplica as the plan needs it."""

    name: str
    node: str
    revision: str
    phase: str | None = None
    endpoint: str | None = None
    reserved_bytes: int = 0
    terminating: bool = False
    progress: Mapping[str, Any] | None = None
    created: str = ""
    last_error: Mapping[str, Any] | None = None
    restarts: int = 0
    lost_mark: bool = False  # annotation orchardist.io/lost: replaced while its Mac was NotReady

    @property
    def ready(self) -> bool:
        return self.phase == "Ready"


@dataclass(frozen=True, slots=True)
class Pin:
    """What the tag resolved to, and the model's profile (``fit`` plans one replica on a Mac)."""

    digest: str
    model: str  # oci://...@sha256:...
    profile: Mapping[str, Any]  # status.modelProfile
    fit: FitFn


@dataclass(frozen=True, slots=True)
class Observed:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: ModelDeploymentSpec
    status: Mapping[str, Any]
    replicas: Sequence[Replica]  # this deployment's
    macs: Sequence[Mac]  # every MacNode, reserved_bytes counting every replica bound there
    pin: Pin | None
    now: str  # RFC 3339, for condition transition times
    resolve_error: str | None = None
    service: Mapping[str, Any] | None = None  # the Service as it is (None: absent)
    slices: Sequence[Mapping[str, Any]] = ()  # our EndpointSlices as they are


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    create: tuple[dict[str, Any], ...] = ()
    delete: tuple[tuple[str, str], ...] = ()  # (replica name, why)
    service: dict[str, Any] | None = None  # desired Service when it must be created or changed
    slices: tuple[dict[str, Any], ...] = ()  # desired EndpointSlices that must be created or changed
    delete_slices: tuple[str, ...] = ()
    status: dict[str, Any] | None = None  # the whole new status when it changed
    events: tuple[Event, ...] = ()
    mark: tuple[tuple[str, bool], ...] = ()  # (replica, True: set / False: clear the lost annotation)

    @property
    def empty(self) -> bool:
        return not (
            self.create
            or self.delete
            or self.service
            or self.slices
            or self.delete_slices
            or self.status
            or self.mark
        )


# ------------------------------------------------------------------------------------------------
# Parsing Kubernetes bodies (dicts) into the plan's inputs


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def lease_ready(lease: Mapping[str, Any] | None, now: datetime, grace: float) -> bool:
    """A Mac is Ready while its Lease was renewed within ``grace`` seconds."""
    if not lease:
        return False
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    if renewed is None:
        return False
    return (now - renewed).total_seconds() <= grace


def mac_from(body: Mapping[str, Any], ready: bool, reserved_bytes: int) -> Mac:
    spec = body.get("spec") or {}
    st = body.get("status") or {}
    mem = st.get("memory") or {}
    chip = st.get("chip") or {}
    return Mac(
        name=str(body["metadata"]["name"]),
        working_set_bytes=int(mem.get("gpuWorkingSetBytes") or 0),
        ready=ready,
        chip=str(chip.get("family") or chip.get("name") or ""),
        total_bytes=int(mem.get("totalBytes") or 0),
        bandwidth=int(st.get("memoryBandwidthBytesPerSecond") or 0),
        unschedulable=bool(spec.get("unschedulable")),
        labels=dict((body.get("metadata") or {}).get("labels") or {}),
        taints=tuple(
            scheduler.Taint(
                str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect") or "NoSchedule")
            )
            for t in spec.get("taints") or ()
        ),
        engines={
            str(e["name"]): str(e.get("version") or "") for e in st.get("engines") or () if e.get("name")
        },
        cached=frozenset(str(c["digest"]) for c in st.get("cachedModels") or () if c.get("digest")),
        reserved_bytes=reserved_bytes,
    )


def replica_from(body: Mapping[str, Any]) -> Replica:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    st = body.get("status") or {}
    labels = meta.get("labels") or {}
    return Replica(
        name=str(meta.get("name")),
        node=str(spec.get("nodeName") or labels.get(LABEL_NODE) or ""),
        revision=str(labels.get(LABEL_REVISION) or ""),
        phase=st.get("phase"),
        endpoint=st.get("endpoint"),
        reserved_bytes=int((spec.get("memoryPlan") or {}).get("reservedBytes") or 0),
        terminating=bool(meta.get("deletionTimestamp")),
        progress=st.get("progress"),
        created=str(meta.get("creationTimestamp") or ""),
        last_error=st.get("lastError"),
        restarts=int(st.get("restarts") or 0),
        lost_mark=LOST in (meta.get("annotations") or {}),
    )


def reserved_by_node(replicas: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Working-set bytes held on each Mac by every replica bound there (terminating ones too)."""
    out: dict[str, int] = {}
    for body in replicas:
        node = (body.get("spec") or {}).get("nodeName")
        if node:
            plan = (body.get("spec") or {}).get("memoryPlan") or {}
            out[node] = out.get(node, 0) + int(plan.get("reservedBytes") or 0)
    return out


# ------------------------------------------------------------------------------------------------
# Names and revisions


def revision(spec: ModelDeploymentSpec, digest: str) -> str:
    """The hash of what a rollout replaces: digest, engine, version, args, env and the plan inputs."""
    material = {
        "digest": digest,
        "engine": spec.engine,
        "engineVersion": spec.engine_version,
        "engineArgs": list(spec.engine_args),
        "env": [[e.name, e.value] for e in spec.env],
        "apiKey": spec.api_key_secret_ref.model_dump() if spec.api_key_secret_ref else None,
        "contextLength": spec.context_length,
        "maxConcurrentSequences": spec.max_concurrent_sequences,
        "kvCache": spec.kv_cache.model_dump(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]


def selector(name: str) -> str:
    return f"{LABEL_DEPLOYMENT}={name}"


def service_name(obs: Observed) -> str:
    return obs.spec.service.name or obs.name


def owner_reference(obs: Observed) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "name": obs.name,
        "uid": obs.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _free_names(base: str, taken: set[str], count: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        candidate = f"{base}-{i}"
        if candidate not in taken:
            out.append(candidate)
            taken.add(candidate)
        i += 1
    return out


# ------------------------------------------------------------------------------------------------
# The decision


def _progress_key(r: Replica) -> tuple[int, float]:
    order = {"Failed": 0, None: 1, "Pending": 1, "Pulling": 2, "Starting": 3, "Ready": 4}
    done = 0.0
    if r.progress and r.progress.get("bytesTotal"):
        done = float(r.progress.get("bytesDone") or 0) / float(r.progress["bytesTotal"])
    return order.get(r.phase, 1), done


def decide(obs: Observed) -> Plan:
    """Everything to do for one deployment, given what is."""
    spec = obs.spec
    macs = {m.name: m for m in obs.macs}
    desired = spec.replicas
    events: list[Event] = []
    deletes: dict[str, str] = {}

    alive = [r for r in obs.replicas if not r.terminating]
    tolerations = [
        scheduler.Toleration(t.key, t.operator, t.value, t.effect) for t in spec.placement.tolerations
    ]
    for r in alive:
        if r.node not in macs:
            deletes[r.name] = f"its Mac {r.node} is gone"
            continue
        for taint in macs[r.node].taints:
            if taint.effect == "NoExecute" and not scheduler.tolerated(taint, tolerations):
                deletes[r.name] = f"its Mac {r.node} has the NoExecute taint {taint.key}"
    placed = [r for r in alive if r.name not in deletes]
    lost = [r for r in placed if not macs[r.node].ready]
    live = [r for r in placed if macs[r.node].ready]
    marks: list[tuple[str, bool]] = [(r.name, True) for r in lost if not r.lost_mark]

    rev = revision(spec, obs.pin.digest) if obs.pin else None
    # Back from NotReady: a replica that was replaced goes once its replacements serve; until then
    # it keeps serving, held aside from scaling. Without replacements it is simply live again.
    held: list[Replica] = []
    returned = [r for r in live if r.lost_mark]
    if returned:
        others = [r for r in live if not r.lost_mark and (rev is None or r.revision == rev)]
        if len(others) >= desired and sum(r.ready for r in others) >= desired:
            for r in returned:
                deletes[r.name] = "replaced while its Mac was NotReady"
        elif len(others) >= desired:
            held = returned
        else:
            marks += [(r.name, False) for r in returned]
        live = [r for r in live if r.name not in deletes and r not in held]

    new = [r for r in live if rev is None or r.revision == rev]
    old = [r for r in live if rev is not None and r.revision != rev]
    crowd: dict[str, int] = {}
    for r in live:
        crowd[r.node] = crowd.get(r.node, 0) + 1

    def load(r: Replica) -> tuple[int, float, str, str]:
        m = macs[r.node]
        used = (
            1.0 - (m.working_set_bytes - m.reserved_bytes) / m.working_set_bytes
            if m.working_set_bytes
            else 1.0
        )
        return (-crowd.get(r.node, 0), -used, _neg(r.created), r.name)

    def removal_order(rs: Iterable[Replica]) -> list[Replica]:
        return sorted(rs, key=lambda r: (r.ready, _progress_key(r), load(r)))

    creates: list[dict[str, Any]] = []
    unschedulable: scheduler.Unschedulable | None = None
    if obs.pin is not None and rev is not None:
        surge, unavailable = spec.rollout.max_surge, spec.rollout.max_unavailable
        ready_total = sum(r.ready for r in live)
        # Old revision: not-ready ones go at once; ready ones while availability allows.
        if old:
            allowed_drop = ready_total - max(0, desired - unavailable)
            for r in removal_order(old):
                if not r.ready:
                    deletes[r.name] = "replaced by the new revision"
                elif allowed_drop > 0:
                    deletes[r.name] = "replaced by the new revision"
                    allowed_drop -= 1
        remaining_old = [r for r in old if r.name not in deletes]
        # Too many of the new revision (scale down).
        if len(new) > desired:
            for r in removal_order(new)[: len(new) - desired]:
                deletes[r.name] = "scaled down"
        room = desired + surge - len(remaining_old) - len(new) if remaining_old else desired - len(new)
        want = max(0, min(desired - len(new), room))
        if want:
            creates, unschedulable, ev = _place(obs, rev, want, live + lost, macs)
            events.extend(ev)
    elif desired == 0:
        for r in live:
            deletes[r.name] = "scaled down"
    # Lost replicas stay (marked) while their Mac is NotReady; when it returns the marked ones go if
    # the others cover the deployment, and when its MacNode is deleted they go with it.

    for name, why in sorted(deletes.items()):
        events.append(
            Event("Normal", "ScaledDown" if why == "scaled down" else "Replacing", f"deleting {name}: {why}")
        )

    survivors = [r for r in live if r.name not in deletes]
    service, slices, delete_slices = _exposure(obs, survivors + held)
    st, st_events = _status(obs, rev, survivors, lost + held, creates, unschedulable)
    events.extend(st_events)
    return Plan(
        create=tuple(creates),
        delete=tuple(sorted(deletes.items())),
        service=service,
        slices=tuple(slices),
        delete_slices=tuple(delete_slices),
        status=st,
        events=tuple(events),
        mark=tuple(marks),
    )


def _neg(created: str) -> str:
    """Newest first when sorted ascending (RFC 3339 strings sort by time)."""
    return "".join(chr(0x10FFFF - ord(c)) for c in created)


def _place(
    obs: Observed, rev: str, want: int, mine: Sequence[Replica], macs: Mapping[str, Mac]
) -> tuple[list[dict[str, Any]], scheduler.Unschedulable | None, list[Event]]:
    assert obs.pin is not None
    spec = obs.spec
    placement = spec.placement
    request = scheduler.Request(
        engine=spec.engine,
        fit=obs.pin.fit,
        digest=obs.pin.digest,
        engine_version=spec.engine_version,
        weight_bytes=int(obs.pin.profile.get("weightBytes") or 1),
        node_selector=dict(placement.node_selector),
        tolerations=tuple(
            scheduler.Toleration(t.key, t.operator, t.value, t.effect) for t in placement.tolerations
        ),
        spread=placement.spread,
        prefer_cached=placement.prefer_cached_nodes,
    )
    existing: dict[str, int] = {}
    for r in mine:
        existing[r.node] = existing.get(r.node, 0) + 1
    result = scheduler.Fleet(macs.values()).place(request, want, existing)
    taken = {r.name for r in obs.replicas}
    names = _free_names(f"{obs.name}-{rev[:6]}", taken, len(result.bindings))
    creates = [
        _replica_body(obs, rev, name, b.node, b.fit, macs[b.node])
        for name, b in zip(names, result.bindings, strict=True)
    ]
    events = [
        Event("Normal", "Scheduled", f"{name} bound to {b.node}: {_plan_words(b.fit)}")
        for name, b in zip(names, result.bindings, strict=True)
    ]
    return creates, result.unschedulable, events


def _plan_words(fit: Fit) -> str:
    p = fit.plan
    return (
        f"context {int(p.get('maxModelLen', 0)):,} tokens, {int(p.get('maxNumSeqs', 0))} sequences, "
        f"{scheduler.gib(fit.reserved_bytes)} of the working set"
    )


def _replica_body(obs: Observed, rev: str, name: str, node: str, fit: Fit, mac: Mac) -> dict[str, Any]:
    assert obs.pin is not None
    spec = obs.spec
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ModelReplica",
        "metadata": {
            "name": name,
            "namespace": obs.namespace,
            "labels": {
                LABEL_DEPLOYMENT: obs.name,
                LABEL_NODE: node,
                LABEL_REVISION: rev,
                LABEL_MANAGED_BY: MANAGED_BY,
            },
            "ownerReferences": [owner_reference(obs)],
        },
        "spec": {
            "nodeName": node,
            "deployment": obs.name,
            "model": obs.pin.model,
            "digest": obs.pin.digest,
            "engine": spec.engine,
            "engineVersion": spec.engine_version or mac.engines.get(spec.engine) or None,
            "memoryPlan": dict(fit.plan),
            "engineArgs": list(spec.engine_args),
            "env": [{"name": e.name, "value": e.value} for e in spec.env],
            "servedModelName": obs.name,
        },
    }
    if spec.pull_secret_ref:
        body["spec"]["pullSecretRef"] = {"name": spec.pull_secret_ref.name}
    if spec.api_key_secret_ref:
        body["spec"]["apiKeySecretRef"] = {
            "name": spec.api_key_secret_ref.name,
            "key": spec.api_key_secret_ref.key,
        }
    if body["spec"]["engineVersion"] is None:
        del body["spec"]["engineVersion"]
    return body


# ------------------------------------------------------------------------------------------------
# Exposure: a Service without selector + EndpointSlices of the ready replicas


def split_endpoint(endpoint: str | None) -> tuple[str, int] | None:
    """``"10.0.0.5:8001"`` -> ("10.0.0.5", 8001); None for what an IPv4 EndpointSlice refuses.

    The API server rejects loopback, link-local, multicast and unspecified addresses in slices, so a
    replica reporting one cannot be served through the Service (and is left out instead of failing
    the whole slice).
    """
    if not endpoint or ":" not in endpoint:
        return None
    host, _, port = endpoint.rpartition(":")
    try:
        ip = ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    return (host, number) if 0 < number < 65536 else None


def _exposure(
    obs: Observed, live: Sequence[Replica]
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[str]]:
    svc_name = service_name(obs)
    labels = {LABEL_DEPLOYMENT: obs.name, LABEL_MANAGED_BY: MANAGED_BY}
    desired_svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": svc_name,
            "namespace": obs.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(obs)],
        },
        "spec": {"ports": [{"name": "http", "port": obs.spec.service.port, "protocol": "TCP"}]},
    }
    service = None if _service_same(obs.service, desired_svc) else desired_svc

    by_port: dict[int, list[tuple[str, Replica]]] = {}
    for r in sorted(live, key=lambda r: r.name):
        hp = split_endpoint(r.endpoint) if r.ready else None
        if hp:
            by_port.setdefault(hp[1], []).append((hp[0], r))
    ports = sorted(by_port) or [0]
    wanted: list[dict[str, Any]] = []
    for i, port in enumerate(ports):
        name = svc_name if i == 0 else f"{svc_name}-{port}"
        wanted.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": name,
                    "namespace": obs.namespace,
                    "labels": {**labels, SERVICE_NAME_LABEL: svc_name, SLICE_MANAGED_BY: MANAGED_BY},
                    "ownerReferences": [owner_reference(obs)],
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}] if port else [],
                "endpoints": [
                    {
                        "addresses": [addr],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "targetRef": {
                            "kind": "ModelReplica",
                            "apiVersion": API_VERSION,
                            "name": r.name,
                            "namespace": obs.namespace,
                        },
                    }
                    for addr, r in by_port.get(port, [])
                ],
            }
        )
    existing = {str(s["metadata"]["name"]): s for s in obs.slices}
    changed = [w for w in wanted if not _slice_same(existing.get(w["metadata"]["name"]), w)]
    keep = {w["metadata"]["name"] for w in wanted}
    stale = sorted(n for n in existing if n not in keep)
    return service, changed, stale


def _service_same(have: Mapping[str, Any] | None, want: Mapping[str, Any]) -> bool:
    if have is None:
        return False
    ports = [
        {k: p.get(k) for k in ("name", "port", "protocol")}
        for p in (have.get("spec") or {}).get("ports") or ()
    ]
    labels = (have.get("metadata") or {}).get("labels") or {}
    return ports == want["spec"]["ports"] and all(
        labels.get(k) == v for k, v in want["metadata"]["labels"].items()
    )


def _slice_same(have: Mapping[str, Any] | None, want: Mapping[str, Any]) -> bool:
    if have is None:
        return False

    def norm_eps(eps: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (
                tuple(e.get("addresses") or ()),
                bool((e.get("conditions") or {}).get("ready")),
                ((e.get("targetRef") or {}).get("name")),
            )
            for e in eps
        )

    have_ports = [{k: p.get(k) for k in ("name", "port", "protocol")} for p in have.get("ports") or ()]
    labels = (have.get("metadata") or {}).get("labels") or {}
    return (
        have_ports == want["ports"]
        and norm_eps(have.get("endpoints") or ()) == norm_eps(want["endpoints"])
        and all(labels.get(k) == v for k, v in want["metadata"]["labels"].items())
    )


# ------------------------------------------------------------------------------------------------
# Status


def _failure(r: Replica) -> tuple[str, str] | None:
    err = r.last_error or {}
    if r.phase == "Failed" or (r.restarts and err and not r.ready):
        reason = str(err.get("reason") or ("CrashLoop" if r.restarts else "Failed"))
        message = str(err.get("message") or f"replica {r.name} failed")
        return reason, f"{r.name} on {r.node}: {message}"[:1024]
    return None


def _percent(replicas: Sequence[Replica]) -> str | None:
    done = total = 0
    for r in replicas:
        if r.phase == "Pulling" and r.progress:
            done += int(r.progress.get("bytesDone") or 0)
            total += int(r.progress.get("bytesTotal") or 0)
    return f"{100 * done // total}%" if total else None


def _status(
    obs: Observed,
    rev: str | None,
    live: Sequence[Replica],
    lost: Sequence[Replica],
    creates: Sequence[Mapping[str, Any]],
    unsched: scheduler.Unschedulable | None,
) -> tuple[dict[str, Any] | None, list[Event]]:
    spec = obs.spec
    updated = [r for r in live if rev is not None and r.revision == rev]
    failures = [f for f in (_failure(r) for r in updated) if f is not None]
    facts = status.Facts(
        desired=spec.replicas,
        existing=len(live) + len(lost) + len(creates),
        ready=sum(r.ready for r in live),
        updated=len(updated) + len(creates),
        updated_ready=sum(r.ready for r in updated),
        old=len(live) - len(updated) if rev is not None else 0,
        lost=len(lost),
        pulling=sum(r.phase == "Pulling" for r in updated),
        starting=sum(r.phase == "Starting" for r in updated),
        pending=sum(r.phase in (None, "Pending") for r in updated) + len(creates),
        percent=_percent(updated),
        digest=obs.pin.digest if obs.pin else None,
        resolve_error=obs.resolve_error if obs.pin is None else None,
        unschedulable=unsched.message if unsched else None,
        failures=tuple(failures),
        unroutable=tuple(
            f"{r.name} at {r.endpoint}" for r in updated if r.ready and split_endpoint(r.endpoint) is None
        ),
    )
    conds = status.conditions(facts)
    previous = list(obs.status.get("conditions") or ())
    svc = service_name(obs)
    summaries = [
        {
            k: v
            for k, v in {
                "name": r.name,
                "nodeName": r.node,
                "phase": r.phase or "Pending",
                "endpoint": r.endpoint,
                "progress": dict(r.progress) if r.progress else None,
            }.items()
            if v is not None
        }
        for r in sorted([*live, *lost], key=lambda r: r.name)
    ] + [
        {"name": c["metadata"]["name"], "nodeName": c["spec"]["nodeName"], "phase": "Pending"}
        for c in creates
    ]
    new_status: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "phase": status.phase(conds, facts),
        "replicas": facts.existing,
        "readyReplicas": facts.ready,
        "updatedReplicas": facts.updated,
        "ready": f"{facts.ready}/{spec.replicas}",
        "selector": selector(obs.name),
        "replicaStatuses": sorted(summaries, key=lambda s: s["name"]),
        "endpoint": f"{svc}.{obs.namespace}.svc:{spec.service.port}",
    }
    if obs.pin is not None:
        new_status["resolvedDigest"] = obs.pin.digest
        new_status["resolvedModel"] = obs.pin.model
        new_status["modelProfile"] = {k: v for k, v in obs.pin.profile.items() if v is not None}
    else:
        for key in ("resolvedDigest", "resolvedModel", "modelProfile"):
            if obs.status.get(key) is not None:
                new_status[key] = obs.status[key]
    new_status["conditions"] = status.render(conds, obs.generation, previous, obs.now)

    events: list[Event] = []
    before = {c.get("type"): c for c in previous}
    for ctype in ("Ready", "Stalled", "Degraded"):
        c, prev = conds[ctype], before.get(ctype) or {}
        if (("True" if c.status else "False"), c.reason) == (prev.get("status"), prev.get("reason")):
            continue
        if ctype == "Ready" and c.status:
            events.append(Event("Normal", c.reason, c.message))
        elif ctype != "Ready" and c.status:
            events.append(Event("Warning", c.reason, c.message))
        elif ctype != "Ready" and prev.get("status") == "True":
            events.append(Event("Normal", f"{ctype}Cleared", f"{ctype} cleared: {conds['Ready'].message}"))
    if _status_same(obs.status, new_status):
        return None, events
    return new_status, events


def _status_same(have: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    def strip(s: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in s.items() if k in want}
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or ()
        ]
        return out

    return strip(have) == strip(want)
