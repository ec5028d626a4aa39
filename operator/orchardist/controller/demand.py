"""The gateway's demand signal: one Lease per deployment, watched, read as :class:`Demand`.

The gateway keeps ``<deployment>-demand`` (coordination.k8s.io/v1) in the deployment's namespace,
labelled ``orchardist.io/demand-for=<deployment>``: ``spec.renewTime`` is the last request's time,
the annotations ``orchardist.io/in-flight`` and ``orchardist.io/held`` are counts. This module
watches those Leases (an informer narrowed by the label; the heartbeat Leases of the Macs are a
separate, namespace-narrowed kopf watch, and kopf allows one selector per resource) and triggers a
reconcile of the deployment whenever its demand changes.

Until the first list arrives the demand is unknown (``synced`` is False), so a restarted
controller never takes "not listed yet" for "no requests" and scales to zero by mistake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from orchardist import log
from orchardist.api.modeldeployment import ANNOTATION_HELD, ANNOTATION_IN_FLIGHT, LABEL_DEMAND_FOR
from orchardist.controller.autoscale import Demand
from orchardist.controller.world import parse_time
from orchardist.kube import Api, paths
from orchardist.kube.informer import RELIST, Delivery, Informer, to_queue

LOG = log.get(__name__)
Key = tuple[str, str]


def _count(annotations: Mapping[str, str], key: str) -> int:
    try:
        return max(0, int(annotations.get(key, "0")))
    except ValueError:
        return 0


def parse(lease: Mapping[str, Any]) -> tuple[Key, Demand] | None:
    """The deployment a demand Lease speaks for and what it says (None: not a demand Lease)."""
    meta = lease.get("metadata") or {}
    target = (meta.get("labels") or {}).get(LABEL_DEMAND_FOR)
    namespace = meta.get("namespace")
    if not target or not namespace:
        return None
    notes = meta.get("annotations") or {}
    spec = lease.get("spec") or {}
    demand = Demand(
        in_flight=_count(notes, ANNOTATION_IN_FLIGHT),
        held=_count(notes, ANNOTATION_HELD),
        last_request=parse_time(spec.get("renewTime")),
    )
    return (str(namespace), str(target)), demand


class DemandWatch:
    """Keeps every deployment's demand from the watch and calls ``changed`` when one moves."""

    def __init__(self, api: Api, changed: Callable[[str, str], Coroutine[Any, Any, None]]) -> None:
        self.api = api
        self.changed = changed
        self.synced = False
        self._by_key: dict[Key, Demand] = {}
        self._names: dict[Key, Key] = {}  # (namespace, lease name) -> (namespace, deployment)
        self._informer: Informer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, namespace: str, name: str) -> Demand | None:
        """The deployment's demand; None while unknown. No Lease after the list: no requests yet."""
        if not self.synced:
            return None
        return self._by_key.get((namespace, name), Demand())

    def apply(self, delivery: Delivery) -> set[Key]:
        """Fold one informer delivery in; the deployments whose demand changed."""
        kind, payload = delivery
        before = dict(self._by_key)
        if kind == RELIST:
            self._by_key.clear()
            self._names.clear()
            for lease in payload:
                self._put(lease)
            self.synced = True
        elif kind == "DELETED":
            meta = payload.get("metadata") or {}
            key = self._names.pop((str(meta.get("namespace")), str(meta.get("name"))), None)
            if key is not None:
                self._by_key.pop(key, None)
        else:
            self._put(payload)
        return {k for k in before.keys() | self._by_key.keys() if before.get(k) != self._by_key.get(k)}

    def _put(self, lease: Mapping[str, Any]) -> None:
        parsed = parse(lease)
        if parsed is None:
            return
        key, demand = parsed
        meta = lease.get("metadata") or {}
        self._names[(key[0], str(meta.get("name")))] = key
        self._by_key[key] = demand

    async def run(self) -> None:
        """Watch until cancelled; each change triggers the deployment's reconcile."""
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._informer = Informer(
            self.api,
            paths.lease(""),
            to_queue(asyncio.get_running_loop(), queue),
            query={"labelSelector": LABEL_DEMAND_FOR},
            name="demand-leases",
        )
        self._informer.start()
        try:
            while True:
                moved = self.apply(await queue.get())
                for namespace, name in sorted(moved):
                    LOG.debug("demand changed", namespace=namespace, deployment=name)
                    # Not awaited here: a slow reconcile must not hold back the next delivery.
                    task = asyncio.create_task(self.changed(namespace, name))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            self._informer.stop()
            for task in self._tasks:
                task.cancel()


__all__ = ["DemandWatch", "parse"]
