"""What the gateway can route to: the ModelDeployments, their ready replicas and the Macs' speeds.

Objects arrive as the informers deliver them and are parsed here through the API models (an object
that does not parse is skipped with a warning, as the controller would refuse it). The catalog is
plain data; :mod:`.state` feeds it and wakes whoever waits for a replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from orchardist import log
from orchardist.api import MacNode, ModelDeployment, ModelReplica

LOG = log.get(__name__)

#: Set by the controller on a replica whose Mac stopped renewing its Lease: do not route there.
LOST = "orchardist.io/lost"
#: The hold when a deployment declares none (seconds).
DEFAULT_HOLD_S = 300.0

Key = tuple[str, str]


@dataclass(frozen=True)
class Served:
    """A ModelDeployment as the gateway serves it."""

    namespace: str
    name: str
    engine: str
    aliases: tuple[str, ...] = ()
    hold_timeout_s: float = DEFAULT_HOLD_S
    #: (Secret name, key) of the key the replicas' proxies expect, in the deployment's namespace.
    api_key_ref: tuple[str, str] | None = None
    #: The object's uid: the owner of its demand Leases, so they go when it goes.
    uid: str = ""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Upstream:
    """One ready replica: where its engine (or the agent's proxy in front of it) answers."""

    id: str
    address: str
    node: str


@dataclass(frozen=True)
class ReplicaEntry:
    deployment: Key
    upstream: Upstream
    ready: bool


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def parse_deployment(obj: Mapping[str, Any]) -> Served | None:
    """The served view of a ModelDeployment object, or None when it does not parse."""
    try:
        md = ModelDeployment.model_validate(obj)
    except ValidationError as exc:
        LOG.warning("ModelDeployment does not parse; not served", object=_meta(obj), error=str(exc)[:300])
        return None
    namespace, name = _meta(obj)
    spec = md.spec
    scaling = getattr(spec, "scaling", None)
    hold = getattr(scaling, "hold_timeout_seconds", None) if scaling is not None else None
    ref = spec.api_key_secret_ref
    return Served(
        namespace=namespace,
        name=name,
        engine=spec.engine,
        aliases=tuple(getattr(spec, "aliases", None) or ()),
        hold_timeout_s=float(hold) if hold else DEFAULT_HOLD_S,
        api_key_ref=(ref.name, ref.key) if ref is not None else None,
        uid=str((obj.get("metadata") or {}).get("uid") or ""),
    )


def parse_replica(obj: Mapping[str, Any]) -> ReplicaEntry | None:
    """A replica's deployment, address and whether requests may go there."""
    try:
        mr = ModelReplica.model_validate(obj)
    except ValidationError as exc:
        LOG.warning("ModelReplica does not parse; not routed to", object=_meta(obj), error=str(exc)[:300])
        return None
    namespace, name = _meta(obj)
    meta = obj.get("metadata") or {}
    ready = (
        mr.status.phase == "Ready"
        and bool(mr.status.endpoint)
        and not meta.get("deletionTimestamp")
        and LOST not in (meta.get("annotations") or {})
    )
    return ReplicaEntry(
        deployment=(namespace, mr.spec.deployment),
        upstream=Upstream(f"{namespace}/{name}", mr.status.endpoint or "", mr.spec.node_name),
        ready=ready,
    )


def parse_bandwidth(obj: Mapping[str, Any]) -> tuple[str, float | None]:
    """A MacNode's name and memory bandwidth (None when it has not reported one)."""
    _, name = _meta(obj)
    try:
        node = MacNode.model_validate(obj)
    except ValidationError:
        return name, None
    bw = node.status.memory_bandwidth_bytes_per_second
    return name, float(bw) if bw else None


class Catalog:
    """Deployments, replicas and Mac bandwidths, each replaced on relist and updated per event."""

    def __init__(self) -> None:
        self.deployments: dict[Key, Served] = {}
        self.replicas: dict[Key, ReplicaEntry] = {}
        self.bandwidth: dict[str, float] = {}
        #: Bumped on every change that can alter routing (waiters compare it).
        self.version = 0

    # -- feeding -----------------------------------------------------------------------------------
    def apply(self, kind: str, event: str, obj: Any) -> None:
        """One informer delivery (``event`` is "relist" with a list of objects, or a watch event type)."""
        handlers = {"md": self._deployment, "mr": self._replica, "node": self._node}
        handle = handlers[kind]
        if event == "relist":
            stores: dict[str, dict[Any, Any]] = {
                "md": self.deployments,
                "mr": self.replicas,
                "node": self.bandwidth,
            }
            stores[kind].clear()
            for item in obj:
                handle("ADDED", item)
        else:
            handle(event, obj)
        self.version += 1

    def _deployment(self, event: str, obj: Mapping[str, Any]) -> None:
        key = _meta(obj)
        served = None if event == "DELETED" else parse_deployment(obj)
        if served is None:
            self.deployments.pop(key, None)
        else:
            self.deployments[key] = served

    def _replica(self, event: str, obj: Mapping[str, Any]) -> None:
        key = _meta(obj)
        entry = None if event == "DELETED" else parse_replica(obj)
        if entry is None:
            self.replicas.pop(key, None)
        else:
            self.replicas[key] = entry

    def _node(self, event: str, obj: Mapping[str, Any]) -> None:
        name, bw = parse_bandwidth(obj)
        if event == "DELETED" or bw is None:
            self.bandwidth.pop(name, None)
        else:
            self.bandwidth[name] = bw

    # -- reading -----------------------------------------------------------------------------------
    def upstreams(self, deployment: Key) -> list[Upstream]:
        """The ready replicas of a deployment, in a stable order."""
        return sorted(
            (e.upstream for e in self.replicas.values() if e.ready and e.deployment == deployment),
            key=lambda u: u.id,
        )

    def weight(self, node: str) -> float:
        """A Mac's routing weight: its memory bandwidth, or the fleet's mean when it reported none."""
        if node in self.bandwidth:
            return self.bandwidth[node]
        known = list(self.bandwidth.values())
        return sum(known) / len(known) if known else 1.0
