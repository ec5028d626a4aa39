"""The autoscaler's decision: how many replicas a deployment with ``spec.scaling`` should run.

Pure: (scaling, starting count, last decision, demand, ready replicas, now) -> a :class:`Decision`.
The count goes to ``status.autoscaling.desiredReplicas`` and the reconcile uses it in place of
``spec.replicas``, which stays as the user wrote it (GitOps shows no drift).

The shape follows the HorizontalPodAutoscaler's, for requests in flight instead of CPU:

- the raw recommendation is ``ceil(inFlight / targetInFlight)`` (in flight counts the held
  requests too), at least 1 while the
  deployment is not idle, clamped into ``[minReplicas, maxReplicas]``;
- stabilization: a scale-up goes to the lowest recommendation of the up window, a scale-down to
  the highest of the down window (a recommendation counts while it was current within the window);
- from zero, anything held starts exactly one replica at once, and nothing more is added while no
  replica is ready: N requests held at once cause one start, not N;
- with ``minReplicas`` 0, no request for ``idleTimeoutSeconds`` (and none in flight or held)
  goes to zero at once; the idle timeout is that step's window.

Demand that is not known yet (the demand watch has not listed) changes nothing; counts a dead
gateway left behind expire (held after the hold timeout, in flight after an hour or the idle
timeout, whichever is longer, since the last request).

Each gateway instance writes its own demand Lease; :func:`combine` judges each one's counts on its
own (a dead instance's stale count never rides on a live one's last request), then sums them and
keeps the latest request. :func:`expired` names the Leases that can no longer change a decision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from orchardist.api.modeldeployment import Autoscaling, ModelDeployment, Scaling

#: Reasons that moved the count; while the count stays, the last of them remains the reason shown.
_CHANGES = frozenset({"Starting", "ScaleFromZero", "ScaleUp", "ScaleDown", "Idle", "Limits"})
STALE_IN_FLIGHT_S = 3600  # an in-flight count this long after the last request is a dead gateway's
HOLD_SLACK_S = 10  # the gateway writes its Lease at most every few seconds
MAX_HISTORY = 64  # recommendations kept at most (status.autoscaling.recommendations' maxItems)
EXPIRE_MIN_S = 600  # a demand Lease with no load is deleted after 2x the idle timeout, at least this
DEFAULT_HOLD_S, DEFAULT_IDLE_S = 300, 600  # spec.scaling's defaults, for deployments without it


@dataclass(frozen=True)
class Demand:
    """What a gateway's demand Lease says about a deployment (or, combined, all of them)."""

    in_flight: int = 0
    held: int = 0
    last_request: datetime | None = None


@dataclass(frozen=True)
class Decision:
    """The count to run, why, and what the next decision needs to remember."""

    desired: int
    reason: str
    message: str
    last_scale_time: datetime
    recommendations: tuple[tuple[int, datetime], ...] = ()
    previous: int | None = None  # the count before: the last decision's, or the starting count
    # The demand as status shows it: the last known one while the watch has not listed yet.
    in_flight: int = 0
    held: int = 0
    last_request: datetime | None = None

    @property
    def changed(self) -> bool:
        """Whether the count differs from the last decision (an Event says so)."""
        return self.previous is not None and self.previous != self.desired

    def status(self) -> dict[str, Any]:
        """``status.autoscaling`` as the API server stores it."""
        out: dict[str, Any] = {
            "desiredReplicas": self.desired,
            "reason": self.reason,
            "message": self.message,
            "lastScaleTime": _rfc3339(self.last_scale_time),
            "recommendations": [{"replicas": n, "time": _rfc3339(t)} for n, t in self.recommendations],
            "inFlight": self.in_flight,
            "held": self.held,
        }
        if self.last_request is not None:
            out["lastRequestTime"] = _rfc3339(self.last_request)
        return out


@dataclass(frozen=True)
class _Window:
    up: list[int] = field(default_factory=list)
    down: list[int] = field(default_factory=list)


def _rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _clamp(n: int, scaling: Scaling) -> int:
    return max(scaling.min_replicas, min(scaling.max_replicas, n))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _windows(history: tuple[tuple[int, datetime], ...], now: datetime, up_s: int, down_s: int) -> _Window:
    """The recommendations current at some moment of each window (an entry lasts until the next)."""
    out = _Window()
    for i, (n, _) in enumerate(history):
        until = history[i + 1][1] if i + 1 < len(history) else now
        if until >= now - timedelta(seconds=up_s) and (up_s > 0 or i + 1 == len(history)):
            out.up.append(n)
        if until >= now - timedelta(seconds=down_s) and (down_s > 0 or i + 1 == len(history)):
            out.down.append(n)
    return out


def _remember(
    history: tuple[tuple[int, datetime], ...], raw: int, now: datetime, keep_s: int
) -> tuple[tuple[int, datetime], ...]:
    """The history with ``raw`` recorded (only when it changed), minus what no window covers."""
    entries = list(history)
    if not entries or entries[-1][0] != raw:
        entries.append((raw, now))
    horizon = now - timedelta(seconds=keep_s)
    kept = [e for i, e in enumerate(entries) if i + 1 == len(entries) or entries[i + 1][1] >= horizon]
    return tuple(kept[-MAX_HISTORY:])


def _live_load(demand: Demand, scaling: Scaling, since_request_s: float | None) -> int:
    """Requests in flight (held ones included) that can still be waiting, from what the Lease says.

    Counts left behind by a gateway that died are not demand: no request is held longer than the
    hold timeout (the gateway answers 503 then), and none is counted in flight past
    ``STALE_IN_FLIGHT_S`` (or the idle timeout, if longer) since the last request arrived.
    """
    if since_request_s is None:
        return max(demand.in_flight, demand.held)
    held = demand.held if since_request_s <= scaling.hold_timeout_seconds + HOLD_SLACK_S else 0
    fresh = since_request_s <= max(STALE_IN_FLIGHT_S, scaling.idle_timeout_seconds)
    return max(demand.in_flight if fresh else 0, held)


def _timeouts(scaling: Scaling | None) -> tuple[int, int]:
    if scaling is None:
        return DEFAULT_HOLD_S, DEFAULT_IDLE_S
    return scaling.hold_timeout_seconds, scaling.idle_timeout_seconds


def live(demand: Demand, scaling: Scaling | None, now: datetime) -> Demand:
    """What one gateway's Lease still counts at ``now`` (in flight includes held, as the gateway counts).

    The counts of a Lease nobody renews expire as :func:`_live_load` says, judged by this Lease's own
    last request; a Lease without one (never renewed) counts as written.
    """
    if demand.last_request is None:
        return Demand(max(demand.in_flight, demand.held), demand.held, None)
    hold_s, idle_s = _timeouts(scaling)
    since = (now - demand.last_request).total_seconds()
    held = demand.held if since <= hold_s + HOLD_SLACK_S else 0
    in_flight = demand.in_flight if since <= max(STALE_IN_FLIGHT_S, idle_s) else 0
    return Demand(max(in_flight, held), held, demand.last_request)


def combine(demands: Iterable[Demand], scaling: Scaling | None, now: datetime) -> Demand:
    """One deployment's demand over all its gateways' Leases: live counts summed, the latest request."""
    lives = [live(d, scaling, now) for d in demands]
    times = [d.last_request for d in lives if d.last_request is not None]
    return Demand(
        in_flight=sum(d.in_flight for d in lives),
        held=sum(d.held for d in lives),
        last_request=max(times) if times else None,
    )


def expired(demand: Demand, scaling: Scaling | None, now: datetime) -> bool:
    """Whether a demand Lease can be deleted: no live load and its last request older than
    2x the idle timeout (at least :data:`EXPIRE_MIN_S`). A Lease with no request time is kept
    (its age is unknown)."""
    if demand.last_request is None:
        return False
    bound = max(EXPIRE_MIN_S, 2 * _timeouts(scaling)[1])
    if (now - demand.last_request).total_seconds() <= bound:
        return False
    gone = live(demand, scaling, now)
    return gone.in_flight == 0 and gone.held == 0


def _history(previous: Autoscaling | None) -> tuple[tuple[int, datetime], ...]:
    if previous is None:
        return ()
    return tuple((r.replicas, r.time) for r in previous.recommendations)


def decide(
    scaling: Scaling,
    start: int,
    previous: Autoscaling | None,
    demand: Demand | None,
    ready: int,
    now: datetime,
) -> Decision:
    """How many replicas to run now, and why.

    ``start``: ``spec.replicas``, the count before any decision; ``previous``: the last decision as
    status holds it; ``demand``: None while unknown; ``ready``: replicas serving now.
    """
    now = now.replace(microsecond=0)
    first = previous is None or previous.desired_replicas is None
    if previous is None or previous.desired_replicas is None:
        before, last_scale = None, now
        current = _clamp(start, scaling)
    else:
        before, last_scale = previous.desired_replicas, previous.last_scale_time or now
        current = _clamp(before, scaling)  # the limits may have changed since
    history = _history(previous)
    # A request time, once seen, stays a fact even if the Lease goes (a gateway reinstalled).
    last_request = (demand.last_request if demand is not None else None) or (
        previous.last_request_time if previous is not None else None
    )
    shown = demand or Demand(
        in_flight=(previous.in_flight or 0) if previous is not None else 0,
        held=(previous.held or 0) if previous is not None else 0,
    )

    def decision(desired: int, reason: str, message: str, recs: tuple[tuple[int, datetime], ...]) -> Decision:
        return Decision(
            desired=desired,
            reason=reason,
            message=message,
            last_scale_time=now if desired != (before if before is not None else current) else last_scale,
            recommendations=recs,
            previous=before if before is not None else current,
            in_flight=shown.in_flight,
            held=shown.held,
            last_request=last_request.replace(microsecond=0) if last_request is not None else None,
        )

    if demand is None:
        why = previous.reason if previous is not None and previous.reason else "Starting"
        return decision(current, why, "waiting for the gateway's demand signal", history)

    last_activity = max(last_request or last_scale, last_scale)
    quiet_s = (now - last_activity).total_seconds()
    load = _live_load(demand, scaling, (now - last_request).total_seconds() if last_request else None)
    idle = load == 0 and quiet_s >= scaling.idle_timeout_seconds

    if current == 0:
        raw = 1 if load > 0 else 0  # one start however many are held; more once it serves
    elif idle:
        raw = 0
    elif ready == 0:
        raw = current  # replicas are starting: wait for them before judging the load
    else:
        raw = max(1, math.ceil(load / scaling.target_in_flight))
    raw = _clamp(raw, scaling)
    keep_s = max(scaling.scale_up_stabilization_seconds, scaling.scale_down_stabilization_seconds)
    recs = _remember(history, raw, now, keep_s)

    if current == 0 and raw > 0 and load > 0:
        return decision(
            raw,
            "ScaleFromZero",
            f"{_plural(demand.held, 'request')} held and no replica: starting {raw}",
            recs,
        )
    if idle and raw == 0 and current > 0:
        return decision(
            0, "Idle", f"no request for {int(quiet_s)}s (idle timeout {scaling.idle_timeout_seconds}s)", recs
        )
    win = _windows(
        recs, now, scaling.scale_up_stabilization_seconds, scaling.scale_down_stabilization_seconds
    )
    up, down = _clamp(min(win.up), scaling), _clamp(max(win.down), scaling)
    load_words = (
        f"{load} in flight for {_plural(ready, 'ready replica')} (target {scaling.target_in_flight} each)"
    )
    if current < up:
        return decision(up, "ScaleUp", f"{load_words}: {current} -> {up}", recs)
    if current > down:
        return decision(down, "ScaleDown", f"{load_words}: {current} -> {down}", recs)
    if before is not None and before != current:
        limits = f"{scaling.min_replicas}-{scaling.max_replicas}"
        return decision(current, "Limits", f"{before} is outside minReplicas-maxReplicas {limits}", recs)
    if raw != current:
        window = (
            scaling.scale_down_stabilization_seconds
            if raw < current
            else scaling.scale_up_stabilization_seconds
        )
        return decision(
            current,
            "Stabilizing",
            f"{load_words}: {raw} recommended; keeping {current} for the {window}s stabilization window",
            recs,
        )
    if first:
        return decision(
            current, "Starting", f"starting with {_plural(current, 'replica')} (spec.replicas)", recs
        )
    if previous is not None and previous.reason in _CHANGES and previous.message:
        # Still where the last change put it: that change is still the why (and status stays put).
        return decision(current, previous.reason, previous.message, recs)
    return decision(current, "Steady", f"{load_words}: {current} is right", recs)


def desired_replicas(md: ModelDeployment) -> int:
    """The count a deployment should run: the autoscaler's when scaling is set, else spec.replicas."""
    scaling = md.spec.scaling
    if scaling is None:
        return md.spec.replicas
    auto = md.status.autoscaling
    if auto is None or auto.desired_replicas is None:
        return _clamp(md.spec.replicas, scaling)
    return auto.desired_replicas


__all__ = ["Decision", "Demand", "combine", "decide", "desired_replicas", "expired", "live"]
