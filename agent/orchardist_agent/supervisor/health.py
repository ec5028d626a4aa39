"""One engine's health as a pure state machine: ``step(state, observation, now) -> (state, actions)``.

The async supervisor only feeds what it saw (a process started or exited, a probe's answer, time
passing) and performs what it is told (start, probe, terminate, wait out a backoff), so every rule
about readiness, liveness, crash loops and backoff is decided here, without I/O, as a table test::

    waiting  --Due-->               [Spawn]            (after a backoff, or at once the first time)
    waiting  --Spawned-->           starting
    starting --Tick-->              [ProbeHealth]      (every tick until ready; fail past the deadline)
    starting --HealthAnswered ok--> [ProbeCompletion]  (a live route is not yet a working model)
    starting --CompletionAnswered-> ready              (one token generated)
    ready    --Tick-->              [ProbeHealth]      (every probe interval; N misses in a row fail)
    starting|ready --Failed(why)--> stopping [Terminate] --Terminated--> waiting [Backoff(failures)]
    ready    --Failed-->            each full ``decay`` of the run forgives one earlier failure first
    any      --StopRequested-->     stopped  [Terminate]

``now`` is the event loop's clock (monotonic seconds); wall-clock times stay in the supervisor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from orchardist_agent.supervisor.policy import forgiven, tail_message

Phase = Literal["Starting", "Ready", "CrashLoop", "Stopped"]
Stage = Literal["waiting", "starting", "ready", "stopping", "stopped"]


@dataclass(frozen=True)
class LastError:
    reason: str
    message: str


@dataclass(frozen=True)
class Timing:
    """The knobs of the machine (SupervisorConfig.timing builds it)."""

    ready_timeout: float = 900.0
    probe_interval: float = 10.0
    liveness_failures: int = 3
    decay: float = 60.0  # each full interval of Ready forgives one crash (the delay halves)
    tick: float = 0.5  # a starting engine's health route is asked this often
    completion_retry: float = 1.0  # healthy but not generating: ask for a token again after this


@dataclass(frozen=True)
class EngineState:
    stage: Stage = "waiting"
    phase: Phase = "Starting"
    failures: int = 0  # consecutive failures: the backoff's exponent
    restarts: int = 0  # processes that failed after starting (ModelReplica.status.restarts)
    started: float = 0.0  # when the current process started (an adopted one: now minus its uptime)
    ready_at: float = 0.0  # when it turned Ready (the run that forgives earlier failures)
    deadline: float = 0.0  # a starting engine must be ready by then
    next_probe: float = 0.0
    misses: int = 0  # liveness probes failed in a row
    why: str = ""  # why the current process is being terminated
    error: LastError | None = None


# ---- observations: what the supervisor saw ----------------------------------------------------------


@dataclass(frozen=True)
class Due:
    """The backoff is over (or there was none): start the process now."""


@dataclass(frozen=True)
class Spawned:
    """The process was started."""


@dataclass(frozen=True)
class SpawnFailed:
    """The process could not even be started (a missing binary, an unwritable log directory)."""

    error: str


@dataclass(frozen=True)
class Adopted:
    """A process a previous agent started runs under its record; `healthy`: its route answered."""

    healthy: bool
    uptime: float


@dataclass(frozen=True)
class Tick:
    """Time passed and the process still runs."""


@dataclass(frozen=True)
class HealthAnswered:
    ok: bool
    path: str = "/health"


@dataclass(frozen=True)
class CompletionAnswered:
    problem: str | None  # None: a token was generated


@dataclass(frozen=True)
class Failed:
    """The process stopped serving for a reason seen outside the machine (it exited, say)."""

    why: str


@dataclass(frozen=True)
class Terminated:
    """The failed process and its group are gone; the last lines of its log."""

    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class StopRequested:
    """The replica is gone or replaced: stop for good."""


Observation = (
    Due
    | Spawned
    | SpawnFailed
    | Adopted
    | Tick
    | HealthAnswered
    | CompletionAnswered
    | Failed
    | Terminated
    | StopRequested
)


# ---- actions: what the supervisor does next ---------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    pass


@dataclass(frozen=True)
class ProbeHealth:
    pass


@dataclass(frozen=True)
class ProbeCompletion:
    pass


@dataclass(frozen=True)
class Terminate:
    pass


@dataclass(frozen=True)
class Backoff:
    """Wait the restart policy's delay for this many consecutive failures, then observe Due."""

    failures: int


Action = Spawn | ProbeHealth | ProbeCompletion | Terminate | Backoff
Step = tuple[EngineState, tuple[Action, ...]]


def step(state: EngineState, obs: Observation, now: float, timing: Timing) -> Step:
    """The next state and what to do, given what was observed at `now`."""
    if isinstance(obs, StopRequested):
        if state.stage == "stopped":
            return state, ()
        return replace(state, stage="stopped", phase="Stopped"), (Terminate(),)
    if state.stage == "waiting":
        return _waiting(state, obs, now, timing)
    if state.stage == "starting":
        return _starting(state, obs, now, timing)
    if state.stage == "ready":
        return _ready(state, obs, now, timing)
    if state.stage == "stopping" and isinstance(obs, Terminated):
        failures = state.failures + 1
        message = tail_message([state.why, "--- last log lines ---", *obs.log_tail])
        crashed = replace(
            state,
            stage="waiting",
            phase="CrashLoop",
            failures=failures,
            restarts=state.restarts + 1,
            error=LastError("CrashLoop", message),
        )
        return crashed, (Backoff(failures),)
    return state, ()  # stopping or stopped: the process is on its way out; nothing else matters


def _waiting(state: EngineState, obs: Observation, now: float, timing: Timing) -> Step:
    if isinstance(obs, Due):
        return state, (Spawn(),)
    if isinstance(obs, Spawned):
        return _start(replace(state, phase="Starting"), now, timing), ()
    if isinstance(obs, SpawnFailed):
        failures = state.failures + 1
        error = LastError("CrashLoop", f"cannot start: {obs.error}")
        return replace(state, phase="CrashLoop", failures=failures, error=error), (Backoff(failures),)
    if isinstance(obs, Adopted):
        if obs.healthy:
            ready = replace(state, stage="ready", phase="Ready", misses=0, next_probe=now)
            return replace(ready, started=now - obs.uptime, ready_at=now - obs.uptime), ()
        return replace(_start(state, now, timing), started=now - obs.uptime), ()
    return state, ()


def _start(state: EngineState, now: float, timing: Timing) -> EngineState:
    return replace(
        state, stage="starting", started=now, deadline=now + timing.ready_timeout, next_probe=now, misses=0
    )


def _starting(state: EngineState, obs: Observation, now: float, timing: Timing) -> Step:
    if isinstance(obs, Failed):
        return _fail(state, obs.why)
    if isinstance(obs, Tick):
        if now > state.deadline:
            return _fail(state, f"not ready after {timing.ready_timeout:.0f} s")
        if now < state.next_probe:
            return state, ()
        return replace(state, next_probe=now + timing.tick), (ProbeHealth(),)
    if isinstance(obs, HealthAnswered):
        return state, ((ProbeCompletion(),) if obs.ok else ())
    if isinstance(obs, CompletionAnswered):
        if obs.problem is not None:
            problem = LastError("Starting", f"healthy but the readiness completion failed: {obs.problem}")
            return replace(state, error=problem, next_probe=now + timing.completion_retry), ()
        kept = None if state.error is not None and state.error.reason == "Starting" else state.error
        ready = replace(
            state,
            stage="ready",
            phase="Ready",
            error=kept,
            misses=0,
            next_probe=now + timing.probe_interval,
            ready_at=now,
        )
        return ready, ()
    return state, ()


def _ready(state: EngineState, obs: Observation, now: float, timing: Timing) -> Step:
    if isinstance(obs, Failed):
        return _fail(_forgive(state, now, timing), obs.why)
    if isinstance(obs, Tick):
        if now < state.next_probe:
            return state, ()
        return replace(state, next_probe=now + timing.probe_interval), (ProbeHealth(),)
    if isinstance(obs, HealthAnswered):
        if obs.ok:
            return replace(state, misses=0), ()
        misses = state.misses + 1
        if misses >= timing.liveness_failures:
            failing = _forgive(replace(state, misses=misses), now, timing)
            return _fail(failing, f"{obs.path} failed {misses} times in a row")
        return replace(state, misses=misses), ()
    return state, ()


def _forgive(state: EngineState, now: float, timing: Timing) -> EngineState:
    """A Ready engine that fails: its run of service first forgives earlier failures."""
    return replace(state, failures=forgiven(state.failures, now - state.ready_at, decay=timing.decay))


def _fail(state: EngineState, why: str) -> Step:
    return replace(state, stage="stopping", why=why), (Terminate(),)
