"""What a reconcile sees: the bodies kopf hands over, read through the API types, and the plan's inputs.

Bodies are parsed once, where kopf hands them over (the indexes, one parse per watch event); every
decision after that takes models. A body the types refuse is reported and left out, never guessed
at: the API server validates the same shapes, so this only happens across incompatible versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from orchardist.api.constants import API_VERSION, LABEL_DEPLOYMENT, LABEL_REVISION
from orchardist.api.macnode import MacNode
from orchardist.api.modeldeployment import (
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ReplicaProgress,
)
from orchardist.api.modelreplica import LastError, ModelReplica
from orchardist.api.rules import ApiModel
from orchardist.controller.scheduler import FitFn, Mac, Taint

MANAGED_BY = "orchardist-controller"  # a label value: no slash
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
SLICE_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
RE_RESOLVE = "orchardist.io/re-resolve"
LOST = "orchardist.io/lost"  # on a replica: its Mac went NotReady and it was replaced

M = TypeVar("M", bound=ApiModel)


# ------------------------------------------------------------------------------------------------
# Bodies -> API models


@dataclass(frozen=True, slots=True)
class Refused:
    """A ModelDeployment whose spec the types refuse: what its status needs to say so."""

    namespace: str
    name: str
    uid: str
    generation: int
    deleting: bool
    status: ModelDeploymentStatus
    message: str


def first_error(exc: ValidationError) -> str:
    """The first validation error as one line: where, and what is wrong."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}"


def parse_deployment(body: Mapping[str, Any]) -> ModelDeployment | Refused:
    """A ModelDeployment, or what is needed to report that its spec does not validate."""
    try:
        return ModelDeployment.model_validate(body)
    except ValidationError as exc:
        meta = body.get("metadata") or {}
        try:
            status = ModelDeploymentStatus.model_validate(body.get("status") or {})
        except ValidationError:
            status = ModelDeploymentStatus()
        return Refused(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
            deleting=bool(meta.get("deletionTimestamp")),
            status=status,
            message=f"the spec does not validate at {first_error(exc)}",
        )


def parse(kind: type[M], body: Mapping[str, Any]) -> M | str:
    """``body`` read as ``kind`` (a MacNode, a ModelReplica), or why it cannot be."""
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        return first_error(exc)


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def renewed_at(lease_spec: Mapping[str, Any]) -> datetime | None:
    """When a heartbeat Lease was last renewed (or acquired), from its spec."""
    return parse_time(lease_spec.get("renewTime")) or parse_time(lease_spec.get("acquireTime"))


def lease_ready(renewed: datetime | None, now: datetime, grace: float) -> bool:
    """A Mac is Ready while its Lease was renewed within ``grace`` seconds."""
    return renewed is not None and (now - renewed).total_seconds() <= grace


# ------------------------------------------------------------------------------------------------
# API models -> the plan's inputs


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
    progress: ReplicaProgress | None = None
    created: str = ""
    last_error: LastError | None = None
    restarts: int = 0
    lost_mark: bool = False  # annotation orchardist.io/lost: replaced while its Mac was NotReady
    ready_since: datetime | None = None  # its Ready condition's last transition (else its engine's start)

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
    status: ModelDeploymentStatus
    replicas: Sequence[Replica]  # this deployment's
    macs: Sequence[Mac]  # every MacNode, reserved_bytes counting every replica bound there
    pin: Pin | None
    now: str  # RFC 3339, for condition transition times
    resolve_error: str | None = None
    service: Mapping[str, Any] | None = None  # the Service as it is (None: absent)
    slices: Sequence[Mapping[str, Any]] = ()  # our EndpointSlices as they are


def labels_of(obj: ModelReplica | MacNode | ModelDeployment) -> Mapping[str, str]:
    return obj.metadata.get("labels") or {}


def mac_from(node: MacNode, ready: bool, reserved_bytes: int) -> Mac:
    st = node.status
    mem, chip = st.memory, st.chip
    return Mac(
        name=str(node.metadata.get("name") or ""),
        working_set_bytes=(mem.gpu_working_set_bytes or 0) if mem else 0,
        ready=ready,
        chip=(chip.family or chip.name or "") if chip else "",
        total_bytes=(mem.total_bytes or 0) if mem else 0,
        bandwidth=st.memory_bandwidth_bytes_per_second or 0,
        unschedulable=node.spec.unschedulable,
        labels=dict(labels_of(node)),
        taints=tuple(Taint(t.key, t.value, t.effect) for t in node.spec.taints),
        engines={e.name: e.version or "" for e in st.engines},
        cached=frozenset(c.digest for c in st.cached_models),
        address=st.address or "",
        reserved_bytes=reserved_bytes,
    )


def replica_from(r: ModelReplica) -> Replica:
    meta, st = r.metadata, r.status
    labels = labels_of(r)
    return Replica(
        name=str(meta.get("name") or ""),
        node=r.spec.node_name,
        revision=str(labels.get(LABEL_REVISION) or ""),
        phase=st.phase,
        endpoint=st.endpoint,
        reserved_bytes=r.spec.memory_plan.reserved_bytes,
        terminating=bool(meta.get("deletionTimestamp")),
        progress=st.progress,
        created=str(meta.get("creationTimestamp") or ""),
        last_error=st.last_error,
        restarts=st.restarts or 0,
        lost_mark=LOST in (meta.get("annotations") or {}),
        ready_since=next(
            (c.last_transition_time for c in st.conditions if c.type == "Ready" and c.status == "True"),
            st.start_time,
        ),
    )


def reserved_by_node(replicas: Iterable[ModelReplica]) -> dict[str, int]:
    """Working-set bytes held on each Mac by every replica bound there (terminating ones too)."""
    out: dict[str, int] = {}
    for r in replicas:
        node = r.spec.node_name
        out[node] = out.get(node, 0) + r.spec.memory_plan.reserved_bytes
    return out


def belongs_to(r: ModelReplica, namespace: str, deployment: str) -> bool:
    return r.metadata.get("namespace") == namespace and labels_of(r).get(LABEL_DEPLOYMENT) == deployment


# ------------------------------------------------------------------------------------------------
# Names shared by what the plan writes


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
