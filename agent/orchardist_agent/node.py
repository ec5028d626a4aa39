"""The agent's MacNode and Lease: register, heartbeat, and keep the node's status current.

Calls go through the shared async adapter (:class:`orchardist.kube.Kube`: raw JSON over the official
client's connection; the typed APIs would cost the Mac ~20 MB of RSS). Bodies the server returns
are read through :class:`orchardist.api.macnode.MacNode`.

Ownership (docs/architecture.md): the agent writes only its MacNode's status (never spec or
labels, which are the user's), its Lease, and the status of replicas bound to it. It creates its
MacNode with no spec, so it owns no spec field a user's server-side apply could conflict with, and
writes the status by server-side apply as ``orchardist-agent``: the API server records no owner
for later writes to an object whose creator owned nothing, until one of them is an apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from orchardist import __version__, log
from orchardist.api.constants import API_VERSION
from orchardist.api.macnode import MacNode
from orchardist.kube import AGENT, SYSTEM_NAMESPACE, Kube, paths

from .host.facts import display_gi
from .reconcile import JSON, merge_conditions, node_conditions, now_iso

LOG = log.get(__name__)

LEASE_DURATION_S = 40


def micro_time(now: datetime | None = None) -> str:
    """The MicroTime form Leases use."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def discover_address() -> str:
    """The address other machines reach this Mac at: the source address of the default route.

    A UDP connect sends nothing; it only asks the kernel for the route. Without a route (a
    laptop offline, a CI box) the loopback address is the honest answer.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
    return addr if addr and not addr.startswith("0.") else "127.0.0.1"


def status_of(obj: Mapping[str, Any]) -> JSON:
    """A MacNode's status as the server holds it, read through the model (fields it sent only)."""
    try:
        node = MacNode.model_validate(obj)
    except ValidationError as exc:  # written by another version: this agent writes it whole again
        LOG.warning("macnode status not understood", errors=exc.error_count())
        return {}
    out: JSON = node.status.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return out


@dataclass
class NodeState:
    """What the node loop reports beyond the host facts; the replica loop keeps it current."""

    allocated_bytes: int = 0
    cached_models: list[JSON] = field(default_factory=list)
    store: JSON = field(default_factory=dict)  # usedBytes/freeBytes/budgetBytes from the content store


class NodeAgent:
    """Registers the MacNode, keeps its status current and renews its Lease."""

    def __init__(
        self,
        kube: Kube,
        name: str,
        facts: Callable[[], JSON],
        *,
        address: str,
        heartbeat_interval: float = 10.0,
        facts_interval: float | None = None,
    ) -> None:
        self.kube = kube
        self.name = name
        self.facts = facts
        self.address = address
        self.heartbeat_interval = heartbeat_interval
        # Host facts (free disk, runtimes) move slowly: every 6 heartbeats, 60 s by default.
        self.facts_interval = (
            facts_interval if facts_interval is not None else max(6 * heartbeat_interval, 5.0)
        )
        self.state = NodeState()
        self._host: JSON = {}
        self._status: JSON = {}  # as the server last returned it
        self._sent: JSON = {}  # as this agent last wrote it
        self._changed = asyncio.Event()
        self._lease_ok = False

    # -- MacNode ---------------------------------------------------------------------------

    async def _ensure_macnode(self) -> JSON:
        node = await self.kube.get(paths.macnode(self.name))
        if node is not None:
            return node
        body = {"apiVersion": API_VERSION, "kind": "MacNode", "metadata": {"name": self.name}}
        if await self.kube.create(paths.macnode(), body):
            LOG.info("macnode created", node=self.name)
        node = await self.kube.get(paths.macnode(self.name))
        if node is None:
            raise LookupError(f"MacNode {self.name} vanished right after it was created")
        return node

    def working_set(self) -> int:
        return int((self._host.get("memory") or {}).get("gpuWorkingSetBytes") or 0)

    def compose_status(self, current: JSON | None, now: str) -> JSON:
        """The full status the agent owns, from host facts + what the replica loop reports."""
        host = dict(self._host)
        memory = dict(host.get("memory") or {})
        memory["allocatedBytes"] = self.state.allocated_bytes
        # Display strings beside the numbers (ALLOCATED and FREE in `kubectl get mn`).
        memory["allocated"] = display_gi(self.state.allocated_bytes)
        working_set = memory.get("gpuWorkingSetBytes")
        if working_set is not None:
            memory["free"] = display_gi(max(int(working_set) - self.state.allocated_bytes, 0))
        store = {**(host.get("modelStore") or {}), **self.state.store}
        budget = store.get("budgetBytes")
        conds = node_conditions(
            working_set=int(memory.get("gpuWorkingSetBytes") or 0),
            allocated=self.state.allocated_bytes,
            store_free=int(store.get("freeBytes") or 0),
            store_used=int(store.get("usedBytes") or 0),
            store_budget=int(budget) if budget is not None else None,
        )
        status: JSON = {
            **host,
            "memory": memory,
            "modelStore": store,
            "cachedModels": list(self.state.cached_models),
            "address": self.address,
            "agentVersion": __version__,
        }
        status["conditions"] = merge_conditions((current or {}).get("conditions"), conds, 0, now)
        for c in status["conditions"]:
            c.pop("observedGeneration", None)
        return status

    async def _push_status(self, force: bool = False) -> None:
        status = self.compose_status(self._status, now_iso())
        if not force and _without_times(status) == _without_times(self._sent):
            return
        # The whole status, applied: fields this agent applied before and left out now are removed.
        # Forced: the status is the agent's alone (the controller marks a dead Mac's Ready only).
        body = {
            "apiVersion": API_VERSION,
            "kind": "MacNode",
            "metadata": {"name": self.name},
            "status": status,
        }
        path = paths.macnode(self.name, status=True)
        node = await self.kube.apply_existing(path, body, manager=AGENT, force=True)
        if node is None:
            LOG.warning("macnode vanished; registering it again", node=self.name)
            await self._ensure_macnode()
            node = await self.kube.apply(path, body, manager=AGENT, force=True)
        self._status = status_of(node) or status
        self._sent = status

    async def register(self, host: JSON | None = None) -> None:
        """Create the MacNode if missing, take the Lease, then write the whole status.

        The Lease first: a MacNode that says Ready has a fresh Lease behind it.
        """
        self._host = host if host is not None else await asyncio.to_thread(self.facts)
        self._status = status_of(await self._ensure_macnode())
        await self.renew_lease()
        await self._push_status(force=True)
        LOG.info("macnode registered", node=self.name, address=self.address)

    def set_store(self, *, used: int, free: int, budget: int) -> None:
        """The content store's own numbers (more exact than the probe's disk view)."""
        self.state.store = {"usedBytes": used, "freeBytes": free, "budgetBytes": budget}

    def changed(self) -> None:
        """The replica loop changed allocated memory or cached models: patch soon."""
        self._changed.set()

    # -- Lease -----------------------------------------------------------------------------

    async def _ensure_namespace(self) -> None:
        try:
            if await self.kube.get(paths.namespace(SYSTEM_NAMESPACE)) is not None:
                return
        except ApiException as exc:
            if exc.status == 403:
                return  # not allowed to look: assume an administrator created it
            raise
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}}
        try:
            if await self.kube.create(paths.namespace(), body):
                LOG.info("namespace created", namespace=SYSTEM_NAMESPACE)
        except ApiException as exc:
            if exc.status != 403:
                raise

    async def renew_lease(self) -> None:
        now = micro_time()
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": now}
        path = paths.lease(SYSTEM_NAMESPACE, self.name)
        if self._lease_ok and await self.kube.patch_existing(path, {"spec": spec}) is not None:
            return
        self._lease_ok = False
        await self._ensure_namespace()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": SYSTEM_NAMESPACE},
            "spec": {**spec, "acquireTime": now},
        }
        if not await self.kube.create(paths.lease(SYSTEM_NAMESPACE), body):
            await self.kube.merge_patch(path, {"spec": spec})
        self._lease_ok = True

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat until `stop`; refresh host facts now and then; patch status on changes."""
        loop = asyncio.get_running_loop()
        next_facts = loop.time() + self.facts_interval
        next_beat = loop.time() + (self.heartbeat_interval if self._lease_ok else 0.0)
        behind = False  # a heartbeat failed: the next one writes the whole status
        while not stop.is_set():
            now = loop.time()
            try:
                force = False
                if now >= next_beat:
                    # A heartbeat this late (paused, or the API server away) may have let the Lease
                    # expire, and the controller then wrote Ready=Unknown: write the whole status.
                    force = behind or now - next_beat > self.heartbeat_interval
                    await self.renew_lease()
                    next_beat = now + self.heartbeat_interval
                if now >= next_facts:
                    # Now and then the whole status is written even if unchanged: this repairs a
                    # MacNode deleted (or edited) behind the agent's back.
                    self._host = await asyncio.to_thread(self.facts)
                    next_facts = now + self.facts_interval
                    force = True
                self._changed.clear()
                await self._push_status(force)
                behind = False
            except Exception as exc:  # the API server may be away for a while: keep trying
                behind = True
                LOG.warning("heartbeat failed", node=self.name, error=str(exc))
                next_beat = min(next_beat, loop.time() + 2.0)
            wake = min(next_beat, next_facts) - loop.time()
            with contextlib.suppress(TimeoutError):
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._changed.wait())]
                try:
                    await asyncio.wait(waiters, timeout=max(wake, 0.0), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()

    async def mark_stopped(self) -> None:
        """On a clean exit: say so in the Ready condition (the Lease will expire by itself)."""
        status = self.compose_status(self._status, now_iso())
        for c in status["conditions"]:
            if c["type"] == "Ready":
                c.update(
                    status="False",
                    reason="AgentStopped",
                    message="the agent exited",
                    lastTransitionTime=now_iso(),
                )
        await self.kube.patch_existing(
            paths.macnode(self.name, status=True), {"status": {"conditions": status["conditions"]}}
        )


def _without_times(status: Mapping[str, Any]) -> JSON:
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []
    ]
    return out
