"""What the supervisor reports and how it is tuned: EngineStatus snapshots and SupervisorConfig."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from orchardist.retry import ENGINE_RESTART, Backoff
from orchardist_agent.engines.base import Launch, Measured
from orchardist_agent.supervisor.health import LastError, Phase, Timing
from orchardist_agent.supervisor.users import EngineUser


class Launchable(Protocol):
    """What `ensure` needs: the bind host and the launch for a given port (EngineSpec fits)."""

    @property
    def host(self) -> str: ...

    def launch(self, port: int) -> Launch: ...


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot for ModelReplica.status (phase, endpoint, restarts, lastError, startTime, measured)."""

    key: str
    phase: Phase
    endpoint: str | None = None
    pid: int | None = None
    restarts: int = 0
    last_error: LastError | None = None
    measured: Measured | None = None
    start_time: datetime | None = None
    adopted: bool = False
    backoff_seconds: float | None = None  # during a CrashLoop: the wait before the next start
    next_try: datetime | None = None  # ... and when it ends (wall clock)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SupervisorConfig:
    # Restart delays follow ENGINE_RESTART's shape and jitter; tests shrink the base and cap.
    backoff_base: float = ENGINE_RESTART.base
    backoff_max: float = ENGINE_RESTART.cap
    ready_timeout: float = 900.0
    probe_interval: float = 10.0
    probe_timeout: float = 5.0
    completion_timeout: float = 120.0
    liveness_failures: int = 3
    stop_timeout: float = 30.0
    backoff_decay: float = 60.0  # each full interval of Ready forgives one crash (health.forgiven)
    tick: float = 0.5  # how often a process's existence and its log are checked
    log_max_bytes: int = 32 << 20
    log_backups: int = 3
    tail_lines: int = 25
    rng: Callable[[], float] = field(default=random.random, compare=False)  # jitter draws 0..1; tests fix it
    engine_user: EngineUser | None = None  # None: engines run as the agent (development only)

    @property
    def restart(self) -> Backoff:
        return Backoff(base=self.backoff_base, cap=self.backoff_max, jitter=ENGINE_RESTART.jitter)

    @property
    def timing(self) -> Timing:
        return Timing(
            ready_timeout=self.ready_timeout,
            probe_interval=self.probe_interval,
            liveness_failures=self.liveness_failures,
            decay=self.backoff_decay,
            tick=self.tick,
        )
