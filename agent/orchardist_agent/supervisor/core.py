"""The supervisor: one loop per engine that feeds the health machine and performs its actions.

Decisions (readiness, liveness, crash loop, backoff) are `health.step`; this module only observes
(process exit, probe answers, time) and acts (start, probe, terminate, wait). A record per replica
(pid, start stamp, command line digest, port) lets the next agent adopt a running engine without
interrupting it; a record whose pid now belongs to another process is dropped, never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import aiohttp

from orchardist import log, processes
from orchardist_agent.engines.base import Launch
from orchardist_agent.supervisor import health, launcher, logs, probe, records
from orchardist_agent.supervisor.health import EngineState, Observation
from orchardist_agent.supervisor.status import EngineStatus, Launchable, SupervisorConfig

_log = log.get(__name__)


@dataclass
class _Entry:
    key: str
    launch: Launch
    log_path: Path
    status: EngineStatus
    state: EngineState
    identity: processes.Identity | None = None
    proc: asyncio.subprocess.Process | None = None
    exit_task: asyncio.Task[int] | None = None  # one waiter per child process
    task: asyncio.Task[None] | None = None
    follower: logs.Follower | None = None
    started_at: datetime | None = None
    spec: Launchable | None = None  # to relaunch on another port when ours was taken meanwhile


def private_dir(path: Path) -> None:
    """Create `path` readable by the agent only (0700): engine logs and records stay the agent's."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


class Supervisor:
    """Keeps one engine process per replica key serving; `on_change` hears every status change."""

    def __init__(
        self,
        state_dir: Path,
        log_dir: Path,
        *,
        config: SupervisorConfig | None = None,
        on_change: Callable[[EngineStatus], None] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.log_dir = Path(log_dir)
        self.config = config or SupervisorConfig()
        self.on_change = on_change
        self._entries: dict[str, _Entry] = {}
        self._session: aiohttp.ClientSession | None = None

    # ---- public API -------------------------------------------------------------------------------

    def status(self, key: str) -> EngineStatus | None:
        entry = self._entries.get(key)
        return entry.status if entry else None

    def statuses(self) -> dict[str, EngineStatus]:
        return {k: e.status for k, e in self._entries.items()}

    async def ensure(self, key: str, spec: Launchable) -> EngineStatus:
        """Start the engine for `key` unless the same launch already runs (started here or adopted)."""
        entry = self._entries.get(key)
        if entry is not None and entry.status.phase != "Stopped":
            wanted = spec.launch(entry.launch.port)
            if wanted.fingerprint() == entry.launch.fingerprint():
                entry.launch = wanted  # keeps the log parser and probe that a record cannot carry
                entry.spec = spec
                return entry.status
            _log.info("engine launch changed; replacing it", key=key)
            await self.stop(key)
        launch = spec.launch(launcher.free_port(spec.host))
        entry = _Entry(
            key=key,
            launch=launch,
            log_path=self.log_dir / (quote(key, safe="") + ".log"),
            status=EngineStatus(
                key=key, phase="Starting", endpoint=launch.endpoint, warnings=launch.warnings
            ),
            state=EngineState(),
            spec=spec,
        )
        self._entries[key] = entry
        entry.task = asyncio.create_task(self._run(entry, health.Due()), name=f"engine:{key}")
        self._emit(entry)
        return entry.status

    async def wait(self, key: str, phases: set[str], within: float) -> EngineStatus:
        """Wait until the engine of `key` is in one of `phases` (a convenience for callers and tests)."""
        async with asyncio.timeout(within):
            while True:
                st = self.status(key)
                if st is not None and st.phase in phases:
                    return st
                await asyncio.sleep(0.1)

    async def stop(self, key: str) -> None:
        """SIGTERM to the engine's process group, SIGKILL after the timeout; forget the record."""
        entry = self._entries.get(key)
        if entry is None:
            records.remove(self.state_dir, key)
            return
        if entry.task is not None and entry.task is not asyncio.current_task():
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.task
        state, actions = health.step(entry.state, health.StopRequested(), self._now(), self.config.timing)
        if health.Terminate() in actions:
            await self._terminate(entry)
        records.remove(self.state_dir, key)
        entry.state = state
        self._set(entry, phase=state.phase, pid=None)
        del self._entries[key]

    async def adopt(self) -> list[EngineStatus]:
        """Take over engines a previous agent started; drop records of processes that are gone or other."""
        adopted: list[EngineStatus] = []
        for rec in records.load_all(self.state_dir):
            if rec.key in self._entries:
                continue
            identity = processes.Identity(rec.pid, rec.start_time, rec.cmdline_sha256)
            verdict = await asyncio.to_thread(processes.check, identity)
            if verdict != "same":
                why = "gone" if verdict == "gone" else "pid now belongs to another process"
                _log.info("dropping stale engine record", key=rec.key, pid=rec.pid, why=why)
                records.remove(self.state_dir, rec.key)
                continue
            entry = self._adopted_entry(rec, identity)
            self._entries[rec.key] = entry
            launch = entry.launch
            healthy = await probe.health(
                self._http(),
                launch.probe_host,
                launch.port,
                launch.health_path,
                within=self.config.probe_timeout,
            )
            started_at = entry.started_at or datetime.now(UTC)
            uptime = (datetime.now(UTC) - started_at).total_seconds()
            self._step(entry, health.Adopted(healthy=healthy, uptime=uptime))
            _log.info("adopted engine", key=rec.key, pid=rec.pid, port=rec.port, healthy=healthy)
            entry.task = asyncio.create_task(self._run(entry, None), name=f"engine:{rec.key}")
            adopted.append(entry.status)
        return adopted

    async def detach(self) -> None:
        """Stop supervising without stopping engines (what an agent shutdown or upgrade does)."""
        for entry in list(self._entries.values()):
            for task in (entry.task, entry.exit_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        self._entries.clear()
        await self._close_http()

    async def shutdown(self) -> None:
        """Stop every engine (used when the node is drained, and by tests)."""
        for key in list(self._entries):
            await self.stop(key)
        await self._close_http()

    # ---- the per-engine loop: observe, decide (health.step), act ------------------------------------

    async def _run(self, entry: _Entry, first: Observation | None) -> None:
        obs = first
        while entry.state.stage != "stopped":
            if obs is None:
                try:
                    obs = await self._observe(entry)
                except Exception as e:  # never let one engine's loop die silently with a stale status
                    _log.exception("engine watch failed", key=entry.key)
                    obs = health.Failed(f"supervisor error: {e.__class__.__name__}: {e}")
            actions = self._step(entry, obs)
            obs = None
            for action in actions:
                try:
                    obs = await self._perform(entry, action)
                except Exception as e:  # the machine must hear an outcome, or the engine's state sticks
                    _log.exception("engine action failed", key=entry.key, action=type(action).__name__)
                    why = f"supervisor error: {e.__class__.__name__}: {e}"
                    terminated = isinstance(action, health.Terminate)
                    obs = health.Terminated((why,)) if terminated else health.Failed(why)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _step(self, entry: _Entry, obs: Observation) -> tuple[health.Action, ...]:
        before = entry.state
        entry.state, actions = health.step(before, obs, self._now(), self.config.timing)
        self._publish(entry, before)
        return actions

    async def _perform(self, entry: _Entry, action: health.Action) -> Observation:
        cfg, launch = self.config, entry.launch
        if isinstance(action, health.Spawn):
            return await self._spawn(entry)
        if isinstance(action, health.ProbeHealth):
            return health.HealthAnswered(ok=await self._health(launch), path=launch.health_path)
        if isinstance(action, health.ProbeCompletion):
            problem = await probe.completion(
                self._http(),
                launch.probe_host,
                launch.port,
                launch.probe.path,
                launch.probe.body,
                api_key=launch.api_key,
                within=cfg.completion_timeout,
            )
            return health.CompletionAnswered(problem)
        if isinstance(action, health.Terminate):
            await self._terminate(entry)
            return health.Terminated(tuple(logs.tail(entry.log_path, cfg.tail_lines)))
        wait = cfg.restart.delay(action.failures, cfg.rng)
        # Said in the replica's status while it waits: CrashLoopBackOff names the next try.
        self._set(entry, backoff_seconds=wait, next_try=datetime.now(UTC) + timedelta(seconds=wait))
        await asyncio.sleep(wait)
        return health.Due()

    async def _observe(self, entry: _Entry) -> Observation:
        """Wait a tick for the process to exit; follow its log meanwhile."""
        cfg = self.config
        exited = await self._exited(entry, cfg.tick)
        self._follow_log(entry)
        if exited is not None:
            return health.Failed(exited)
        if entry.follower is not None and entry.log_path.exists():
            with contextlib.suppress(OSError):
                if entry.log_path.stat().st_size > cfg.log_max_bytes:
                    logs.copy_truncate(entry.log_path, cfg.log_backups)
                    entry.follower.reset()
        return health.Tick()

    async def _exited(self, entry: _Entry, wait: float) -> str | None:
        """Wait up to `wait` seconds; the exit description if the process is gone."""
        if entry.exit_task is not None:
            done, _ = await asyncio.wait({entry.exit_task}, timeout=wait)
            if not done:
                return None
            code = entry.exit_task.result()
            return f"engine exited with code {code}" if code >= 0 else f"engine killed by signal {-code}"
        await asyncio.sleep(wait)  # an adopted engine is not our child: check its identity instead
        if entry.identity is None or await asyncio.to_thread(processes.check, entry.identity) != "same":
            return "engine process is gone"
        return None

    async def _spawn(self, entry: _Entry) -> Observation:
        launch = entry.launch
        if entry.spec is not None and not launcher.port_free(launch.host, launch.port):
            entry.launch = launch = entry.spec.launch(launcher.free_port(launch.host))
            _log.info("engine port taken meanwhile; moving", key=entry.key, port=launch.port)
            self._set(entry, endpoint=launch.endpoint)
        try:
            self._prepare(entry)
            proc, argv = await launcher.spawn(
                launch, entry.log_path, cwd=self.state_dir, user=self.config.engine_user
            )
        except Exception as e:  # a missing binary, an unwritable log dir: retried with backoff
            _log.warning("engine cannot start", key=entry.key, error=str(e))
            return health.SpawnFailed(str(e))
        entry.proc = proc
        entry.exit_task = asyncio.create_task(proc.wait(), name=f"engine-exit:{entry.key}")
        stamp = await asyncio.to_thread(processes.start_stamp, proc.pid)
        entry.identity = processes.Identity(proc.pid, stamp or "", processes.argv_digest(argv))
        entry.started_at = datetime.now(UTC)
        entry.follower = logs.Follower(entry.log_path)
        self._write_record(entry)
        _log.info(
            "engine started", key=entry.key, pid=proc.pid, port=launch.port, argv=launch.redacted_argv()
        )
        self._set(entry, pid=proc.pid, start_time=entry.started_at, measured=None)
        return health.Spawned()

    def _prepare(self, entry: _Entry) -> None:
        for d in entry.launch.prepare_dirs:
            Path(d).mkdir(parents=True, exist_ok=True)
        private_dir(entry.log_path.parent)
        logs.rotate(entry.log_path, self.config.log_backups)
        private_dir(self.state_dir)

    async def _terminate(self, entry: _Entry) -> None:
        """Stop the process group (never a pid that is no longer ours) and forget the process."""
        if entry.identity is not None:
            running = entry.proc is not None and entry.proc.returncode is None
            await launcher.terminate(
                entry.identity,
                entry.exit_task if running else None,
                grace=self.config.stop_timeout,
                key=entry.key,
            )
        entry.identity = entry.proc = entry.exit_task = None

    async def _health(self, launch: Launch) -> bool:
        return await probe.health(
            self._http(),
            launch.probe_host,
            launch.port,
            launch.health_path,
            within=self.config.probe_timeout,
        )

    def _follow_log(self, entry: _Entry) -> None:
        if entry.follower is None or entry.launch.parse_log is None:
            return
        measured = entry.status.measured
        for line in entry.follower.read():
            found = entry.launch.parse_log(line)
            if found is not None:
                measured = found
        if measured is not entry.status.measured:
            self._set(entry, measured=measured)
            self._write_record(entry)

    # ---- bookkeeping ------------------------------------------------------------------------------

    def _adopted_entry(self, rec: records.Record, identity: processes.Identity) -> _Entry:
        launch = records.launch_of(rec)
        started_at = datetime.fromisoformat(rec.started_at)
        entry = _Entry(
            key=rec.key,
            launch=launch,
            log_path=Path(rec.log_path),
            identity=identity,
            started_at=started_at,
            state=EngineState(restarts=rec.restarts),
            status=EngineStatus(
                key=rec.key,
                phase="Starting",
                endpoint=launch.endpoint,
                pid=rec.pid,
                restarts=rec.restarts,
                measured=records.measured_of(rec),
                start_time=started_at,
                adopted=True,
            ),
        )
        entry.follower = logs.Follower(entry.log_path, from_end=True)
        return entry

    def _publish(self, entry: _Entry, before: EngineState) -> None:
        """Report what the health machine changed, and log the transitions worth a line."""
        state, key = entry.state, entry.key
        if state.stage == "ready" and before.stage == "starting":
            _log.info("engine ready", key=key, seconds=round(self._now() - state.started, 2))
        elif state.stage == "stopping" and before.stage != "stopping":
            _log.warning("engine failed; terminating it", key=key, why=state.why)
        elif state.restarts != before.restarts:
            _log.warning("engine failed; restarting with backoff", key=key, failures=state.failures)
        if state.error != before.error and state.error is not None and state.error.reason == "Starting":
            _log.info("engine healthy but not generating yet", key=key, problem=state.error.message)
        st = entry.status
        changes: dict[str, object] = {}
        if state.phase != st.phase:
            changes["phase"] = state.phase
            if state.phase != "CrashLoop":
                changes.update(backoff_seconds=None, next_try=None)  # the wait is over
        if state.restarts != st.restarts:
            changes["restarts"] = state.restarts
        if state.error != st.last_error:
            changes["last_error"] = state.error
        if state.restarts != before.restarts:
            changes["pid"] = None  # the failed process is gone
        if changes:
            self._set(entry, **changes)

    def _write_record(self, entry: _Entry) -> None:
        identity = entry.identity
        if identity is None:
            return
        record = records.of(
            entry.key,
            entry.launch,
            pid=identity.pid,
            start_time=identity.started,
            cmdline_sha256=identity.digest,
            log_path=entry.log_path,
            started_at=(entry.started_at or datetime.now(UTC)).isoformat(),
            restarts=entry.status.restarts,
            measured=entry.status.measured,
        )
        records.write(self.state_dir, record)

    def _set(self, entry: _Entry, **changes: object) -> None:
        entry.status = replace(entry.status, **changes)  # type: ignore[arg-type]
        if "restarts" in changes:
            self._write_record(entry)
        self._emit(entry)

    def _emit(self, entry: _Entry) -> None:
        if self.on_change is not None:
            try:
                self.on_change(entry.status)
            except Exception:
                _log.exception("status callback failed", key=entry.key)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _close_http(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
