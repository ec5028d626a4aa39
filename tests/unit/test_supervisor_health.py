"""The engine health state machine as a table: (state, observation, now) -> (state, actions)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchardist_agent.supervisor.health import (
    Action,
    Adopted,
    Backoff,
    CompletionAnswered,
    Due,
    EngineState,
    Failed,
    HealthAnswered,
    LastError,
    Observation,
    ProbeCompletion,
    ProbeHealth,
    Spawn,
    Spawned,
    SpawnFailed,
    StopRequested,
    Terminate,
    Terminated,
    Tick,
    Timing,
    step,
)

T = Timing(ready_timeout=100, probe_interval=10, liveness_failures=3, decay=60, tick=0.5)

NEW = EngineState()
STARTING = EngineState(stage="starting", phase="Starting", started=1000, deadline=1100, next_probe=1000)
READY = EngineState(
    stage="ready", phase="Ready", failures=2, restarts=2, started=1000, ready_at=1000, next_probe=1050
)
EXITED = "engine exited with code 1"
STOPPING = replace(READY, stage="stopping", why=EXITED)
CRASHED = replace(
    NEW, phase="CrashLoop", failures=2, restarts=2, error=LastError("CrashLoop", f"{EXITED}\n...")
)
NOT_GENERATING = LastError("Starting", "healthy but the readiness completion failed: /v1/completions 401")

Row = tuple[EngineState, Observation, float, EngineState, tuple[Action, ...]]

ROWS: dict[str, Row] = {
    # -- starting a process
    "first start at once": (NEW, Due(), 0, NEW, (Spawn(),)),
    "spawned: starting, ready deadline set": (NEW, Spawned(), 1000, STARTING, ()),
    "cannot start: crash loop with backoff": (
        NEW, SpawnFailed("no such file"), 5,
        replace(NEW, phase="CrashLoop", failures=1,
                error=LastError("CrashLoop", "cannot start: no such file")),
        (Backoff(1),),
    ),
    "after a backoff: start again": (CRASHED, Due(), 50, CRASHED, (Spawn(),)),
    "restarted: Starting, the crash still reported": (
        CRASHED, Spawned(), 2000,
        replace(CRASHED, stage="starting", phase="Starting", started=2000, deadline=2100, next_probe=2000),
        (),
    ),
    # -- readiness: health route, then one real completion
    "starting: nothing due yet": (replace(STARTING, next_probe=1000.5), Tick(), 1000.2,
                                  replace(STARTING, next_probe=1000.5), ()),
    "starting: ask the health route every tick": (
        STARTING, Tick(), 1000, replace(STARTING, next_probe=1000.5), (ProbeHealth(),),
    ),
    "health route not up yet": (STARTING, HealthAnswered(ok=False), 1001, STARTING, ()),
    "health route up: ask for a token": (
        STARTING, HealthAnswered(ok=True), 1001, STARTING, (ProbeCompletion(),),
    ),
    "healthy but not generating: say why, retry soon": (
        STARTING, CompletionAnswered("/v1/completions 401"), 1002,
        replace(STARTING, error=NOT_GENERATING, next_probe=1003), (),
    ),
    "a token: Ready, the Starting error cleared": (
        replace(STARTING, error=NOT_GENERATING), CompletionAnswered(None), 1004,
        replace(STARTING, stage="ready", phase="Ready", next_probe=1014, ready_at=1004), (),
    ),
    "a token: Ready, an earlier crash still reported": (
        replace(STARTING, error=CRASHED.error), CompletionAnswered(None), 1004,
        replace(STARTING, stage="ready", phase="Ready", next_probe=1014, ready_at=1004, error=CRASHED.error),
        (),
    ),
    "not ready by the deadline: terminate": (
        STARTING, Tick(), 1100.5,
        replace(STARTING, stage="stopping", why="not ready after 100 s"), (Terminate(),),
    ),
    "exits while starting: terminate what is left": (
        STARTING, Failed(EXITED), 1010, replace(STARTING, stage="stopping", why=EXITED), (Terminate(),),
    ),
    # -- liveness
    "ready: nothing due yet": (READY, Tick(), 1049, READY, ()),
    "ready: probe every interval": (READY, Tick(), 1050, replace(READY, next_probe=1060), (ProbeHealth(),)),
    "a healthy answer clears the misses; failures are counted at the next failure": (
        replace(READY, misses=2), HealthAnswered(ok=True), 1300, READY, (),
    ),
    "one missed probe": (READY, HealthAnswered(ok=False), 1100, replace(READY, misses=1), ()),
    "three missed probes in a row: terminate": (
        replace(READY, misses=2), HealthAnswered(ok=False, path="/healthz"), 1050,
        replace(READY, misses=3, stage="stopping", why="/healthz failed 3 times in a row"), (Terminate(),),
    ),
    "killed while ready: terminate the group": (
        READY, Failed("engine killed by signal 9"), 1059,
        replace(READY, stage="stopping", why="engine killed by signal 9"), (Terminate(),),
    ),
    # -- service forgives: each full minute of Ready forgives one failure (the delay halves)
    "failed after 59 s of service: nothing forgiven": (
        READY, Failed(EXITED), 1059, replace(READY, stage="stopping", why=EXITED), (Terminate(),),
    ),
    "failed after 60 s of service: one failure forgiven": (
        READY, Failed(EXITED), 1060, replace(READY, failures=1, stage="stopping", why=EXITED), (Terminate(),),
    ),
    "three crashes, then 5 min of service: all forgiven, the next delay is the base": (
        replace(READY, failures=3, restarts=3), Failed(EXITED), 1300,
        replace(READY, failures=0, restarts=3, stage="stopping", why=EXITED), (Terminate(),),
    ),
    "... so its crash backs off once (Backoff(1): 10 s, not 80 s)": (
        replace(READY, failures=0, restarts=3, stage="stopping", why=EXITED), Terminated(()), 1301,
        replace(READY, stage="waiting", phase="CrashLoop", failures=1, restarts=4, why=EXITED,
                error=LastError("CrashLoop", f"{EXITED}\n--- last log lines ---")),
        (Backoff(1),),
    ),
    "liveness fails after 2 min of service: two forgiven": (
        replace(READY, failures=5, misses=2), HealthAnswered(ok=False), 1120,
        replace(READY, failures=3, misses=3, stage="stopping", why="/health failed 3 times in a row"),
        (Terminate(),),
    ),
    "adopted after 5 min of service: its run counts too": (
        replace(NEW, failures=4), Adopted(healthy=True, uptime=300), 1000,
        replace(NEW, failures=4, stage="ready", phase="Ready", started=700, ready_at=700, next_probe=1000),
        (),
    ),
    # -- crash loop
    "terminated: CrashLoop with the log tail, back off": (
        STOPPING, Terminated(("loading", "Traceback")), 1101,
        replace(
            READY, stage="waiting", phase="CrashLoop", failures=3, restarts=3, why=EXITED,
            error=LastError("CrashLoop", f"{EXITED}\n--- last log lines ---\nloading\nTraceback"),
        ),
        (Backoff(3),),
    ),
    "stopping: the process is on its way out": (STOPPING, Tick(), 1101, STOPPING, ()),
    "an exit during the backoff is no news": (CRASHED, Failed(EXITED), 60, CRASHED, ()),
    # -- adoption after an agent restart
    "adopted and healthy: Ready at once": (
        NEW, Adopted(healthy=True, uptime=300), 1000,
        replace(NEW, stage="ready", phase="Ready", started=700, ready_at=700, next_probe=1000), (),
    ),
    "adopted, not answering: Starting with a fresh deadline": (
        NEW, Adopted(healthy=False, uptime=300), 1000,
        replace(NEW, stage="starting", started=700, deadline=1100, next_probe=1000), (),
    ),
    # -- stop
    "stop a ready engine": (READY, StopRequested(), 1100, replace(READY, stage="stopped", phase="Stopped"),
                            (Terminate(),)),
    "stop during a backoff: nothing runs, the group is checked anyway": (
        CRASHED, StopRequested(), 70, replace(CRASHED, stage="stopped", phase="Stopped"), (Terminate(),),
    ),
    "stopped twice: nothing more": (
        replace(READY, stage="stopped", phase="Stopped"), StopRequested(), 1200,
        replace(READY, stage="stopped", phase="Stopped"), (),
    ),
    "stopped ignores a late exit": (
        replace(READY, stage="stopped", phase="Stopped"), Failed(EXITED), 1200,
        replace(READY, stage="stopped", phase="Stopped"), (),
    ),
}  # fmt: skip


@pytest.mark.parametrize(("state", "obs", "now", "after", "actions"), ROWS.values(), ids=ROWS.keys())
def test_step(
    state: EngineState, obs: Observation, now: float, after: EngineState, actions: tuple[Action, ...]
) -> None:
    assert step(state, obs, now, T) == (after, actions)


def test_a_crash_loop_backs_off_further_each_time_until_it_stays_up() -> None:
    """Three quick crashes ask for backoffs 1, 2, 3; after 5 min of service the next asks for 1."""
    state = NEW
    backoffs = []
    t = 0.0
    for _ in range(3):
        crash: tuple[Observation, ...] = (Due(), Spawned(), Failed(EXITED), Terminated())
        for obs in crash:
            state, actions = step(state, obs, t, T)
            backoffs += [a.failures for a in actions if isinstance(a, Backoff)]
            t += 1
    assert backoffs == [1, 2, 3] and (state.phase, state.restarts) == ("CrashLoop", 3)
    script: list[tuple[Observation, float]] = [
        (Due(), t), (Spawned(), t), (Tick(), t), (HealthAnswered(ok=True), t), (CompletionAnswered(None), t),
        (Tick(), t + 10), (HealthAnswered(ok=True), t + 10), (Failed(EXITED), t + 300),
        (Terminated(), t + 301),
    ]  # fmt: skip
    phases, asked = [], []
    for obs, now in script:
        state, actions = step(state, obs, now, T)
        phases.append(state.phase)
        asked += [a.failures for a in actions if isinstance(a, Backoff)]
    assert phases == ["CrashLoop", "Starting", "Starting", "Starting", "Ready", "Ready", "Ready", "Ready",
                      "CrashLoop"]  # fmt: skip
    assert asked == [1] and (state.failures, state.restarts) == (1, 4)  # the base delay, not 80 s
