"""A Mac whose agent stopped renewing its Lease is shown NotReady by the controller.

A dead agent cannot say it is dead: its MacNode would keep the ``Ready=True`` it last wrote. As
Kubernetes' node lifecycle controller does for a kubelet (``Ready=Unknown``, NodeStatusUnknown),
the controller sets every condition the agent owns to ``Unknown`` with reason ``LeaseExpired``
once the Lease is older than the grace, and the agent's next status write sets them back. The
controller writes nothing else of a MacNode's status, and only while its Ready condition is True
(or missing): a Ready=False the agent wrote on a clean exit already tells the truth and is kept.
The replicas of every Mac whose Lease expired (whatever its conditions say) are shown ``Unknown``
too (:mod:`orchardist.controller.replicahealth`).

:func:`verdict` decides (pure, table-tested); :class:`NodeHealth` runs it over the controller's
indexes every resync and writes through :class:`orchardist.kube.Kube`, with the MacNode's
``resourceVersion`` as a precondition so a status the agent wrote meanwhile is never overwritten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException

from orchardist import log
from orchardist.api.macnode import MacNode
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller import replicahealth
from orchardist.controller.status import rfc3339
from orchardist.controller.world import lease_ready, parse_time
from orchardist.kube import Kube, paths
from orchardist.kube.events import EventRecorder

LOG = log.get(__name__)

LEASE_EXPIRED = "LeaseExpired"
V = TypeVar("V", covariant=True)


class Index(Protocol[V]):
    """What kopf's index offers: key -> a collection of values."""

    def get(self, key: Any, default: Any = None) -> Any: ...
    def items(self) -> Iterable[tuple[Any, Iterable[V]]]: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """The conditions to write on one MacNode, and the object version they replace."""

    node: str
    resource_version: str | None
    conditions: list[dict[str, Any]]
    message: str


def expiry(node: MacNode, renewed: datetime | None, now: datetime, grace: float) -> tuple[str, float] | None:
    """Since when the Mac's Lease is expired, in words, and that age in seconds; None while fresh.

    Without any renewal, the MacNode's creation time starts the grace (a Mac that registered and
    never heartbeat is as dead as one that stopped).
    """
    if lease_ready(renewed, now, grace):
        return None
    if renewed is not None:
        return f"its agent last renewed the Lease at {rfc3339(renewed)}", (now - renewed).total_seconds()
    created = parse_time(node.metadata.get("creationTimestamp"))
    if created is None or (now - created).total_seconds() <= grace:
        return None
    since = f"its agent has not renewed a Lease since the MacNode was created at {rfc3339(created)}"
    return since, (now - created).total_seconds()


def down(
    nodes: Index[MacNode] | Mapping[str, Iterable[MacNode]],
    leases: Index[datetime | None] | Mapping[str, Iterable[datetime | None]],
    now: datetime,
    grace: float,
) -> dict[str, str]:
    """Every Mac whose Lease expired -> one line for its replicas, with the Lease's age."""
    out = {}
    for name, found in nodes.items():
        renewed = next(iter(leases.get(name, ())), None)
        for node in found:
            expired = expiry(node, renewed, now, grace)
            if expired is not None:
                since, age = expired
                out[str(name)] = f"Mac {name} is NotReady: {since}, {age:.0f} s ago"
    return out


def verdict(node: MacNode, renewed: datetime | None, now: datetime, grace: float) -> Verdict | None:
    """What to write on ``node`` whose Lease was last renewed at ``renewed`` (None: nothing to write)."""
    expired = expiry(node, renewed, now, grace)
    if expired is None:
        return None
    conds = node.status.conditions
    ready = next((c for c in conds if c.type == "Ready"), None)
    if ready is not None and ready.status != "True":
        return None
    since, _ = expired
    message = (
        f"NotReady: {since}, more than {grace:g}s ago (the agent stopped, or cannot reach the API server)"
    )
    stamp = rfc3339(now)
    types = [c.type for c in conds] if ready is not None else ["Ready", *(c.type for c in conds)]
    out = [
        {
            "type": ctype,
            "status": "Unknown",
            "reason": LEASE_EXPIRED,
            "message": message,
            "lastTransitionTime": stamp,
        }
        for ctype in types
    ]
    rv = node.metadata.get("resourceVersion")
    return Verdict(str(node.metadata.get("name") or ""), str(rv) if rv else None, out, message)


def sweep(
    nodes: Index[MacNode] | Mapping[str, Iterable[MacNode]],
    leases: Index[datetime | None] | Mapping[str, Iterable[datetime | None]],
    now: datetime,
    grace: float,
) -> list[Verdict]:
    """Every MacNode to mark, from the controller's indexes (name -> MacNode, name -> renewal)."""
    out = []
    for name, found in nodes.items():
        renewed = next(iter(leases.get(name, ())), None)
        for node in found:
            v = verdict(node, renewed, now, grace)
            if v is not None:
                out.append(v)
    return sorted(out, key=lambda v: v.node)


class NodeHealth:
    """Runs :func:`sweep` every ``interval`` seconds and writes what it decides."""

    def __init__(
        self,
        kube: Kube,
        nodes: Callable[[], Index[MacNode] | None],
        leases: Callable[[], Index[datetime | None] | None],
        grace: float,
        *,
        replicas: Callable[[], Index[ModelReplica] | None] = lambda: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.nodes = nodes
        self.leases = leases
        self.replicas = replicas
        self.grace = grace
        self.clock = clock
        self.events = EventRecorder(kube, "orchardist-controller")
        # Set once the MacNode and Lease indexes are filled: before that, a Lease not listed yet
        # would look expired.
        self.listed = asyncio.Event()

    async def once(self) -> list[str]:
        """One sweep; the names of the MacNodes marked NotReady."""
        nodes, leases = self.nodes(), self.leases()
        if nodes is None or leases is None:
            return []  # not listed yet: "absent" would be a guess
        marked = []
        for v in sweep(nodes, leases, self.clock(), self.grace):
            body: dict[str, Any] = {"status": {"conditions": v.conditions}}
            if v.resource_version:
                body["metadata"] = {"resourceVersion": v.resource_version}
            try:
                node = await self.kube.patch_existing(paths.macnode(v.node, status=True), body)
            except ApiException as exc:
                if exc.status == 409:  # the agent wrote meanwhile: the next sweep sees its status
                    continue
                raise
            if node is None:
                continue
            marked.append(v.node)
            LOG.warning("macnode not ready", node=v.node, message=v.message)
            await self.events.record(node, "Warning", "NodeNotReady", v.message)
        await self.mark_replicas(nodes, leases)
        return marked

    async def mark_replicas(
        self, nodes: Index[MacNode], leases: Index[datetime | None]
    ) -> list[tuple[str, str]]:
        """Replicas of the Macs whose Lease expired shown Unknown; (namespace, name) of those marked."""
        replicas = self.replicas()
        if replicas is None:
            return []
        now = self.clock()
        found = [r for _, rs in replicas.items() for r in rs if isinstance(r, ModelReplica)]
        out = []
        for m in replicahealth.marks(found, down(nodes, leases, now, self.grace), now):
            body: dict[str, Any] = {"status": m.status}
            if m.resource_version:
                body["metadata"] = {"resourceVersion": m.resource_version}
            try:
                obj = await self.kube.patch_existing(
                    paths.modelreplica(m.namespace, m.name, status=True), body
                )
            except ApiException as exc:
                if exc.status == 409:  # its agent wrote meanwhile: that status is the truth
                    continue
                raise
            if obj is None:
                continue
            out.append((m.namespace, m.name))
            LOG.warning("replica unknown", namespace=m.namespace, replica=m.name, node=m.node)
            await self.events.record(obj, "Warning", replicahealth.NODE_NOT_READY, m.message)
        return out

    async def run(self, interval: float) -> None:
        """Until cancelled, once listed; a failed sweep is logged and the next one tries again."""
        await self.listed.wait()
        while True:
            try:
                await self.once()
            except Exception as exc:
                LOG.warning("node health sweep failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval)


__all__ = ["LEASE_EXPIRED", "NodeHealth", "Verdict", "down", "expiry", "sweep", "verdict"]
