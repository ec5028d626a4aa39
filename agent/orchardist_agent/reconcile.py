"""The agent's pure decisions: what to do for one ModelReplica, and what its status says.

Everything here is a function of (the replica as the API server holds it, what the agent observes
on the Mac, now): no I/O, so the rules are tested as tables. `replicas.py` is the adapter that
gathers the observations and carries the actions out; `node.py` builds the MacNode's conditions
from the same kind of pure helpers below.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .supervisor.policy import backoff_message, one_line

JSON = dict[str, Any]

#: Replica condition types in the order they are written (the life of a replica).
REPLICA_CONDITIONS = ("Scheduled", "Pulled", "Started", "Ready")

#: A running pull patches its progress at most this often (seconds): enough for a person
#: watching `kubectl get mr -w`, cheap for the API server.
PROGRESS_INTERVAL_S = 1.0


def now_iso(now: datetime | None = None) -> str:
    """RFC 3339 seconds in UTC, the form Kubernetes uses for condition times."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# The replica as the agent reads it


@dataclass(frozen=True)
class ReplicaView:
    """The parts of a ModelReplica object the agent acts on (parsed once from its JSON)."""

    namespace: str
    name: str
    uid: str
    generation: int
    node_name: str
    model: str
    digest: str
    engine: str
    reserved_bytes: int
    engine_version: str | None = None
    deleting: bool = False
    pull_secret: str | None = None
    api_key_secret: tuple[str, str] | None = None
    created: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ReplicaView:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        plan = spec.get("memoryPlan") or {}
        pull = (spec.get("pullSecretRef") or {}).get("name")
        api_key = spec.get("apiKeySecretRef") or {}
        return cls(
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            node_name=str(spec.get("nodeName", "")),
            model=str(spec.get("model", "")),
            digest=str(spec.get("digest", "")),
            engine=str(spec.get("engine") or "vllm-metal"),
            engine_version=str(spec["engineVersion"]) if spec.get("engineVersion") else None,
            reserved_bytes=int(plan.get("reservedBytes") or 0),
            deleting=bool(meta.get("deletionTimestamp")),
            pull_secret=str(pull) if pull else None,
            api_key_secret=(str(api_key["name"]), str(api_key.get("key", "api-key")))
            if api_key.get("name")
            else None,
            created=str(meta.get("creationTimestamp", "")),
        )


# ---------------------------------------------------------------------------------------------
# What the agent observes about one replica


class EngineState(enum.StrEnum):
    """The supervisor's view of one engine process, reduced to what the decision needs."""

    STARTING = "starting"  # process up, health / first completion not yet answered
    READY = "ready"  # answered its health route and one real completion
    BACKOFF = "backoff"  # crashed; waiting to be restarted
    FAILED = "failed"  # gave up (or cannot start at all)
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineView:
    state: EngineState
    port: int | None = None
    pid: int | None = None
    restarts: int = 0
    message: str = ""  # last log lines on a crash, the reason on a failure
    started_at: str | None = None
    measured: Mapping[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # what the driver could not honour (e.g. no --api-key)
    reason: str = ""  # why it FAILED when not a crash (e.g. EngineArgsRefused); default CrashLoop
    retry_in: float | None = None  # BACKOFF: seconds the supervisor waits before the next start
    retry_at: str | None = None  # ... and when that wait ends (RFC 3339)


@dataclass(frozen=True)
class PullView:
    """A pull that is running or has failed (a finished pull shows as `cached`)."""

    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_second: float = 0.0
    error: str | None = None
    retry_due: bool = False  # a failed pull may be tried again now


@dataclass(frozen=True)
class Observed:
    """What the agent knows about one replica's world on this Mac."""

    free_bytes: int  # the node's GPU working set not held by *other* replicas
    reserved: bool = False  # this replica already holds its share of the working set
    cached: bool = False  # its digest is complete in the content store
    pull: PullView | None = None
    engine: EngineView | None = None
    engine_installed: bool = True
    address: str = "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# Actions


class Act(enum.StrEnum):
    RESERVE = "reserve"  # hold reservedBytes of the working set
    PULL = "pull"  # pin the digest and pull it into the store
    START = "start"  # ask the supervisor for the engine
    STOP = "stop"  # stop the engine
    RELEASE = "release"  # unpin the digest and give the memory back
    FORGET = "forget"  # drop all local bookkeeping of the replica (it is gone)


def _running(observed: Observed) -> bool:
    """An engine already runs (adopted after an agent restart): it holds its memory whatever fits."""
    return observed.engine is not None and observed.engine.state != EngineState.STOPPED


def decide(replica: ReplicaView, observed: Observed) -> tuple[Act, ...]:
    """The side effects that move one replica towards serving (or towards gone).

    Level-triggered: called again on every change, it repeats nothing that is already done.
    A replica that does not fit is never reserved, pulled or started; once memory frees up the
    same rule admits it.
    """
    if replica.deleting:
        acts: list[Act] = []
        if observed.engine is not None and observed.engine.state != EngineState.STOPPED:
            acts.append(Act.STOP)
        if observed.reserved or observed.pull is not None or observed.cached:
            acts.append(Act.RELEASE)
        return (*acts, Act.FORGET)
    if not observed.engine_installed:
        return (Act.STOP, Act.RELEASE) if observed.reserved else ()
    acts = []
    if not observed.reserved:
        if replica.reserved_bytes > observed.free_bytes and not _running(observed):
            return ()
        acts.append(Act.RESERVE)
    if not observed.cached:
        if observed.pull is None or (observed.pull.error is not None and observed.pull.retry_due):
            acts.append(Act.PULL)
        return tuple(acts)
    if observed.engine is None or observed.engine.state == EngineState.STOPPED:
        acts.append(Act.START)
    return tuple(acts)


# ---------------------------------------------------------------------------------------------
# Status


@dataclass(frozen=True)
class Cond:
    """A condition without its times: what it says now."""

    type: str
    status: bool
    reason: str
    message: str = ""


#: The API caps condition and lastError messages at 4096 characters; log tails keep their end.
MESSAGE_LIMIT = 4000


def clip(message: str) -> str:
    return message if len(message) <= MESSAGE_LIMIT else "..." + message[-(MESSAGE_LIMIT - 3) :]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _progress(pull: PullView | None) -> JSON | None:
    if pull is None or pull.bytes_total <= 0:
        return None
    rate = max(pull.bytes_per_second, 0.0)
    remaining = max(pull.bytes_total - pull.bytes_done, 0)
    eta = math.ceil(remaining / rate) if rate > 0 else None
    pct = min(100, int(100 * pull.bytes_done / pull.bytes_total))
    out: JSON = {
        "bytesDone": pull.bytes_done,
        "bytesTotal": pull.bytes_total,
        "bytesPerSecond": int(rate),
        "percent": f"{pct}%",
    }
    if eta is not None:
        out["etaSeconds"] = eta
    return out


def desired_status(replica: ReplicaView, observed: Observed) -> tuple[str, list[Cond], JSON]:
    """Phase, conditions and the other status fields the agent reports for one replica.

    The extra fields are written as a merge patch, so a field that no longer applies is `None`
    (merge-patch for "remove").
    """
    scheduled = Cond("Scheduled", True, "Scheduled", f"bound to {replica.node_name}")
    extra: JSON = dict.fromkeys(("endpoint", "lastError", "progress", "message", "nextRestartTime"))
    if replica.deleting:
        return (
            "Terminating",
            [scheduled, Cond("Ready", False, "Terminating", "replica is being deleted")],
            extra,
        )
    if not observed.engine_installed:
        msg = f"engine {replica.engine!r} is not installed on {replica.node_name} (--runtime)"
        extra["lastError"] = {"reason": "EngineNotInstalled", "message": msg}
        extra["message"] = one_line(msg)
        return (
            "Failed",
            [
                Cond("Scheduled", False, "EngineNotInstalled", msg),
                Cond("Ready", False, "EngineNotInstalled", msg),
            ],
            extra,
        )
    if not observed.reserved and replica.reserved_bytes > observed.free_bytes and not _running(observed):
        msg = (
            f"needs {_gib(replica.reserved_bytes)} of the GPU working set; "
            f"{replica.node_name} has {_gib(max(observed.free_bytes, 0))} free"
        )
        extra["lastError"] = {"reason": "DoesNotFit", "message": msg}
        extra["message"] = one_line(msg)
        return (
            "Failed",
            [
                Cond("Scheduled", False, "DoesNotFit", msg),
                Cond("Ready", False, "DoesNotFit", msg),
            ],
            extra,
        )
    conds = [scheduled]
    if not observed.cached:
        pull = observed.pull
        if pull is not None and pull.error is not None:
            err = clip(pull.error)
            extra["lastError"] = {"reason": "PullFailed", "message": err}
            extra["message"] = one_line(err)
            conds += [Cond("Pulled", False, "PullFailed", err)]
            conds += [Cond("Ready", False, "PullFailed", err)]
            return "Pulling", conds, extra
        extra["progress"] = _progress(pull)
        conds += [Cond("Pulled", False, "PullProgressing", f"pulling {replica.digest or replica.model}")]
        conds += [Cond("Ready", False, "PullProgressing", "waiting for the model")]
        return "Pulling", conds, extra
    conds.append(Cond("Pulled", True, "Pulled", f"{replica.digest} is in the content store"))
    engine = observed.engine
    if engine is None or engine.state == EngineState.STOPPED:
        conds += [Cond("Started", False, "Starting", f"starting {replica.engine}")]
        conds += [Cond("Ready", False, "Starting", "engine not started yet")]
        return "Starting", conds, extra
    extra["restarts"] = engine.restarts
    if engine.started_at:
        extra["startTime"] = engine.started_at
    if engine.measured:
        extra["measured"] = dict(engine.measured)
    if engine.state in (EngineState.BACKOFF, EngineState.FAILED):
        msg = clip(engine.message or f"{replica.engine} exited")
        why = engine.reason or "CrashLoop"
        extra["lastError"] = {"reason": why, "message": msg}  # the log tail is kept here only
        failed = engine.state == EngineState.FAILED
        retry = (engine.restarts, engine.retry_in, engine.retry_at)
        line = one_line(msg) if failed else backoff_message(msg, *retry)
        extra["message"], extra["nextRestartTime"] = line, None if failed else engine.retry_at
        conds += [Cond("Started", False, why, line), Cond("Ready", False, why, line)]
        return ("Failed" if failed else "CrashLoopBackOff"), conds, extra
    known = (("pid", engine.pid), ("port", engine.port))  # the pid is unknown until the process runs
    started = replica.engine + "".join(f" {k} {v}" for k, v in known if v is not None)
    if engine.warnings:
        started += "; warning: " + "; ".join(engine.warnings)
    conds.append(Cond("Started", True, "Started", clip(started)))
    if engine.state == EngineState.READY and engine.port is not None:
        endpoint = f"{observed.address}:{engine.port}"
        extra["endpoint"] = endpoint
        conds.append(Cond("Ready", True, "Ready", f"serving at {endpoint}"))
        return "Ready", conds, extra
    conds.append(Cond("Ready", False, "Starting", "waiting for the health route and a first completion"))
    return "Starting", conds, extra


def merge_conditions(
    old: Iterable[Mapping[str, Any]] | None,
    new: Sequence[Cond],
    generation: int,
    now: str,
) -> list[JSON]:
    """Condition dicts for `new`; lastTransitionTime moves only when a status flips.

    Conditions of types not in `new` are kept as they were (another writer's, or ours from an
    earlier phase that is still true history, e.g. Pulled while the engine is starting).
    """
    previous = {str(c.get("type")): dict(c) for c in (old or [])}
    out: dict[str, JSON] = dict(previous)
    for c in new:
        status = "True" if c.status else "False"
        before = previous.get(c.type)
        since = before.get("lastTransitionTime") if before and before.get("status") == status else None
        out[c.type] = {
            "type": c.type,
            "status": status,
            "reason": c.reason,
            "message": c.message,
            "observedGeneration": generation,
            "lastTransitionTime": since or now,
        }
    order = {t: i for i, t in enumerate(REPLICA_CONDITIONS)}
    return sorted(out.values(), key=lambda c: (order.get(str(c["type"]), len(order)), str(c["type"])))


def status_patch(
    replica: ReplicaView,
    observed: Observed,
    current: Mapping[str, Any] | None,
    now: str,
    *,
    with_progress: bool = True,
) -> JSON | None:
    """The merge patch for the replica's status, or None when nothing a reader sees would change.

    `with_progress=False` leaves a running pull's progress out (the caller's throttle says when);
    clearing progress once the pull is over is never held back.
    """
    cur = dict(current or {})
    phase, conds, extra = desired_status(replica, observed)
    merged = merge_conditions(cur.get("conditions"), conds, replica.generation, now)
    patch: JSON = {}
    if cur.get("phase") != phase:
        patch["phase"] = phase
    if cur.get("observedGeneration") != replica.generation:
        patch["observedGeneration"] = replica.generation
    if _strip_times(cur.get("conditions")) != _strip_times(merged):
        patch["conditions"] = merged
    for key, value in extra.items():
        if key == "progress" and value is not None and not with_progress:
            continue
        if value is None and cur.get(key) is None:
            continue
        if cur.get(key) != value:
            patch[key] = value
    return patch or None


#: Reasons a person should notice: their Events are Warnings.
WARNING_REASONS = frozenset(
    {"DoesNotFit", "PullFailed", "CrashLoop", "EngineNotInstalled", "EngineArgsRefused"}
)


def condition_events(
    old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]] | None
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of a Kubernetes Event per condition that flipped or changed reason.

    One Event per distinct (reason, message): Ready=False usually repeats another condition's words.
    """
    before = {str(c.get("type")): (c.get("status"), c.get("reason")) for c in (old or [])}
    out: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for c in new or []:
        reason, message = str(c.get("reason", "")), str(c.get("message", ""))
        if before.get(str(c.get("type"))) == (c.get("status"), c.get("reason")) or (reason, message) in seen:
            continue
        seen.add((reason, message))
        out.append(("Warning" if reason in WARNING_REASONS else "Normal", reason, message))
    return out


def _strip_times(conds: Iterable[Mapping[str, Any]] | None) -> list[JSON]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in (conds or [])]


@dataclass
class ProgressThrottle:
    """Lets a pull's progress through at most once per `interval` seconds (and always at 100 %)."""

    interval: float = PROGRESS_INTERVAL_S
    _last: float = field(default=-math.inf, init=False)

    def due(self, now: float, done: int, total: int) -> bool:
        if (total > 0 and done >= total) or now - self._last >= self.interval:
            self._last = now
            return True
        return False


# ---------------------------------------------------------------------------------------------
# Memory accounting and node conditions


def free_bytes(
    working_set: int, reservations: Mapping[tuple[str, str], int], exclude: tuple[str, str]
) -> int:
    """The working set not held by replicas other than `exclude`."""
    return working_set - sum(v for k, v in reservations.items() if k != exclude)


#: MemoryPressure when replicas hold at least this share of the GPU working set: the planner
#: keeps headroom below gpu-memory-utilization, so a fuller node has no room for another replica.
MEMORY_PRESSURE_FRACTION = 0.95
#: DiskPressure when the store's file system has less than this free (a small model no longer fits).
DISK_PRESSURE_FREE_BYTES = 2 * 2**30


def node_conditions(
    *, working_set: int, allocated: int, store_free: int, store_used: int, store_budget: int | None
) -> list[Cond]:
    """The MacNode's conditions from its numbers (Ready is True while this agent runs)."""
    ready = Cond("Ready", True, "AgentReady", "agent is running and renewing its Lease")
    if working_set > 0 and allocated >= MEMORY_PRESSURE_FRACTION * working_set:
        mem = Cond(
            "MemoryPressure",
            True,
            "WorkingSetFull",
            f"replicas hold {_gib(allocated)} of the {_gib(working_set)} GPU working set",
        )
    else:
        mem = Cond(
            "MemoryPressure",
            False,
            "WorkingSetAvailable",
            f"{_gib(max(working_set - allocated, 0))} of the GPU working set is free",
        )
    if store_free < DISK_PRESSURE_FREE_BYTES:
        disk = Cond(
            "DiskPressure", True, "StoreDiskFull", f"only {_gib(store_free)} free for the model store"
        )
    elif store_budget is not None and store_used > store_budget:
        disk = Cond(
            "DiskPressure",
            True,
            "StoreOverBudget",
            f"the model store holds {_gib(store_used)}, over its budget of {_gib(store_budget)}",
        )
    else:
        disk = Cond("DiskPressure", False, "StoreHasSpace", f"{_gib(store_free)} free for the model store")
    return [ready, mem, disk]
