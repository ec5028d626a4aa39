"""Engine processes: start, readiness, liveness, restart with backoff, adopt after an agent restart, stop.

`health` decides (a pure state machine), `core.Supervisor` observes and acts, `launcher` is the one
place an engine is started, `users` the unprivileged account and environment it starts under,
`records` lets the next agent adopt running engines, `probe` talks to the engine's HTTP API and
`logs` keeps its log file. Process identity is `orchardist.processes`.
"""

from __future__ import annotations

from orchardist_agent.supervisor.core import Supervisor
from orchardist_agent.supervisor.health import LastError, Phase
from orchardist_agent.supervisor.launcher import free_port, port_free
from orchardist_agent.supervisor.status import EngineStatus, Launchable, SupervisorConfig

__all__ = [
    "EngineStatus",
    "LastError",
    "Launchable",
    "Phase",
    "Supervisor",
    "SupervisorConfig",
    "free_port",
    "port_free",
]
