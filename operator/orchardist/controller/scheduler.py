"""Where replicas go: a pure filter-then-score placement over the MacNodes.

Nothing here talks to Kubernetes or reads the clock. The reconcile plan (``plan.py``) turns MacNodes,
Leases and ModelReplicas into :class:`Mac` values, hands a :class:`Request` with a ``fit`` function
(the memory planner, bound to one deployment's model and options) to :meth:`Fleet.place`, and gets
back bindings with the exact memory plan, or an :class:`Unschedulable` explanation that names the
closest Mac and how many GiB it is short.

Filter: Ready (by Lease), schedulable, taints tolerated, ``nodeSelector``, engine installed, spread
``Required``, and the plan fits the GPU working set left after the replicas already bound there.
Score: model already cached (cache-first), spread, memory left (most free first; spread ``None``
packs onto the fullest Mac that fits), predicted decode tokens/s (memory bandwidth: decoding is
bandwidth-bound). A lazy max-heap keeps placing N replicas at
O(Macs + N log Macs) per deployment, so 10,000 replicas on 1,000 Macs stay well under a second.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

GIB = 1 << 30

Spread = Literal["Preferred", "Required", "None"]

# Score weights: spreading for availability beats the cache, the cache beats memory and speed.
W_SPREAD = 4000.0
W_CACHED = 1000.0
W_PREFER_NO_SCHEDULE = 500.0
W_FREE = 200.0
W_SPEED = 100.0


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True, slots=True)
class Toleration:
    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str | None = None

    def tolerates(self, taint: Taint) -> bool:
        if self.effect and self.effect != taint.effect:
            return False
        if self.operator == "Exists":
            return not self.key or self.key == taint.key
        return self.key == taint.key and self.value == taint.value


def tolerated(taint: Taint, tolerations: Iterable[Toleration]) -> bool:
    return any(t.tolerates(taint) for t in tolerations)


@dataclass(frozen=True, slots=True)
class Mac:
    """One MacNode as the scheduler sees it (``reserved_bytes``: held by replicas already bound)."""

    name: str
    working_set_bytes: int
    ready: bool = True
    chip: str = ""
    total_bytes: int = 0
    bandwidth: int = 0
    unschedulable: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    engines: Mapping[str, str] = field(default_factory=dict)  # engine name -> version
    cached: frozenset[str] = frozenset()
    reserved_bytes: int = 0
    address: str = ""  # status.address: where its agent serves replicas and blobs to peers


@dataclass(frozen=True, slots=True)
class Fit:
    """The memory plan for one replica on one Mac (``plan`` is the replica's spec.memoryPlan)."""

    plan: Mapping[str, Any]
    reserved_bytes: int


@dataclass(frozen=True, slots=True)
class Misfit:
    """Why a replica does not fit: ``what`` reads like "weights need 41.2 GiB" (free: usable there now)."""

    need_bytes: int
    free_bytes: int
    what: str


FitFn = Callable[[Mac, int], Fit | Misfit]


@dataclass(frozen=True, slots=True)
class Request:
    """One deployment's wish: where its replicas may go and the planner that sizes them."""

    engine: str
    fit: FitFn
    digest: str = ""
    engine_version: str | None = None
    weight_bytes: int = 1
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    spread: Spread = "Preferred"
    prefer_cached: bool = True


@dataclass(frozen=True, slots=True)
class Binding:
    node: str
    fit: Fit


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """Why some replicas found no Mac, in words a person can act on."""

    missing: int
    message: str
    closest: str | None = None
    short_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    bindings: tuple[Binding, ...]
    unschedulable: Unschedulable | None = None


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


def _mac_label(mac: Mac) -> str:
    size = f"{round(mac.total_bytes / GIB)} GiB" if mac.total_bytes else gib(mac.working_set_bytes)
    return f"{mac.name} ({mac.chip}, {size})" if mac.chip else f"{mac.name} ({size})"


def filter_reason(mac: Mac, req: Request) -> str | None:
    """Why ``mac`` cannot take any replica of ``req`` regardless of memory, or None."""
    if not mac.ready:
        return "NotReady"
    if mac.unschedulable:
        return "unschedulable"
    for taint in mac.taints:
        if taint.effect != "PreferNoSchedule" and not tolerated(taint, req.tolerations):
            return f"taint {taint.key} not tolerated"
    for key, value in req.node_selector.items():
        if mac.labels.get(key) != value:
            return "not matching nodeSelector"
    version = mac.engines.get(req.engine)
    if version is None:
        return f"without engine {req.engine}"
    if req.engine_version and version != req.engine_version:
        return f"without {req.engine} {req.engine_version}"
    return None


class Fleet:
    """The Macs and what is reserved on each; :meth:`place` binds replicas and books their memory."""

    def __init__(self, macs: Iterable[Mac]) -> None:
        self.macs: dict[str, Mac] = {m.name: m for m in macs}
        self.reserved: dict[str, int] = {m.name: m.reserved_bytes for m in self.macs.values()}

    def free(self, name: str) -> int:
        mac = self.macs[name]
        return max(0, mac.working_set_bytes - self.reserved[name])

    def place(self, req: Request, count: int, existing: Mapping[str, int] | None = None) -> Placement:
        """Bind ``count`` replicas of ``req``; ``existing``: this deployment's replicas per Mac already."""
        if count <= 0:
            return Placement(())
        on_node = dict(existing or {})
        excluded: dict[str, int] = {}
        candidates: list[Mac] = []
        for mac in self.macs.values():
            why = filter_reason(mac, req)
            if why is None and req.spread == "Required" and on_node.get(mac.name, 0) > 0:
                why = "already running a replica (spread Required)"
            if why is None:
                candidates.append(mac)
            else:
                excluded[why] = excluded.get(why, 0) + 1
        top_speed = max((m.bandwidth for m in candidates), default=0) or 1

        def score(mac: Mac) -> float:
            s = 0.0
            if req.spread != "None":
                s -= W_SPREAD * on_node.get(mac.name, 0)
            if req.prefer_cached and req.digest and req.digest in mac.cached:
                s += W_CACHED
            if any(t.effect == "PreferNoSchedule" and not tolerated(t, req.tolerations) for t in mac.taints):
                s -= W_PREFER_NO_SCHEDULE
            if mac.working_set_bytes > 0:  # spread None packs: the fullest Mac that fits wins
                room = W_FREE * self.free(mac.name) / mac.working_set_bytes
                s += -room if req.spread == "None" else room
            s += W_SPEED * mac.bandwidth / top_speed
            return s

        heap = [(-score(m), m.name) for m in candidates]
        heapq.heapify(heap)
        bindings: list[Binding] = []
        misfits: dict[str, Misfit] = {}
        while heap and len(bindings) < count:
            _, name = heapq.heappop(heap)
            mac = self.macs[name]
            outcome = req.fit(mac, self.free(name))
            if isinstance(outcome, Misfit):
                misfits[name] = outcome  # free memory only shrinks during one call: drop the Mac
                continue
            bindings.append(Binding(name, outcome))
            self.reserved[name] += outcome.reserved_bytes
            on_node[name] = on_node.get(name, 0) + 1
            if req.spread != "Required":
                heapq.heappush(heap, (-score(mac), name))
            else:
                why = "already running a replica (spread Required)"
                excluded[why] = excluded.get(why, 0) + 1
        missing = count - len(bindings)
        if missing == 0:
            return Placement(tuple(bindings))
        return Placement(tuple(bindings), self._explain(missing, misfits, excluded))

    def _explain(
        self, missing: int, misfits: Mapping[str, Misfit], excluded: Mapping[str, int]
    ) -> Unschedulable:
        others = ", ".join(
            f"{n} {why}" for why, n in sorted(excluded.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        if misfits:
            name, mis = min(misfits.items(), key=lambda kv: (kv[1].need_bytes - kv[1].free_bytes, kv[0]))
            short = max(0, mis.need_bytes - mis.free_bytes)
            message = (
                f"no Mac fits: closest is {_mac_label(self.macs[name])}: {mis.what}, "
                f"{gib(mis.free_bytes)} free of its working set; short {gib(short)}"
            )
            if others:
                message += f" (other Macs: {others})"
            return Unschedulable(missing, message, name, short)
        if not self.macs:
            return Unschedulable(missing, "no Mac fits: no MacNodes are registered (is an agent running?)")
        return Unschedulable(missing, f"no Mac fits: {len(self.macs)} Macs, {others}")
