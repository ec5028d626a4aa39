"""A ModelDeployment's status from what the controller saw: conditions, phase and counts. Pure.

Conditions follow kstatus: ``Ready`` is what ``kubectl wait --for=condition=Ready`` waits on;
``Reconciling`` is True while the controller is still moving towards the spec; ``Stalled`` is True
when it cannot get there without a person (no Mac fits, the tag does not resolve, a pull or engine
fails); ``Degraded`` is True while some replicas are down. Every condition carries the
``observedGeneration`` it describes and keeps its ``lastTransitionTime`` while its status holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

AS_EXPECTED = "AsExpected"
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Degraded")


@dataclass(frozen=True, slots=True)
class Cond:
    status: bool
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Facts:
    """What the reconcile found, reduced to what the conditions need."""

    desired: int
    existing: int = 0  # replicas not being deleted, wherever they are
    ready: int = 0  # replicas serving (phase Ready on a Ready Mac)
    updated: int = 0  # replicas of the current revision
    updated_ready: int = 0
    old: int = 0  # replicas of an older revision still present
    lost: int = 0  # replicas on Macs that are NotReady
    pulling: int = 0
    starting: int = 0
    pending: int = 0  # bound, but the Mac's agent has not reported yet
    percent: str | None = None  # overall pull progress, "42%"
    digest: str | None = None
    resolve_error: str | None = None  # and no pin to fall back on
    unschedulable: str | None = None
    failures: Sequence[tuple[str, str]] = field(default_factory=tuple)  # (reason, message) of failed replicas
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


def _progress(f: Facts) -> tuple[str, str]:
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


def render(
    conds: Mapping[str, Cond], generation: int, previous: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Conditions as API objects, keeping ``lastTransitionTime`` of those whose status did not change."""
    before = {c.get("type"): c for c in previous}
    out: list[dict[str, Any]] = []
    for ctype in CONDITION_TYPES:
        c = conds[ctype]
        status = "True" if c.status else "False"
        prev = before.get(ctype)
        since = prev.get("lastTransitionTime") if prev and prev.get("status") == status else None
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
