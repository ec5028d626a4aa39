"""The gateways' demand signal: Leases per deployment, watched, read as :class:`Demand` each.

Each gateway instance keeps ``<deployment>-demand-<instance hash>`` (coordination.k8s.io/v1; an
older gateway ``<deployment>-demand``) in the deployment's namespace, labelled
``orchardist.io/demand-for=<deployment>``: ``spec.renewTime`` is the last request's time,
the annotations ``orchardist.io/in-flight`` and ``orchardist.io/held`` are counts. This module
watches those Leases (an informer narrowed by the label; the heartbeat Leases of the Macs are a
separate, namespace-narrowed kopf watch, and kopf allows one selector per resource) and triggers a
reconcile of the deployment whenever its demand changes. The reconcile combines the Leases
(``autoscale.combine``) and, through :meth:`DemandWatch.sweep`, deletes those that expired.

Until the first list arrives the demand is unknown (``synced`` is False), so a restarted
controller never takes "not listed yet" for "no requests" and scales to zero by mistake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from orchardist import log
from orchardist.api.modeldeployment import ANNOTATION_HELD, ANNOTATION_IN_FLIGHT, LABEL_DEMAND_FOR, Scaling
from orchardist.controller.autoscale import Demand, expired
from orchardist.controller.world import parse_time
from orchardist.kube import Api, paths
from orchardist.kube.aio import Kube
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
    """Keeps every demand Lease from the watch and calls ``changed`` when a deployment's moves."""

    def __init__(self, api: Api, changed: Callable[[str, str], Coroutine[Any, Any, None]]) -> None:
        self.api = api
        self.changed = changed
        self.synced = False
        # (namespace, lease name) -> (the deployment it speaks for, what it says, its resourceVersion)
        self._leases: dict[Key, tuple[Key, Demand, str]] = {}
        self._deleting: set[Key] = set()
        self._informer: Informer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, namespace: str, name: str) -> tuple[Demand, ...] | None:
        """The deployment's demand, one entry per gateway Lease (ordered by Lease name); None while
        unknown. No Lease after the list: no requests yet (an empty tuple)."""
        if not self.synced:
            return None
        return tuple(d for _, (k, d, _) in sorted(self._leases.items()) if k == (namespace, name))

    def _by_key(self) -> dict[Key, tuple[Demand, ...]]:
        out: dict[Key, list[Demand]] = {}
        for _, (key, demand, _) in sorted(self._leases.items()):
            out.setdefault(key, []).append(demand)
        return {k: tuple(v) for k, v in out.items()}

    def apply(self, delivery: Delivery) -> set[Key]:
        """Fold one informer delivery in; the deployments whose demand changed."""
        kind, payload = delivery
        before = self._by_key()
        if kind == RELIST:
            self._leases.clear()
            for lease in payload:
                self._put(lease)
            self.synced = True
        elif kind == "DELETED":
            meta = payload.get("metadata") or {}
            self._leases.pop((str(meta.get("namespace")), str(meta.get("name"))), None)
        else:
            self._put(payload)
        after = self._by_key()
        return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}

    def _put(self, lease: Mapping[str, Any]) -> None:
        meta = lease.get("metadata") or {}
        name = (str(meta.get("namespace")), str(meta.get("name")))
        parsed = parse(lease)
        if parsed is None:  # a label removed: no longer a demand Lease
            self._leases.pop(name, None)
            return
        key, demand = parsed
        self._leases[name] = (key, demand, str(meta.get("resourceVersion") or ""))

    def stale(
        self, namespace: str, name: str, scaling: Scaling | None, now: datetime
    ) -> list[tuple[str, str]]:
        """The deployment's demand Leases that can no longer change a decision: (name, resourceVersion)."""
        return [
            (lease, version)
            for (_, lease), (key, demand, version) in sorted(self._leases.items())
            if key == (namespace, name) and expired(demand, scaling, now)
        ]

    async def sweep(self, namespace: str, name: str, scaling: Scaling | None, now: datetime) -> None:
        """Delete the deployment's expired demand Leases (each only as last seen: a Lease renewed
        meanwhile is kept). Best effort; the next reconcile tries again."""
        kube = Kube(self.api)
        for lease, version in self.stale(namespace, name, scaling, now):
            if (namespace, lease) in self._deleting:
                continue
            self._deleting.add((namespace, lease))
            body: dict[str, Any] = {"propagationPolicy": "Background"}
            if version:
                body["preconditions"] = {"resourceVersion": version}
            try:
                await kube.call("DELETE", paths.lease(namespace, lease), body)
                LOG.info("demand Lease expired, deleted", namespace=namespace, deployment=name, lease=lease)
            except ApiException as exc:
                if exc.status not in (404, 409):  # gone already, or renewed since
                    LOG.warning(
                        "demand Lease not deleted", namespace=namespace, lease=lease, status=exc.status
                    )
            except Exception as exc:  # a reconcile must not fail over a cleanup
                LOG.warning("demand Lease not deleted", namespace=namespace, lease=lease, error=repr(exc))
            finally:
                self._deleting.discard((namespace, lease))

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
