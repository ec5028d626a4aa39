"""The demand signal for the autoscaler: one Lease per deployment and gateway instance.

Each instance writes only its own ``<name>-demand-<8 hex of its id's SHA-256>`` (so several
instances never overwrite each other's counts; the controller sums them). The Lease
(coordination.k8s.io/v1) in the deployment's namespace carries the labels
``orchardist.io/demand-for=<name>`` and ``orchardist.io/gateway-instance=<the hash>``,
``spec.holderIdentity`` = this gateway instance,
``spec.renewTime`` = the last request's arrival, and the annotations ``orchardist.io/in-flight``
(requests in flight, held ones included) and ``orchardist.io/held`` (requests waiting for a replica).

When a request finds no ready replica and nothing was held yet, the Lease is written at once (the
one signal that starts a replica, however many requests pile up behind it); otherwise changed
values are written at most every :data:`INTERVAL_S`. On a graceful stop the instance deletes its
Leases (:func:`remove`); the controller deletes those a crashed instance left once they are old.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from orchardist import log
from orchardist.api.constants import API_VERSION
from orchardist.api.modeldeployment import (
    ANNOTATION_HELD,
    ANNOTATION_IN_FLIGHT,
    LABEL_DEMAND_FOR,
    LABEL_GATEWAY_INSTANCE,
    demand_lease_name,
    instance_hash,
)
from orchardist.gateway.catalog import Key
from orchardist.kube import JSON, Kube, paths

LOG = log.get(__name__)

# One spelling for both sides: the controller's autoscaler reads what these name.
LABEL = LABEL_DEMAND_FOR
IN_FLIGHT = ANNOTATION_IN_FLIGHT
HELD = ANNOTATION_HELD
INTERVAL_S = 2.0
REMOVE_TIMEOUT_S = 5.0  # a stopping pod has a grace period to share with its requests


@dataclass(frozen=True)
class Demand:
    in_flight: int = 0
    held: int = 0
    last_request: datetime | None = None


def micro_time(when: datetime) -> str:
    """The MicroTime form a Lease's renewTime takes."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(key: Key, demand: Demand, instance: str, owner_uid: str = "") -> JSON:
    """The Lease; owned by its ModelDeployment (when its uid is known), so deleting the deployment
    deletes its demand Leases too (the garbage collector; no reconcile runs for a deleted one)."""
    namespace, name = key
    spec: JSON = {"holderIdentity": instance}
    if demand.last_request is not None:
        spec["renewTime"] = micro_time(demand.last_request)
    meta: JSON = {
        "name": demand_lease_name(name, instance),
        "namespace": namespace,
        "labels": {LABEL: name, LABEL_GATEWAY_INSTANCE: instance_hash(instance)},
        "annotations": {IN_FLIGHT: str(demand.in_flight), HELD: str(demand.held)},
    }
    if owner_uid:
        meta["ownerReferences"] = [
            {"apiVersion": API_VERSION, "kind": "ModelDeployment", "name": name, "uid": owner_uid}
        ]
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


class DemandBoard:
    """Requests in flight and held, per deployment; what changed since the last write."""

    def __init__(self) -> None:
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.demand: dict[Key, Demand] = {}
        self.written: dict[Key, Demand] = {}
        self.urgent = asyncio.Event()

    def _update(self, key: Key, in_flight: int = 0, held: int = 0, arrived: bool = False) -> Demand:
        d = self.demand.get(key, Demand())
        d = replace(
            d,
            in_flight=max(0, d.in_flight + in_flight),
            held=max(0, d.held + held),
            last_request=self.now() if arrived else d.last_request,
        )
        self.demand[key] = d
        return d

    def arrive(self, key: Key) -> None:
        self._update(key, in_flight=1, arrived=True)

    def leave(self, key: Key) -> None:
        self._update(key, in_flight=-1)

    def hold(self, key: Key) -> None:
        """A request waits for a replica; the first one of a wave asks for an immediate write."""
        if self._update(key, held=1).held == 1:
            self.urgent.set()

    def release(self, key: Key) -> None:
        self._update(key, held=-1)

    def held(self, key: Key) -> int:
        return self.demand.get(key, Demand()).held

    def due(self) -> dict[Key, Demand]:
        """What to write: the deployments whose demand differs from what was last written."""
        return {k: d for k, d in self.demand.items() if self.written.get(k) != d}


async def write(kube: Kube, key: Key, demand: Demand, instance: str, owner_uid: str = "") -> None:
    """Create or update one demand Lease (a merge patch; created when missing)."""
    body = lease_body(key, demand, instance, owner_uid)
    path = paths.lease(key[0], demand_lease_name(key[1], instance))
    if await kube.patch_existing(path, body) is None and not await kube.create(paths.lease(key[0]), body):
        await kube.merge_patch(path, body)  # created meanwhile by another writer


async def run(
    kube: Kube,
    board: DemandBoard,
    instance: str,
    interval: float = INTERVAL_S,
    owner: Callable[[Key], str] = lambda key: "",
) -> None:
    """Write due demand until cancelled: at once when urgent, else every ``interval``.
    ``owner``: the uid of a deployment (empty when unknown), the owner of its Leases."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(board.urgent.wait(), interval)
        board.urgent.clear()
        for key, demand in board.due().items():
            try:
                await write(kube, key, demand, instance, owner(key))
                board.written[key] = demand
            except Exception as exc:  # the next round tries again; a lost write is only a late signal
                LOG.warning("demand Lease not written", deployment="/".join(key), error=repr(exc))


async def remove(kube: Kube, keys: Iterable[Key], instance: str, limit_s: float = REMOVE_TIMEOUT_S) -> int:
    """Delete this instance's demand Leases (a graceful stop), within ``limit_s`` seconds; how many went.

    Best effort: what is left (a timeout, an API error) the controller deletes once it is old.
    """
    done = 0

    async def each(key: Key) -> None:
        nonlocal done
        await kube.delete(paths.lease(key[0], demand_lease_name(key[1], instance)))
        done += 1

    try:
        async with asyncio.timeout(limit_s):
            results = await asyncio.gather(*(each(k) for k in set(keys)), return_exceptions=True)
    except TimeoutError:
        results = []
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    LOG.info("demand Leases removed", removed=done, errors=errors[:3])
    return done
