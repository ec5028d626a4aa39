"""Replicas on a Mac whose Lease expired are shown Unknown, as the node lifecycle controller marks Pods.

The agent writes a replica's status; a dead agent cannot, and `kubectl get mr` would keep the
``Ready`` it last wrote while nothing serves (the replica's proxy runs in the agent). While the
Mac's Lease is expired the controller sets the replica's ``phase`` to ``Unknown``, its ``Ready``
condition to ``Unknown`` (reason ``NodeNotReady``, the Lease's age in the message) and
``status.message`` to the same line, and clears ``nextRestartTime`` (no restart happens on a Mac
nobody hears from); nothing else. The write carries the replica's ``resourceVersion``, so a status
the agent wrote meanwhile wins. The agent's next write puts its own phase back: it diffs against
the replica as watched, so a phase that is not its own is a change even when its engine's state
did not change. A replica being deleted keeps ``Terminating`` (that is true either way).

:func:`mark` decides for one replica (pure, table-tested); :class:`NodeHealth` writes the marks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchardist.api.modelreplica import ModelReplica

NODE_NOT_READY = "NodeNotReady"
UNKNOWN = "Unknown"


@dataclass(frozen=True, slots=True)
class Mark:
    """The status merge patch for one replica of a NotReady Mac, and the version it replaces."""

    namespace: str
    name: str
    node: str
    resource_version: str | None
    status: dict[str, Any]
    message: str


def mark(replica: ModelReplica, down: Mapping[str, str], now: datetime) -> Mark | None:
    """What to write on ``replica`` given ``down`` (NotReady Mac -> why, in one line); None: nothing."""
    node = replica.spec.node_name
    why = down.get(node)
    meta = replica.metadata
    if why is None or meta.get("deletionTimestamp"):
        return None
    st = replica.status
    if st.phase == UNKNOWN or st.phase == "Terminating":
        return None
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    ready: dict[str, Any] = {
        "type": "Ready",
        "status": UNKNOWN,
        "reason": NODE_NOT_READY,
        "message": why,
        "lastTransitionTime": stamp,
    }
    if st.observed_generation is not None:
        ready["observedGeneration"] = st.observed_generation
    kept = [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in st.conditions]
    conditions = [c for c in kept if c.get("type") != "Ready"] + [ready]
    status: dict[str, Any] = {
        "phase": UNKNOWN,
        "message": why,
        "conditions": conditions,
        "nextRestartTime": None,
    }
    rv = meta.get("resourceVersion")
    return Mark(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        node=node,
        resource_version=str(rv) if rv else None,
        status=status,
        message=why,
    )


def marks(replicas: Iterable[ModelReplica], down: Mapping[str, str], now: datetime) -> list[Mark]:
    """Every replica to mark, in a stable order."""
    if not down:
        return []
    out = [m for r in replicas if (m := mark(r, down, now)) is not None]
    return sorted(out, key=lambda m: (m.namespace, m.name))


__all__ = ["NODE_NOT_READY", "UNKNOWN", "Mark", "mark", "marks"]
