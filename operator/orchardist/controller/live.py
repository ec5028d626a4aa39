"""What a reconcile acts on: the deployment and its replicas read from the API server, not the watch.

The watch may lag behind the API server, and an operator back from standing by (a peering takeover)
holds indexes that were not watched meanwhile: kopf's relist adds and updates objects but never
removes those deleted in between. Before a reconcile writes anything it reads these live (one GET,
one LIST by label; the heartbeat Leases too while they may still be stale) and decides again on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from orchardist.api.constants import API_VERSION
from orchardist.api.modeldeployment import ModelDeployment, ModelDeploymentStatus
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller import world
from orchardist.kube import SYSTEM_NAMESPACE, paths
from orchardist.kube.aio import Kube


@dataclass(frozen=True, slots=True)
class Live:
    status: ModelDeploymentStatus
    replicas: list[ModelReplica]
    renewals: dict[str, datetime | None] = field(default_factory=dict)  # node -> Lease renewal (if read)


async def read(kube: Kube, namespace: str, name: str, generation: int, *, leases: bool) -> Live | None:
    """The deployment's status and replicas now; None when it is gone, going, or at a newer generation
    than the one decided on (that generation's own event reconciles it)."""
    body = await kube.get(paths.modeldeployment(namespace, name))
    md = None if body is None else world.parse_deployment(body)
    if not isinstance(md, ModelDeployment) or md.metadata.get("deletionTimestamp"):
        return None
    if int(md.metadata.get("generation") or 0) != generation:
        return None
    listed = await kube.get(paths.modelreplica(namespace), labelSelector=world.selector(name))
    replicas: list[ModelReplica] = []
    for item in (listed or {}).get("items") or ():
        parsed = world.parse(ModelReplica, {"apiVersion": API_VERSION, "kind": "ModelReplica", **item})
        if not isinstance(parsed, str) and world.belongs_to(parsed, namespace, name):
            replicas.append(parsed)
    renewals: dict[str, datetime | None] = {}
    if leases:
        found = await kube.get(paths.lease(SYSTEM_NAMESPACE))
        for lease in (found or {}).get("items") or ():
            renewals[str((lease.get("metadata") or {}).get("name"))] = world.renewed_at(
                lease.get("spec") or {}
            )
    return Live(md.status, replicas, renewals)


__all__ = ["Live", "read"]
