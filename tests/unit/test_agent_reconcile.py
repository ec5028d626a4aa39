"""The agent's pure decisions for one ModelReplica, as tables."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from orchardist_agent.reconcile import (
    Act,
    Cond,
    EngineState,
    EngineView,
    Observed,
    ProgressThrottle,
    PullView,
    ReplicaView,
    condition_events,
    decide,
    desired_status,
    free_bytes,
    merge_conditions,
    node_conditions,
    status_patch,
)

GiB = 2**30
R = ReplicaView(
    namespace="ns",
    name="r1",
    uid="u1",
    generation=3,
    node_name="mac-1",
    model="oci://127.0.0.1:5000/m@sha256:" + "a" * 64,
    digest="sha256:" + "a" * 64,
    engine="mlx-lm",
    reserved_bytes=10 * GiB,
)
GONE = replace(R, deleting=True)
RUNNING = EngineView(EngineState.STARTING, port=8001, pid=42)
READY = EngineView(EngineState.READY, port=8001, pid=42)
CRASHED = EngineView(EngineState.BACKOFF, port=8001, pid=None, restarts=2, message="Traceback: boom")
PULLING = PullView(bytes_done=5, bytes_total=10, bytes_per_second=1.0)
PULL_FAILED = PullView(error="PullFailed: 503", retry_due=False)
PULL_RETRY = PullView(error="PullFailed: 503", retry_due=True)


def obs(**kw: Any) -> Observed:
    base: dict[str, Any] = {"free_bytes": 40 * GiB}
    base.update(kw)
    return Observed(**base)


DECIDE = [
    # (case, replica, observed, actions)
    ("new replica that fits: reserve and pull", R, obs(), (Act.RESERVE, Act.PULL)),
    ("exactly fits", R, obs(free_bytes=10 * GiB), (Act.RESERVE, Act.PULL)),
    ("does not fit: nothing at all", R, obs(free_bytes=10 * GiB - 1), ()),
    ("does not fit, nothing free", R, obs(free_bytes=0), ()),
    ("reserved, pull running: wait", R, obs(reserved=True, pull=PULLING), ()),
    ("reserved, pull failed, not due: wait", R, obs(reserved=True, pull=PULL_FAILED), ()),
    ("reserved, pull failed, due: pull again", R, obs(reserved=True, pull=PULL_RETRY), (Act.PULL,)),
    ("cached, no engine: start", R, obs(reserved=True, cached=True), (Act.START,)),
    ("cached but not yet reserved: reserve then start", R, obs(cached=True), (Act.RESERVE, Act.START)),
    ("engine starting: wait", R, obs(reserved=True, cached=True, engine=RUNNING), ()),
    ("engine ready: nothing", R, obs(reserved=True, cached=True, engine=READY), ()),
    (
        "engine crash looping: the supervisor restarts it",
        R,
        obs(reserved=True, cached=True, engine=CRASHED),
        (),
    ),
    (
        "engine stopped behind our back: start",
        R,
        obs(reserved=True, cached=True, engine=EngineView(EngineState.STOPPED)),
        (Act.START,),
    ),
    (
        "adopted engine after restart holds its memory even if the node looks full",
        R,
        obs(free_bytes=0, cached=True, engine=READY),
        (Act.RESERVE,),
    ),
    (
        "deleted while ready: stop, release, forget",
        GONE,
        obs(reserved=True, cached=True, engine=READY),
        (
            Act.STOP,
            Act.RELEASE,
            Act.FORGET,
        ),
    ),
    (
        "deleted while pulling: release (cancels) and forget",
        GONE,
        obs(reserved=True, pull=PULLING),
        (
            Act.RELEASE,
            Act.FORGET,
        ),
    ),
    ("deleted, never admitted: forget only", GONE, obs(free_bytes=0), (Act.FORGET,)),
    ("engine not installed: nothing", R, obs(engine_installed=False), ()),
    (
        "engine uninstalled while reserved: stop and release",
        R,
        obs(engine_installed=False, reserved=True),
        (Act.STOP, Act.RELEASE),
    ),
]


@pytest.mark.parametrize(("case", "replica", "observed", "acts"), DECIDE, ids=[c[0] for c in DECIDE])
def test_decide(case: str, replica: ReplicaView, observed: Observed, acts: tuple[Act, ...]) -> None:
    assert decide(replica, observed) == acts


STATUS = [
    # (case, replica, observed, phase, {condition: (status, reason)}, endpoint)
    ("does not fit", R, obs(free_bytes=GiB), "Failed", {"Scheduled": (False, "DoesNotFit")}, None),
    (
        "pulling",
        R,
        obs(reserved=True, pull=PULLING),
        "Pulling",
        {"Scheduled": (True, "Scheduled"), "Pulled": (False, "PullProgressing")},
        None,
    ),
    (
        "pull failed",
        R,
        obs(reserved=True, pull=PULL_FAILED),
        "Pulling",
        {"Pulled": (False, "PullFailed")},
        None,
    ),
    (
        "pulled, starting",
        R,
        obs(reserved=True, cached=True),
        "Starting",
        {"Pulled": (True, "Pulled"), "Started": (False, "Starting")},
        None,
    ),
    (
        "started, not ready",
        R,
        obs(reserved=True, cached=True, engine=RUNNING),
        "Starting",
        {"Started": (True, "Started"), "Ready": (False, "Starting")},
        None,
    ),
    (
        "ready",
        R,
        obs(reserved=True, cached=True, engine=READY, address="10.0.0.7"),
        "Ready",
        {"Started": (True, "Started"), "Ready": (True, "Ready")},
        "10.0.0.7:8001",
    ),
    (
        "crash loop",
        R,
        obs(reserved=True, cached=True, engine=CRASHED),
        "CrashLoopBackOff",
        {"Started": (False, "CrashLoop"), "Ready": (False, "CrashLoop")},
        None,
    ),
    (
        "given up",
        R,
        obs(reserved=True, cached=True, engine=replace(CRASHED, state=EngineState.FAILED)),
        "Failed",
        {"Ready": (False, "CrashLoop")},
        None,
    ),
    (
        "engine missing",
        R,
        obs(engine_installed=False),
        "Failed",
        {"Ready": (False, "EngineNotInstalled")},
        None,
    ),
    ("terminating", GONE, obs(reserved=True), "Terminating", {"Ready": (False, "Terminating")}, None),
]


@pytest.mark.parametrize(
    ("case", "replica", "observed", "phase", "conds", "endpoint"), STATUS, ids=[c[0] for c in STATUS]
)
def test_desired_status(
    case: str,
    replica: ReplicaView,
    observed: Observed,
    phase: str,
    conds: dict[str, tuple[bool, str]],
    endpoint: str | None,
) -> None:
    got_phase, got_conds, extra = desired_status(replica, observed)
    assert got_phase == phase
    by_type = {c.type: (c.status, c.reason) for c in got_conds}
    for ctype, want in conds.items():
        assert by_type[ctype] == want, ctype
    assert extra["endpoint"] == endpoint


def test_crash_loop_carries_the_last_log_lines() -> None:
    _, conds, extra = desired_status(R, obs(reserved=True, cached=True, engine=CRASHED))
    assert extra["lastError"] == {"reason": "CrashLoop", "message": "Traceback: boom"}
    assert extra["restarts"] == 2
    assert [c.message for c in conds if c.type == "Started"] == ["Traceback: boom; 2 restarts"]


def test_a_backoff_says_the_exit_the_wait_and_the_restarts_in_one_line() -> None:
    """The log tail stays in lastError; conditions (and so Events) and status.message are one line."""
    tail = "engine exited with code 1\n--- last log lines ---\nTraceback\nValueError: boom"
    waiting = replace(CRASHED, restarts=3, message=tail, retry_in=40.2, retry_at="2026-01-01T00:00:40Z")
    phase, conds, extra = desired_status(R, obs(reserved=True, cached=True, engine=waiting))
    line = "engine exited with code 1; restarting in 40 s (at 2026-01-01T00:00:40Z); 3 restarts"
    assert (phase, extra["message"], extra["nextRestartTime"]) == (
        "CrashLoopBackOff",
        line,
        "2026-01-01T00:00:40Z",
    )
    assert extra["lastError"] == {"reason": "CrashLoop", "message": tail}
    assert {c.type: c.message for c in conds if not c.status} == {"Started": line, "Ready": line}


def test_ready_again_clears_the_message_and_the_next_restart() -> None:
    """Merge-patch nulls: a replica back to Ready shows no stale backoff (nor a controller's Unknown)."""
    current = {
        "phase": "Unknown",
        "message": "Mac mac-1 is NotReady",
        "nextRestartTime": "2026-01-01T00:00:40Z",
    }
    ready = EngineView(EngineState.READY, port=8001, pid=7)
    patch = status_patch(R, obs(reserved=True, cached=True, engine=ready), current, "2026-01-01T00:01:00Z")
    assert patch is not None
    assert (patch["phase"], patch["message"], patch["nextRestartTime"]) == ("Ready", None, None)


def test_does_not_fit_message_names_both_sizes() -> None:
    _, _, extra = desired_status(R, obs(free_bytes=4 * GiB))
    assert extra["lastError"]["message"] == "needs 10.0 GiB of the GPU working set; mac-1 has 4.0 GiB free"


def test_progress_fields() -> None:
    _, _, extra = desired_status(R, obs(reserved=True, pull=PullView(300, 1000, 100.0)))
    assert extra["progress"] == {
        "bytesDone": 300,
        "bytesTotal": 1000,
        "bytesPerSecond": 100,
        "etaSeconds": 7,
        "percent": "30%",
    }


def test_transition_time_moves_only_on_a_flip() -> None:
    first = merge_conditions(None, [Cond("Ready", False, "Starting", "a")], 1, "T1")
    same = merge_conditions(first, [Cond("Ready", False, "CrashLoop", "b")], 2, "T2")
    flipped = merge_conditions(same, [Cond("Ready", True, "Ready", "c")], 2, "T3")
    assert [c["lastTransitionTime"] for c in (first[0], same[0], flipped[0])] == ["T1", "T1", "T3"]
    assert same[0]["reason"] == "CrashLoop"
    assert same[0]["observedGeneration"] == 2


def test_conditions_keep_types_not_mentioned_and_order() -> None:
    out = merge_conditions(
        [{"type": "Pulled", "status": "True", "lastTransitionTime": "T0"}],
        [Cond("Ready", False, "Starting"), Cond("Scheduled", True, "Scheduled")],
        1,
        "T1",
    )
    assert [c["type"] for c in out] == ["Scheduled", "Pulled", "Ready"]


def test_status_patch_is_empty_when_nothing_changed() -> None:
    o = obs(reserved=True, cached=True, engine=READY)
    first = status_patch(R, o, None, "T1")
    assert first is not None
    assert first["phase"] == "Ready"
    assert first["endpoint"] == "127.0.0.1:8001"
    assert status_patch(R, o, first, "T2") is None


def test_status_patch_removes_fields_that_no_longer_apply() -> None:
    failed = status_patch(R, obs(reserved=True, pull=PULL_FAILED), None, "T1")
    assert failed is not None
    assert failed["lastError"]["reason"] == "PullFailed"
    later = status_patch(R, obs(reserved=True, cached=True, engine=READY), failed, "T2")
    assert later is not None
    assert later["lastError"] is None


def test_status_patch_holds_progress_back_unless_due() -> None:
    o = obs(reserved=True, pull=PULLING)
    assert "progress" not in (status_patch(R, o, None, "T", with_progress=False) or {})
    assert (status_patch(R, o, None, "T", with_progress=True) or {})["progress"]["bytesDone"] == 5


def test_progress_throttle_at_most_once_per_second_and_always_at_the_end() -> None:
    t = ProgressThrottle(1.0)
    seen = [now for now in (0.0, 0.2, 0.5, 0.99, 1.0, 1.5, 2.1) if t.due(now, 1, 10)]
    assert seen == [0.0, 1.0, 2.1]
    assert t.due(2.2, 10, 10)


def test_free_bytes_excludes_own_reservation() -> None:
    held = {("a", "x"): 10, ("a", "y"): 5}
    assert free_bytes(40, held, ("a", "x")) == 35
    assert free_bytes(40, held, ("b", "z")) == 25


NODE = [
    # (working set, allocated, store free, used, budget) -> (MemoryPressure, DiskPressure)
    ((48 * GiB, 0, 100 * GiB, 0, None), (False, False)),
    ((48 * GiB, 46 * GiB, 100 * GiB, 0, None), (True, False)),
    ((48 * GiB, 45 * GiB, 100 * GiB, 0, None), (False, False)),
    ((48 * GiB, 0, GiB, 0, None), (False, True)),
    ((48 * GiB, 0, 100 * GiB, 60 * GiB, 50 * GiB), (False, True)),
]


@pytest.mark.parametrize(("numbers", "want"), NODE)
def test_node_conditions(numbers: tuple[int, int, int, int, int | None], want: tuple[bool, bool]) -> None:
    ws, alloc, free, used, budget = numbers
    conds = {
        c.type: c.status
        for c in node_conditions(
            working_set=ws, allocated=alloc, store_free=free, store_used=used, store_budget=budget
        )
    }
    assert conds["Ready"] is True
    assert (conds["MemoryPressure"], conds["DiskPressure"]) == want


def test_replica_view_from_object() -> None:
    obj = {
        "metadata": {"namespace": "ns", "name": "r", "uid": "u", "generation": 2, "deletionTimestamp": "x"},
        "spec": {
            "nodeName": "mac",
            "model": "oci://h/m@sha256:" + "b" * 64,
            "digest": "sha256:" + "b" * 64,
            "engine": "mlx-lm",
            "memoryPlan": {"reservedBytes": 123},
            "pullSecretRef": {"name": "creds"},
            "apiKeySecretRef": {"name": "k", "key": "token"},
        },
    }
    v = ReplicaView.from_object(obj)
    assert (v.key, v.generation, v.reserved_bytes, v.deleting) == (("ns", "r"), 2, 123, True)
    assert (v.pull_secret, v.api_key_secret) == ("creds", ("k", "token"))


def test_driver_warnings_show_in_the_started_condition() -> None:
    warned = replace(READY, warnings=("mlx-lm has no --api-key; the key is not enforced by the engine",))
    _, conds, _ = desired_status(R, obs(reserved=True, cached=True, engine=warned))
    started = next(c for c in conds if c.type == "Started")
    assert (
        started.message
        == "mlx-lm pid 42 port 8001; warning: mlx-lm has no --api-key; the key is not enforced by the engine"
    )


def _c(ctype: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": ctype, "status": status, "reason": reason, "message": message}


EVENTS = [
    (
        "first status",
        None,
        [_c("Scheduled", "True", "Scheduled", "bound")],
        [("Normal", "Scheduled", "bound")],
    ),
    ("nothing changed", [_c("Pulled", "True", "Pulled")], [_c("Pulled", "True", "Pulled")], []),
    (
        "message only changed: no event",
        [_c("Ready", "False", "Starting", "a")],
        [_c("Ready", "False", "Starting", "b")],
        [],
    ),
    (
        "flip",
        [_c("Ready", "False", "Starting")],
        [_c("Ready", "True", "Ready", "up")],
        [("Normal", "Ready", "up")],
    ),
    (
        "reason changed, same status, warning",
        [_c("Started", "False", "Starting")],
        [_c("Started", "False", "CrashLoop", "boom")],
        [("Warning", "CrashLoop", "boom")],
    ),
    (
        "Ready repeating another condition's words is one event",
        None,
        [
            _c("Scheduled", "False", "DoesNotFit", "needs 9 GiB"),
            _c("Ready", "False", "DoesNotFit", "needs 9 GiB"),
        ],
        [("Warning", "DoesNotFit", "needs 9 GiB")],
    ),
]


@pytest.mark.parametrize(("case", "old", "new", "want"), EVENTS, ids=[e[0] for e in EVENTS])
def test_condition_events(
    case: str, old: list[dict[str, str]] | None, new: list[dict[str, str]], want: list[tuple[str, str, str]]
) -> None:
    assert condition_events(old, new) == want
