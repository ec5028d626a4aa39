"""The controller's Prometheus metrics and the agents' scrape targets.

Counters of reconciles and placements are bumped by the reconciler as they happen; the fleet's
gauges (stalled deployments by reason, replicas by phase) are counted at scrape time from the
controller's indexes, so they can never drift from what the controller sees. Every label takes
a value from a short fixed set (condition reasons, phases, results): no names of objects.

The agents are not Pods, so Prometheus cannot find them by itself. The controller lists every
MacNode that reports ``status.address`` and ``status.metricsPort`` in one selector-less Service
(``orchardist-agents-metrics`` in ``orchardist-system``) and its EndpointSlice, which a
ServiceMonitor (or a ``kubernetes_sd_configs`` endpointslice job) reads. A Prometheus built without
Kubernetes discovery (Debian's) reads the same list from ``/sd/agents`` (HTTP service discovery).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, get_args

from aiohttp import web
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from orchardist import log
from orchardist.api.macnode import MacNode
from orchardist.api.modeldeployment import ReplicaPhase
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller.world import LABEL_MANAGED_BY, MANAGED_BY, SLICE_MANAGED_BY, Refused
from orchardist.kube import JSON, SYSTEM_NAMESPACE, Kube, paths

LOG = log.get(__name__)

#: Why a deployment can be Stalled (its Stalled condition's reasons); each is always exported.
STALLED_REASONS = (
    "Unschedulable",
    "ResolveFailed",
    "PullFailed",
    "CrashLoop",
    "DoesNotFit",
    "EngineNotInstalled",
    "EngineArgsRefused",
    "InvalidSpec",
)
OTHER = "Other"
PHASES: tuple[str, ...] = get_args(ReplicaPhase)

AGENTS_SERVICE = "orchardist-agents-metrics"
AGENTS_PORT_NAME = "metrics"
COMPONENT_LABEL = "app.kubernetes.io/component"
AGENTS_COMPONENT = "agent-metrics"


class Index(Protocol):
    """What a kopf index offers (key -> the objects under it)."""

    def items(self) -> Iterable[tuple[Any, Iterable[Any]]]: ...


def _conditions(status: Any) -> list[Any]:
    return list(getattr(status, "conditions", None) or [])


def stalled_reason(deployment: object) -> str | None:
    """The reason a deployment is Stalled (a fixed set; anything else is ``Other``), or None."""
    if isinstance(deployment, Refused):
        return "InvalidSpec"
    for cond in _conditions(getattr(deployment, "status", None)):
        if cond.type == "Stalled" and cond.status == "True":
            return cond.reason if cond.reason in STALLED_REASONS else OTHER
    return None


def fleet_counts(deployments: Index | None, replicas: Index | None) -> tuple[dict[str, int], dict[str, int]]:
    """(stalled deployments by reason, replicas by phase), every known label present (0 if none)."""
    stalled = dict.fromkeys((*STALLED_REASONS, OTHER), 0)
    for _, entries in deployments.items() if deployments is not None else ():
        for md in entries:
            reason = stalled_reason(md)
            if reason is not None:
                stalled[reason] += 1
    phases = dict.fromkeys(PHASES, 0)
    for _, entries in replicas.items() if replicas is not None else ():
        for replica in entries:
            if isinstance(replica, ModelReplica):
                phase = replica.status.phase if replica.status and replica.status.phase else "Pending"
                phases[phase] += 1
    return stalled, phases


class FleetCollector(Collector):
    """The gauges counted at scrape time from the controller's indexes."""

    def __init__(self, indexes: Callable[[], tuple[Index | None, Index | None]]) -> None:
        self.indexes = indexes

    def collect(self) -> Iterator[Metric]:
        stalled, phases = fleet_counts(*self.indexes())
        g = GaugeMetricFamily(
            "orchardist_controller_stalled_deployments",
            "ModelDeployments with Stalled=True, by the condition's reason "
            "(Unschedulable: no Mac can take a replica).",
            labels=["reason"],
        )
        for reason, n in stalled.items():
            g.add_metric([reason], n)
        yield g
        r = GaugeMetricFamily(
            "orchardist_controller_replicas",
            "ModelReplicas by the phase their agent reports.",
            labels=["phase"],
        )
        for phase, n in phases.items():
            r.add_metric([phase], n)
        yield r


class ControllerMetrics:
    """The controller's registry; the reconciler counts into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "orchardist_controller_reconciles",
            "ModelDeployment reconciles finished, by result (success or error).",
            ["result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "orchardist_controller_reconcile_duration_seconds",
            "How long one reconcile took, by result.",
            ["result"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.placements = Counter(
            "orchardist_controller_placements",
            "ModelReplicas created on a Mac by the scheduler.",
            registry=self.registry,
        )
        for result in ("success", "error"):  # both series exist from the start
            self.reconciles.labels(result)
            self.duration.labels(result)

    def watch_fleet(self, indexes: Callable[[], tuple[Index | None, Index | None]]) -> None:
        self.registry.register(FleetCollector(indexes))

    def reconciled(self, ok: bool, seconds: float) -> None:
        result = "success" if ok else "error"
        self.reconciles.labels(result).inc()
        self.duration.labels(result).observe(seconds)

    def placed(self, n: int) -> None:
        if n:
            self.placements.inc(n)


async def serve(
    registry: CollectorRegistry,
    port: int,
    host: str = "0.0.0.0",
    agents: Callable[[], list[tuple[str, str, int]]] | None = None,
) -> web.AppRunner:
    """``/metrics`` on the running loop (scrapes read the indexes between their updates), and with
    ``agents`` the agents' targets at ``/sd/agents`` for a Prometheus without Kubernetes discovery."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    if agents is not None:

        async def discovery(_: web.Request) -> web.Response:
            return web.json_response(http_sd(agents()))

        app.router.add_get("/sd/agents", discovery)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    LOG.info("metrics served", address=f"http://{host}:{port}/metrics")
    return runner


# -- the agents' scrape targets ---------------------------------------------------------------


def agent_targets(nodes: Index | None, *, sliceable: bool = True) -> list[tuple[str, str, int]]:
    """(node, address, port) of every MacNode serving metrics, sorted by node; ``sliceable``: only
    addresses an EndpointSlice may hold (no loopback or link-local)."""
    out = []
    for _, entries in nodes.items() if nodes is not None else ():
        for node in entries:
            if not isinstance(node, MacNode) or node.status is None:
                continue
            address, port = node.status.address, node.status.metrics_port
            if not address or not port:
                continue
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                continue  # an EndpointSlice holds addresses, not names
            if sliceable and (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified):
                continue  # the API server refuses these in a slice
            out.append((str(node.metadata.get("name") or ""), address, port))
    return sorted(out)


def http_sd(targets: list[tuple[str, str, int]]) -> list[JSON]:
    """Prometheus's HTTP service discovery format, one group per Mac. No target labels: the agent's
    samples carry ``node`` themselves (a target label of that name would rename theirs)."""
    return [
        {"targets": [f"[{address}]:{port}" if ":" in address else f"{address}:{port}"], "labels": {}}
        for _, address, port in targets
    ]


def agents_service() -> JSON:
    """The selector-less Service: the controller keeps its EndpointSlice, not the API server."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": AGENTS_SERVICE,
            "namespace": SYSTEM_NAMESPACE,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, COMPONENT_LABEL: AGENTS_COMPONENT},
        },
        "spec": {
            "clusterIP": "None",
            "ports": [{"name": AGENTS_PORT_NAME, "port": 9464, "protocol": "TCP"}],
        },
    }


def agents_slices(targets: list[tuple[str, str, int]]) -> dict[str, JSON]:
    """One EndpointSlice per (address family, port): a slice holds one family and one port set."""
    groups: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for node, address, port in targets:
        family = "IPv6" if ":" in address else "IPv4"
        groups.setdefault((family, port), []).append((node, address))  # node: the sort order
    out = {}
    for (family, port), members in sorted(groups.items()):
        name = f"{AGENTS_SERVICE}-{family.lower()}-{port}"
        out[name] = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": SYSTEM_NAMESPACE,
                "labels": {
                    "kubernetes.io/service-name": AGENTS_SERVICE,
                    SLICE_MANAGED_BY: MANAGED_BY,
                    LABEL_MANAGED_BY: MANAGED_BY,
                },
            },
            "addressType": family,
            "ports": [{"name": AGENTS_PORT_NAME, "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}} for _, address in members],
        }
    return out


class AgentsExposure:
    """Keeps the agents' Service and EndpointSlices equal to the MacNodes' reports (each resync)."""

    def __init__(self, kube: Kube, nodes: Callable[[], Index | None]) -> None:
        self.kube = kube
        self.nodes = nodes
        self._written: dict[str, JSON] | None = None

    async def once(self) -> bool:
        """One pass; True when something was written."""
        nodes = self.nodes()
        if nodes is None:
            return False
        want = agents_slices(agent_targets(nodes))
        if want == self._written:
            return False
        await self.kube.create(paths.service(SYSTEM_NAMESPACE), agents_service())
        found = await self.kube.get(
            paths.endpointslice(SYSTEM_NAMESPACE),
            labelSelector=f"kubernetes.io/service-name={AGENTS_SERVICE},{SLICE_MANAGED_BY}={MANAGED_BY}",
        )
        have = {str(s["metadata"]["name"]) for s in (found or {}).get("items") or []}
        for name, body in want.items():
            if name in have:
                replace = {"endpoints": body["endpoints"], "ports": body["ports"]}
                await self.kube.merge_patch(paths.endpointslice(SYSTEM_NAMESPACE, name), replace)
            else:
                await self.kube.create(paths.endpointslice(SYSTEM_NAMESPACE), body)
        for name in have - set(want):
            await self.kube.delete(paths.endpointslice(SYSTEM_NAMESPACE, name))
        self._written = want
        LOG.info("agents' metrics endpoints", targets=sum(len(s["endpoints"]) for s in want.values()))
        return True

    async def run(self, interval: float) -> None:
        """Until cancelled; a failed pass is logged and the next one tries again."""
        while True:
            started = time.monotonic()
            try:
                await self.once()
            except (ApiException, OSError) as exc:
                self._written = None
                LOG.warning("agents' metrics endpoints not written", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


__all__ = [
    "AgentsExposure",
    "ControllerMetrics",
    "FleetCollector",
    "agent_targets",
    "agents_service",
    "agents_slices",
    "fleet_counts",
    "http_sd",
    "serve",
    "stalled_reason",
]
