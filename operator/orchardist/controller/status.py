"""A ModelDeployment's status from what the controller saw: conditions, phase and counts. Pure.

Conditions follow kstatus: ``Ready`` is what ``kubectl wait --for=condition=Ready`` waits on;
``Reconciling`` is True while the controller is still moving towards the spec; ``Stalled`` is True
when it cannot get there without a person (no Mac fits, the tag does not resolve, a pull fails, an
agent gave a replica up); ``Degraded`` is True while it serves less than it should (replicas down or
on NotReady Macs, ready replicas the Service cannot reach, engines restarting after crashes). Every
condition carries the ``observedGeneration`` it describes and keeps its ``lastTransitionTime`` while
its status holds. ``phase`` is a display word derived from the conditions; nothing decides on it.

A crashing engine is restarted by its agent with a backoff, so a crash is not Stalled (no person is
needed yet): the deployment is Degraded with reason ``CrashLoopBackOff`` from the first crash until
the replica has stayed Ready for ``SETTLE_S``. One Warning when the loop starts, one clear when it
ends, however many crashes (and recoveries) lie between; Ready going True mid-loop posts nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchardist.api.common import Condition
from orchardist.api.modeldeployment import ModelDeploymentStatus
from orchardist.controller.exposure import split_endpoint
from orchardist.controller.outcome import Event
from orchardist.controller.scheduler import Unschedulable
from orchardist.controller.world import Observed, Replica, selector, service_name

AS_EXPECTED = "AsExpected"
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Degraded")
CRASH_LOOP = "CrashLoopBackOff"
#: Seconds a restarted replica must stay Ready before its crash loop counts as over.
SETTLE_S = 120.0


@dataclass(frozen=True, slots=True)
class Cond:
    status: bool
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Facts:
    """What the reconcile found, reduced to what the conditions need."""

    desired: int
    existing: int = 0  # replicas not being deleted (and those created now), wherever they are
    ready: int = 0  # replicas serving (phase Ready on a Ready Mac)
    updated: int = 0  # replicas of the current revision
    updated_ready: int = 0
    old: int = 0  # replicas of an older revision still present
    lost: int = 0  # replicas on NotReady Macs, or back on a Mac while their replacement comes up
    pulling: int = 0
    starting: int = 0
    pending: int = 0  # bound, but the Mac's agent has not reported yet
    percent: str | None = None  # overall pull progress, "42%"
    digest: str | None = None
    resolve_error: str | None = None  # and no pin to fall back on
    unschedulable: str | None = None
    failures: Sequence[tuple[str, str]] = field(default_factory=tuple)  # (reason, message) of failed replicas
    looping: Sequence[str] = field(default_factory=tuple)  # "name on node: error" of crash-looping replicas
    unroutable: Sequence[str] = field(default_factory=tuple)  # ready replicas' endpoints a Service cannot use


def conditions(f: Facts) -> dict[str, Cond]:
    """The four conditions for these facts."""
    short = (f.digest or "")[:19]
    stalled: Cond | None = None
    if f.resolve_error:
        stalled = Cond(True, "ResolveFailed", f.resolve_error)
    elif f.unschedulable:
        stalled = Cond(True, "Unschedulable", f.unschedulable)
    elif f.failures and f.updated_ready < f.desired:
        reason, message = f.failures[0]
        stalled = Cond(True, reason, message)

    if f.desired == 0:
        ready = Cond(True, "ScaledDown", "scaled to 0 replicas: nothing is served")
    elif f.updated_ready >= f.desired:
        ready = Cond(True, "Ready", f"{f.updated_ready}/{f.desired} replicas ready at {short}")
    elif stalled is not None:
        ready = Cond(False, stalled.reason, stalled.message)
    elif f.looping:
        ready = Cond(False, CRASH_LOOP, _looping(f))
    else:
        ready = Cond(False, *_progress(f))

    # Replicas left on NotReady Macs do not keep the deployment "in progress" once replaced: they
    # wait for their Mac to return or be deleted (Degraded says so).
    settled = f.updated_ready >= f.desired and f.old == 0 and f.existing - f.lost == f.desired
    if stalled is not None or settled:
        reconciling = Cond(False, AS_EXPECTED, "" if settled else "waiting for a person (see Stalled)")
    else:
        reconciling = Cond(True, *_progress(f))

    if f.desired > 0 and f.lost:
        tail = (
            "already replaced; removed when their Mac returns or its MacNode is deleted"
            if f.updated_ready >= f.desired
            else "replacing them elsewhere"
        )
        degraded = Cond(
            True, "NodeNotReady", f"{f.lost} replica(s) on Macs that stopped renewing their Lease; {tail}"
        )
    elif f.desired > 0 and f.looping:
        degraded = Cond(True, CRASH_LOOP, _looping(f))
    elif f.desired > 0 and 0 < f.ready < f.desired and f.failures:
        degraded = Cond(True, f.failures[0][0], f"{f.ready}/{f.desired} ready: {f.failures[0][1]}")
    elif f.desired > 0 and 0 < f.ready < min(f.desired, f.existing):
        degraded = Cond(True, "ReplicasDown", f"{f.ready}/{f.desired} replicas ready")
    elif f.unroutable:
        degraded = Cond(
            True,
            "EndpointNotRoutable",
            f"ready but not reachable through the Service: {', '.join(f.unroutable)} (an EndpointSlice takes "
            "only routable IPv4 addresses, not loopback or link-local; start the agent with --address set "
            "to the Mac's LAN address)",
        )
    else:
        degraded = Cond(False, AS_EXPECTED, "")
    return {
        "Ready": ready,
        "Reconciling": reconciling,
        "Stalled": stalled or Cond(False, AS_EXPECTED, ""),
        "Degraded": degraded,
    }


def _looping(f: Facts) -> str:
    more = f" (and {len(f.looping) - 1} more)" if len(f.looping) > 1 else ""
    return f"{f.ready}/{f.desired} ready; engine restarting after crashes: {f.looping[0]}{more}"


def _progress(f: Facts) -> tuple[str, str]:
    if f.looping and not f.old:
        return CRASH_LOOP, _looping(f)
    if f.old:
        return "RollingOut", (
            f"rolling out {(f.digest or 'a new revision')[:19]}: {f.updated}/{f.desired} updated, "
            f"{f.updated_ready} ready, {f.old} old replica(s) left"
        )
    if f.pulling:
        pct = f" ({f.percent})" if f.percent else ""
        return "PullProgressing", f"{f.pulling} replica(s) pulling the model{pct}"
    if f.starting:
        return "Starting", f"{f.starting} replica(s) starting the engine"
    if f.pending:
        return "Scheduled", f"{f.pending} replica(s) bound, waiting for their Mac's agent"
    if f.lost:
        return "NodeNotReady", f"{f.lost} replica(s) on NotReady Macs are being replaced"
    if f.existing > f.desired:
        return "ScaledDown", f"removing {f.existing - f.desired} replica(s)"
    if f.existing < f.desired:
        return "Scheduling", f"{f.existing}/{f.desired} replicas created"
    return "Starting", f"{f.updated_ready}/{f.desired} replicas ready"


def phase(conds: Mapping[str, Cond], f: Facts) -> str:
    """One word for the STATUS column, derived from the conditions (never used to decide anything)."""
    if conds["Ready"].status:
        return "Degraded" if conds["Degraded"].status else "Ready"
    if conds["Stalled"].status:
        return "Degraded" if f.ready else "Failed"
    if conds["Degraded"].status:
        return "Degraded"
    if f.existing == 0 and not f.unschedulable:
        return "Pending"
    return "Progressing"


def summary(conds: Mapping[str, Cond]) -> tuple[str, str]:
    """(reason, message) for the REASON and MESSAGE columns: why it is stuck, else what is missing,
    else how it serves; the message on one line and short enough for a terminal."""
    if conds["Stalled"].status:
        shown = conds["Stalled"]
    elif conds["Degraded"].status:
        shown = conds["Degraded"]
    else:
        shown = conds["Ready"]
    line = " ".join(shown.message.split())
    return shown.reason[:64], (line if len(line) <= 256 else line[:255] + "\u2026")


def rfc3339(when: datetime) -> str:
    """A time as the API server writes it (UTC, whole seconds)."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def render(
    conds: Mapping[str, Cond], generation: int, previous: Sequence[Condition], now: str
) -> list[dict[str, Any]]:
    """Conditions as API objects, keeping ``lastTransitionTime`` of those whose status did not change."""
    before = {c.type: c for c in previous}
    out: list[dict[str, Any]] = []
    for ctype in CONDITION_TYPES:
        c = conds[ctype]
        status = "True" if c.status else "False"
        prev = before.get(ctype)
        kept = prev.last_transition_time if prev is not None and prev.status == status else None
        since = rfc3339(kept) if kept is not None else None
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": c.reason,
                "message": c.message[:4096],
                "lastTransitionTime": since or now,
                "observedGeneration": generation,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# The whole status of one deployment


def _failure(r: Replica) -> tuple[str, str] | None:
    """(reason, message) of a replica its agent gave up on (phase Failed): a person must act."""
    err = r.last_error
    if r.phase == "Failed":
        reason = (err.reason if err else None) or "Failed"
        message = (err.message if err else None) or f"replica {r.name} failed"
        return reason, f"{r.name} on {r.node}: {first_line(message)}"
    return None


def _loop_of(r: Replica, now: datetime | None) -> str | None:
    """Why a replica is in a crash loop: restarted after a crash, and not back (or back for less than
    ``SETTLE_S``; a replica whose Ready time is unknown counts as settled). None when it is not."""
    err = r.last_error
    if r.phase == "Failed" or not r.restarts or err is None:
        return None
    since = r.ready_since
    if r.ready and (since is None or now is None or (now - since).total_seconds() >= SETTLE_S):
        return None
    why = first_line(err.message or err.reason or "exited")
    return f"{r.name} on {r.node}, {r.restarts} restart(s): {why}"


def first_line(text: str, limit: int = 256) -> str:
    """The first non-blank line of a message (a log tail belongs in status, not in one-line displays)."""
    line = next((" ".join(ln.split()) for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def _percent(replicas: Sequence[Replica]) -> str | None:
    done = total = 0
    for r in replicas:
        if r.phase == "Pulling" and r.progress:
            done += r.progress.bytes_done or 0
            total += r.progress.bytes_total or 0
    return f"{100 * done // total}%" if total else None


def report(
    obs: Observed,
    rev: str | None,
    live: Sequence[Replica],
    lost: Sequence[Replica],
    creates: Sequence[Mapping[str, Any]],
    unsched: Unschedulable | None,
    autoscaling: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, list[Event]]:
    """The new status (None when it would not change) and the Events for conditions that changed.

    ``live``: replicas kept, on Ready Macs; ``lost``: replicas held aside on NotReady (or returning)
    Macs; ``creates``: the bodies this reconcile creates; ``autoscaling``: the autoscaler's
    ``status.autoscaling`` (None without spec.scaling: an old one is then removed).
    """
    spec = obs.spec
    updated = [r for r in live if rev is not None and r.revision == rev]
    failures = [f for f in (_failure(r) for r in updated) if f is not None]
    when = _parse(obs.now)
    looping = [m for m in (_loop_of(r, when) for r in updated) if m is not None]
    facts = Facts(
        desired=spec.replicas,
        existing=len(live) + len(lost) + len(creates),
        ready=sum(r.ready for r in live),
        updated=len(updated) + len(creates),
        updated_ready=sum(r.ready for r in updated),
        old=len(live) - len(updated) if rev is not None else 0,
        lost=len(lost),
        pulling=sum(r.phase == "Pulling" for r in updated),
        starting=sum(r.phase == "Starting" for r in updated),
        pending=sum(r.phase in (None, "Pending") for r in updated) + len(creates),
        percent=_percent(updated),
        digest=obs.pin.digest if obs.pin else None,
        resolve_error=obs.resolve_error if obs.pin is None else None,
        unschedulable=unsched.message if unsched else None,
        failures=tuple(failures),
        looping=tuple(looping),
        unroutable=tuple(
            f"{r.name} at {r.endpoint}" for r in updated if r.ready and split_endpoint(r.endpoint) is None
        ),
    )
    conds = conditions(facts)
    previous = obs.status.conditions
    summaries = [
        {
            k: v
            for k, v in {
                "name": r.name,
                "nodeName": r.node,
                "phase": r.phase or "Pending",
                "endpoint": r.endpoint,
                "progress": r.progress.to_json() if r.progress else None,
            }.items()
            if v is not None
        }
        for r in [*live, *lost]
    ] + [
        {"name": c["metadata"]["name"], "nodeName": c["spec"]["nodeName"], "phase": "Pending"}
        for c in creates
    ]
    reason, message = summary(conds)
    new: dict[str, Any] = {
        "observedGeneration": obs.generation,
        "phase": phase(conds, facts),
        "reason": reason,
        "message": message,
        "replicas": facts.existing,
        "readyReplicas": facts.ready,
        "updatedReplicas": facts.updated,
        "ready": f"{facts.ready}/{spec.replicas}",
        "selector": selector(obs.name),
        "replicaStatuses": sorted(summaries, key=lambda s: s["name"]),
    }
    if facts.ready:  # the Service serves only while a replica is ready: name it only then
        new["endpoint"] = f"{service_name(obs)}.{obs.namespace}.svc:{spec.service.port}"
    elif obs.status.endpoint is not None:
        new["endpoint"] = None  # a merge patch with null deletes it
    if obs.pin is not None:
        new["resolvedDigest"] = obs.pin.digest
        new["resolvedModel"] = obs.pin.model
        new["modelProfile"] = {k: v for k, v in obs.pin.profile.items() if v is not None}
    else:  # keep the last pin on display while the tag does not resolve
        kept = obs.status.to_json()
        for key in ("resolvedDigest", "resolvedModel", "modelProfile"):
            if key in kept:
                new[key] = kept[key]
    if autoscaling is not None:
        new["autoscaling"] = dict(autoscaling)
    elif obs.status.autoscaling is not None:
        new["autoscaling"] = None  # scaling removed from spec: a merge patch with null deletes it
    new["conditions"] = render(conds, obs.generation, previous, obs.now)
    events = _condition_events(conds, previous)
    return (None if _same(obs.status, new) else new), events


def _parse(now: str) -> datetime | None:
    try:
        return datetime.fromisoformat(now.replace("Z", "+00:00"))
    except ValueError:
        return None


def _condition_events(conds: Mapping[str, Cond], previous: Sequence[Condition]) -> list[Event]:
    """One Event per condition that changed: Ready in Normal, Stalled/Degraded as Warnings and clears.

    Ready coming back inside a crash loop says nothing: Degraded's clear tells when the loop ended.
    Messages are one line (the full text stays in the conditions)."""
    before = {c.type: c for c in previous}
    events: list[Event] = []
    for ctype in ("Ready", "Stalled", "Degraded"):
        c, prev = conds[ctype], before.get(ctype)
        was = (prev.status, prev.reason) if prev is not None else (None, None)
        if ("True" if c.status else "False", c.reason) == was:
            continue
        if ctype == "Ready" and c.status:
            if not (conds["Degraded"].status and conds["Degraded"].reason == CRASH_LOOP):
                events.append(Event("Normal", c.reason, first_line(c.message, 1024)))
        elif ctype != "Ready" and c.status:
            events.append(Event("Warning", c.reason, first_line(c.message, 1024)))
        elif ctype != "Ready" and was[0] == "True":
            line = first_line(conds["Ready"].message, 1024)
            events.append(Event("Normal", f"{ctype}Cleared", f"{ctype} cleared: {line}"))
    return events


def _same(have: ModelDeploymentStatus, want: Mapping[str, Any]) -> bool:
    """Whether writing ``want`` would change nothing but condition transition times."""

    def strip(s: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in s.items() if k in want}
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or ()
        ]
        return out

    return strip(have.to_json()) == strip(want)
