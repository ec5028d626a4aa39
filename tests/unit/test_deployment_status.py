"""A deployment's status over time: a crash loop is one Degraded episode, the endpoint follows serving.

Each step decides on the world the previous step left (the status it wrote included), as the
controller's reconciles do; Events are collected across the steps.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from orchardist.api.modeldeployment import ModelDeploymentStatus
from orchardist.api.modelreplica import LastError
from orchardist.controller import plan as P  # noqa: N812
from orchardist.controller import world as W  # noqa: N812
from orchardist.controller.status import CRASH_LOOP, SETTLE_S, rfc3339
from tests.unit.test_reconcile import apply, mac, observed, rep, spec

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
TAIL = LastError.model_validate(
    {"reason": "CrashLoop", "message": "engine exited with code 1\n--- last log lines ---\nTraceback\n  boom"}
)


def at(seconds: float) -> str:
    return rfc3339(T0 + timedelta(seconds=seconds))


def test_a_crash_loop_is_one_degraded_episode_not_a_stall_per_crash() -> None:
    """Crash, recover, crash, recover: one Warning when the loop starts, one clear once the replica
    stayed Ready for SETTLE_S; never Stalled, no Ready Event mid-loop, every message one line."""
    s = spec(replicas=1)
    ready = rep("r0", "a", s, endpoint="10.0.0.1:8001", ready_since=T0)
    obs = observed(s, [mac("a")], [ready], now=at(0))
    obs = apply(obs, P.decide(obs))  # serving: the starting point
    crashed = replace(ready, phase="Starting", endpoint=None, restarts=1, last_error=TAIL, ready_since=None)
    steps = [
        (10, crashed),
        (40, replace(ready, restarts=1, last_error=TAIL, ready_since=T0 + timedelta(seconds=40))),
        (70, replace(crashed, restarts=2)),
        (100, replace(ready, restarts=2, last_error=TAIL, ready_since=T0 + timedelta(seconds=100))),
        (
            100 + SETTLE_S - 1,
            replace(ready, restarts=2, last_error=TAIL, ready_since=T0 + timedelta(seconds=100)),
        ),
        (
            100 + SETTLE_S,
            replace(ready, restarts=2, last_error=TAIL, ready_since=T0 + timedelta(seconds=100)),
        ),
    ]
    events = []
    degraded = []
    for t, replica in steps:
        obs = replace(obs, replicas=[replica], now=at(t))
        decided = P.decide(obs)
        events += [(e.type, e.reason) for e in decided.events]
        assert all("\n" not in e.message for e in decided.events), decided.events
        obs = apply(obs, decided)
        conds = {c.type: c for c in obs.status.conditions}
        assert conds["Stalled"].status == "False", (t, conds["Stalled"])
        degraded.append((conds["Degraded"].status, conds["Degraded"].reason))
    assert events == [("Warning", CRASH_LOOP), ("Normal", "DegradedCleared")]
    assert degraded == [("True", CRASH_LOOP)] * 5 + [("False", "AsExpected")]


def test_a_replica_its_agent_gave_up_on_stalls_with_a_one_line_event() -> None:
    """Phase Failed: a person must act (Stalled); the Event has the first line, the condition all."""
    s = spec(replicas=1)
    failed = rep("r0", "a", s, phase="Failed", last_error=TAIL, restarts=5)
    decided = P.decide(observed(s, [mac("a")], [failed], now=at(0)))
    assert decided.status is not None
    stalled = next(c for c in decided.status["conditions"] if c["type"] == "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "CrashLoop")
    warning = next(e for e in decided.events if e.type == "Warning" and e.reason == "CrashLoop")
    assert warning.message == "r0 on a: engine exited with code 1"


# (case, phases of the replicas, the endpoint the status had) -> status.endpoint in the write
ENDPOINT = [
    ("one ready replica names the Service", ["Ready"], None, "qwen.ns.svc:8000"),
    ("one of two ready is enough", ["Ready", "Starting"], None, "qwen.ns.svc:8000"),
    ("nothing ready yet: no endpoint", ["Pulling"], None, "absent"),
    ("the last ready replica went down: removed", ["Starting"], "qwen.ns.svc:8000", None),
    ("no replicas at all", [], None, "absent"),
]


@pytest.mark.parametrize(("case", "phases", "before", "expected"), ENDPOINT, ids=[t[0] for t in ENDPOINT])
def test_endpoint_only_while_a_replica_serves(
    case: str, phases: list[str], before: str | None, expected: str | None
) -> None:
    """status.endpoint names the Service while at least one replica is ready, else it is absent."""
    s = spec(replicas=max(1, len(phases)))
    reps = [
        rep(f"r{i}", f"m{i}", s, phase=p, endpoint=f"10.0.0.{i + 1}:8001" if p == "Ready" else None)
        for i, p in enumerate(phases)
    ]
    status = ModelDeploymentStatus.model_validate({"endpoint": before} if before else {})
    obs: W.Observed = observed(s, [mac(f"m{i}") for i in range(3)], reps, status=status)
    decided = P.decide(obs)
    assert decided.status is not None
    got = decided.status.get("endpoint", "absent")
    assert got == expected
    if expected == "absent":  # and a second reconcile does not write again to say so
        assert P.decide(apply(obs, decided)).status is None
