"""Status tables: the four conditions, the phase word and condition rendering."""

from __future__ import annotations

import pytest

from orchardist.api.common import Condition
from orchardist.controller.status import Cond, Facts, conditions, phase, render, summary

D = "sha256:" + "ab" * 32

# (case, facts, Ready, Reconciling, Stalled, Degraded, phase) as (status, reason) pairs
TABLE = [
    (
        "all ready",
        Facts(desired=2, existing=2, ready=2, updated=2, updated_ready=2, digest=D),
        (True, "Ready"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        "Ready",
    ),
    (
        "just created, nothing placed yet",
        Facts(desired=1, digest=D),
        (False, "Scheduling"),
        (True, "Scheduling"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        "Pending",
    ),
    (
        "pulling",
        Facts(desired=1, existing=1, updated=1, pulling=1, percent="42%", digest=D),
        (False, "PullProgressing"),
        (True, "PullProgressing"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        "Progressing",
    ),
    (
        "starting",
        Facts(desired=1, existing=1, updated=1, starting=1, digest=D),
        (False, "Starting"),
        (True, "Starting"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        "Progressing",
    ),
    (
        "nothing fits",
        Facts(desired=1, unschedulable="no Mac fits: ...", digest=D),
        (False, "Unschedulable"),
        (False, "AsExpected"),
        (True, "Unschedulable"),
        (False, "AsExpected"),
        "Failed",
    ),
    (
        "tag does not resolve",
        Facts(desired=1, resolve_error="manifest unknown"),
        (False, "ResolveFailed"),
        (False, "AsExpected"),
        (True, "ResolveFailed"),
        (False, "AsExpected"),
        "Failed",
    ),
    (
        "rolling out, old still serving",
        Facts(desired=1, existing=2, ready=1, updated=1, old=1, pulling=1, digest=D),
        (False, "RollingOut"),
        (True, "RollingOut"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        "Progressing",
    ),
    (
        "one of two on a NotReady Mac",
        Facts(desired=2, existing=2, ready=1, updated=2, updated_ready=1, lost=1, digest=D),
        (False, "NodeNotReady"),
        (True, "NodeNotReady"),
        (False, "AsExpected"),
        (True, "NodeNotReady"),
        "Degraded",
    ),
    (
        "replaced, one left on a NotReady Mac",
        Facts(desired=1, existing=2, ready=1, updated=1, updated_ready=1, lost=1, digest=D),
        (True, "Ready"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        (True, "NodeNotReady"),
        "Degraded",
    ),
    (
        "one of two given up by its agent",
        Facts(
            desired=2,
            existing=2,
            ready=1,
            updated=2,
            updated_ready=1,
            failures=(("EngineArgsRefused", "r2: --foo is not allowed"),),
            digest=D,
        ),
        (False, "EngineArgsRefused"),
        (False, "AsExpected"),
        (True, "EngineArgsRefused"),
        (True, "EngineArgsRefused"),
        "Degraded",
    ),
    (
        "one of two crash-looping: the agent retries, no person needed yet",
        Facts(
            desired=2,
            existing=2,
            ready=1,
            updated=2,
            updated_ready=1,
            starting=1,
            looping=("r2 on b, 3 restart(s): exit 1",),
            digest=D,
        ),
        (False, "CrashLoopBackOff"),
        (True, "CrashLoopBackOff"),
        (False, "AsExpected"),
        (True, "CrashLoopBackOff"),
        "Degraded",
    ),
    (
        "the only replica crash-looping",
        Facts(
            desired=1,
            existing=1,
            updated=1,
            starting=1,
            looping=("r0 on a, 1 restart(s): exit 1",),
            digest=D,
        ),
        (False, "CrashLoopBackOff"),
        (True, "CrashLoopBackOff"),
        (False, "AsExpected"),
        (True, "CrashLoopBackOff"),
        "Degraded",
    ),
    (
        "back and serving, but not long enough to call the loop over",
        Facts(
            desired=1,
            existing=1,
            ready=1,
            updated=1,
            updated_ready=1,
            looping=("r0 on a, 2 restart(s): exit 1",),
            digest=D,
        ),
        (True, "Ready"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        (True, "CrashLoopBackOff"),
        "Degraded",
    ),
    (
        "scaled to zero",
        Facts(desired=0, digest=D),
        (True, "ScaledDown"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        "Ready",
    ),
    (
        "scaling down",
        Facts(desired=1, existing=2, ready=2, updated=2, updated_ready=2, digest=D),
        (True, "Ready"),
        (True, "ScaledDown"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        "Ready",
    ),
    (
        "ready, but only at a loopback address",
        Facts(
            desired=1,
            existing=1,
            ready=1,
            updated=1,
            updated_ready=1,
            unroutable=("r0 at 127.0.0.1:8001",),
            digest=D,
        ),
        (True, "Ready"),
        (False, "AsExpected"),
        (False, "AsExpected"),
        (True, "EndpointNotRoutable"),
        "Degraded",
    ),
    (
        "some ready, the rest unschedulable",
        Facts(
            desired=3, existing=2, ready=2, updated=2, updated_ready=2, unschedulable="no Mac fits", digest=D
        ),
        (False, "Unschedulable"),
        (False, "AsExpected"),
        (True, "Unschedulable"),
        (False, "AsExpected"),
        "Degraded",
    ),
]


@pytest.mark.parametrize(
    ("case", "facts", "ready", "reconciling", "stalled", "degraded", "word"), TABLE, ids=[t[0] for t in TABLE]
)
def test_conditions(
    case: str,
    facts: Facts,
    ready: tuple[bool, str],
    reconciling: tuple[bool, str],
    stalled: tuple[bool, str],
    degraded: tuple[bool, str],
    word: str,
) -> None:
    """Each situation gives one honest set of conditions and one phase word."""
    got = conditions(facts)
    assert {k: (c.status, c.reason) for k, c in got.items()} == {
        "Ready": ready,
        "Reconciling": reconciling,
        "Stalled": stalled,
        "Degraded": degraded,
    }
    assert phase(got, facts) == word


def test_ready_message_names_counts_and_digest() -> None:
    """Ready says how many replicas serve and which digest."""
    c = conditions(Facts(desired=2, existing=2, ready=2, updated=2, updated_ready=2, digest=D))["Ready"]
    assert c.message == f"2/2 replicas ready at {D[:19]}"


def test_render_keeps_transition_time_while_status_holds() -> None:
    """lastTransitionTime moves only when a condition's status changes; observedGeneration is set."""
    conds = {
        "Ready": Cond(True, "Ready", "1/1"),
        "Reconciling": Cond(False, "AsExpected", ""),
        "Stalled": Cond(False, "AsExpected", ""),
        "Degraded": Cond(False, "AsExpected", ""),
    }
    previous = [
        Condition.model_validate({"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"})
        for t in ("Ready", "Stalled")
    ]
    out = {c["type"]: c for c in render(conds, 7, previous, "2026-02-02T00:00:00Z")}
    assert out["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert out["Stalled"]["lastTransitionTime"] == "2026-02-02T00:00:00Z"
    assert out["Reconciling"]["lastTransitionTime"] == "2026-02-02T00:00:00Z"
    assert {c["observedGeneration"] for c in out.values()} == {7}
    assert [c["type"] for c in render(conds, 7, previous, "x")] == [
        "Ready",
        "Reconciling",
        "Stalled",
        "Degraded",
    ]


OK = Cond(False, "AsExpected", "")
SUMMARY = [
    (
        "stalled wins over a Degraded that also holds",
        {
            "Ready": Cond(True, "Ready", "1/2 ready"),
            "Stalled": Cond(True, "Unschedulable", "no Mac fits:\n  mac-a: too small"),
            "Degraded": Cond(True, "ReplicasDown", "1/2 replicas ready"),
        },
        ("Unschedulable", "no Mac fits: mac-a: too small"),
    ),
    (
        "degraded while serving",
        {
            "Ready": Cond(True, "Ready", "2/2"),
            "Stalled": OK,
            "Degraded": Cond(True, "NodeNotReady", "1 lost"),
        },
        ("NodeNotReady", "1 lost"),
    ),
    (
        "progressing shows what it waits for",
        {
            "Ready": Cond(False, "PullProgressing", "1 replica(s) pulling (42%)"),
            "Stalled": OK,
            "Degraded": OK,
        },
        ("PullProgressing", "1 replica(s) pulling (42%)"),
    ),
    (
        "healthy says how it serves",
        {
            "Ready": Cond(True, "Ready", "2/2 replicas ready at sha256:0123456789ab"),
            "Stalled": OK,
            "Degraded": OK,
        },
        ("Ready", "2/2 replicas ready at sha256:0123456789ab"),
    ),
]


@pytest.mark.parametrize(("case", "conds", "want"), SUMMARY, ids=[t[0] for t in SUMMARY])
def test_summary_picks_the_condition_that_explains(
    case: str, conds: dict[str, Cond], want: tuple[str, str]
) -> None:
    """REASON/MESSAGE show Stalled, else Degraded, else Ready, on one line."""
    assert summary({"Reconciling": OK, **conds}) == want


def test_summary_message_fits_a_column() -> None:
    """A long message is cut to 256 characters, ending in an ellipsis, so the CRD's bound holds."""
    long = Cond(True, "Unschedulable", "x " * 400)
    reason, message = summary({"Ready": Cond(False, "Unschedulable", ""), "Stalled": long, "Degraded": OK})
    assert (reason, len(message), message[-1]) == ("Unschedulable", 256, "\u2026")


def test_summary_of_real_facts_is_the_stall() -> None:
    """Through conditions(): an unschedulable deployment shows Unschedulable with the scheduler's words."""
    conds = conditions(Facts(desired=1, unschedulable="no Mac has 80Gi free (mac-a: 28Gi free)"))
    assert summary(conds) == ("Unschedulable", "no Mac has 80Gi free (mac-a: 28Gi free)")
