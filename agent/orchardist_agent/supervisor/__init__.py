"""Engine processes: start, readiness, liveness, restart with backoff, adopt after an agent restart, stop.

Each engine runs in its own process group and session, writing straight to its log file, so it
outlives the agent; a record per replica (pid, start stamp, command line digest, port) lets the next
agent adopt it without interrupting serving. A record whose pid now belongs to another process is
dropped and that process is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import quote

import aiohttp

from orchardist import log
from orchardist_agent.engines.base import Launch, Measured, Probe
from orchardist_agent.supervisor import logs, probe, procs, records
from orchardist_agent.supervisor.policy import backoff_delay, failures_after_uptime, tail_message

_log = log.get(__name__)

Phase = Literal["Starting", "Ready", "CrashLoop", "Stopped"]
_SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


class Launchable(Protocol):
    """What `ensure` needs: the bind host and the launch for a given port (EngineSpec fits)."""

    @property
    def host(self) -> str: ...

    def launch(self, port: int) -> Launch: ...


@dataclass(frozen=True)
class LastError:
    reason: str
    message: str


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
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SupervisorConfig:
    backoff_base: float = 10.0
    backoff_max: float = 300.0
    ready_timeout: float = 900.0
    probe_interval: float = 10.0
    probe_timeout: float = 5.0
    completion_timeout: float = 120.0
    liveness_failures: int = 3
    stop_timeout: float = 30.0
    stable_after: float = 600.0  # Ready this long -> the backoff starts over
    tick: float = 0.5  # how often a process's existence and its log are checked
    log_max_bytes: int = 32 << 20
    log_backups: int = 3
    tail_lines: int = 25


@dataclass
class _Entry:
    key: str
    launch: Launch
    log_path: Path
    status: EngineStatus
    pid: int | None = None
    started: str = ""
    digest: str = ""
    proc: asyncio.subprocess.Process | None = None
    exit_task: asyncio.Task[int] | None = None  # one waiter per child process
    task: asyncio.Task[None] | None = None
    failures: int = 0
    follower: logs.Follower | None = None
    started_at: datetime | None = None
    spec: Launchable | None = None  # to relaunch on another port when ours was taken meanwhile


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    """A port the kernel says is free on the bind address now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Supervisor:
    """Keeps one engine process per replica key serving.

    `events` receives a status snapshot on every change (and `on_change`, if given, is called), so the
    agent can patch ModelReplica.status promptly.
    """

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
        self.events: asyncio.Queue[EngineStatus] = asyncio.Queue(maxsize=1000)
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
        launch = spec.launch(free_port(spec.host))
        log_path = self.log_dir / (quote(key, safe="") + ".log")
        entry = _Entry(
            key=key,
            launch=launch,
            log_path=log_path,
            status=EngineStatus(
                key=key, phase="Starting", endpoint=launch.endpoint, warnings=launch.warnings
            ),
            spec=spec,
        )
        self._entries[key] = entry
        entry.task = asyncio.create_task(self._run(entry, spawn=True), name=f"engine:{key}")
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
        await self._terminate(entry)
        records.remove(self.state_dir, key)
        self._set(entry, phase="Stopped", pid=None)
        del self._entries[key]

    async def adopt(self) -> list[EngineStatus]:
        """Take over engines a previous agent started; drop records of processes that are gone or other."""
        adopted: list[EngineStatus] = []
        for rec in records.load_all(self.state_dir):
            if rec.key in self._entries:
                continue
            if not procs.same_process(rec.pid, rec.start_time, rec.cmdline_sha256):
                why = "gone" if not procs.alive(rec.pid) else "pid now belongs to another process"
                _log.info("dropping stale engine record", key=rec.key, pid=rec.pid, why=why)
                records.remove(self.state_dir, rec.key)
                continue
            launch = Launch(
                argv=tuple(rec.argv),
                env=rec.env,
                host=rec.host,
                port=rec.port,
                probe=Probe(path=rec.probe_path, body=rec.probe_body),
                health_path=rec.health_path,
                api_key=rec.api_key,
            )
            measured = Measured(**rec.measured) if rec.measured else None
            entry = _Entry(
                key=rec.key,
                launch=launch,
                log_path=Path(rec.log_path),
                pid=rec.pid,
                started=rec.start_time,
                digest=rec.cmdline_sha256,
                started_at=datetime.fromisoformat(rec.started_at),
                status=EngineStatus(
                    key=rec.key,
                    phase="Starting",
                    endpoint=launch.endpoint,
                    pid=rec.pid,
                    restarts=rec.restarts,
                    measured=measured,
                    start_time=datetime.fromisoformat(rec.started_at),
                    adopted=True,
                ),
            )
            entry.follower = logs.Follower(entry.log_path, from_end=True)
            self._entries[rec.key] = entry
            healthy = await probe.health(
                self._http(),
                launch.probe_host,
                launch.port,
                launch.health_path,
                within=self.config.probe_timeout,
            )
            if healthy:
                self._set(entry, phase="Ready")
            _log.info("adopted engine", key=rec.key, pid=rec.pid, port=rec.port, healthy=healthy)
            entry.task = asyncio.create_task(
                self._run(entry, spawn=False, ready=healthy), name=f"engine:{rec.key}"
            )
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

    # ---- the per-engine loop ----------------------------------------------------------------------

    async def _run(self, entry: _Entry, *, spawn: bool, ready: bool = False) -> None:
        cfg = self.config
        while True:
            if spawn:
                delay = backoff_delay(entry.failures, base=cfg.backoff_base, cap=cfg.backoff_max)
                if delay:
                    await asyncio.sleep(delay)
                launch = entry.launch
                if entry.spec is not None and not port_free(launch.host, launch.port):
                    entry.launch = entry.spec.launch(free_port(launch.host))
                    _log.info("engine port taken meanwhile; moving", key=entry.key, port=entry.launch.port)
                    self._set(entry, endpoint=entry.launch.endpoint)
                try:
                    await self._spawn(entry)
                except Exception as e:  # a missing binary, an unwritable log dir: retried with backoff
                    entry.failures += 1
                    _log.warning("engine cannot start", key=entry.key, error=str(e))
                    self._set(
                        entry, phase="CrashLoop", last_error=LastError("CrashLoop", f"cannot start: {e}")
                    )
                    continue
            spawn = True
            try:
                why = await self._watch(entry, ready=ready)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let one engine's loop die silently with a stale status
                _log.exception("engine watch failed", key=entry.key)
                why = f"supervisor error: {e.__class__.__name__}: {e}"
            ready = False
            await self._terminate(entry)
            entry.failures += 1
            lines = logs.tail(entry.log_path, cfg.tail_lines)
            message = tail_message([why, "--- last log lines ---", *lines])
            _log.warning(
                "engine failed; restarting with backoff", key=entry.key, why=why, failures=entry.failures
            )
            self._set(
                entry,
                phase="CrashLoop",
                pid=None,
                restarts=entry.status.restarts + 1,
                last_error=LastError("CrashLoop", message),
            )

    async def _spawn(self, entry: _Entry) -> None:
        launch = entry.launch
        self._prepare(entry)
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV} | dict(launch.env)
        with entry.log_path.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=str(self.state_dir),
                start_new_session=True,
            )
        entry.proc, entry.pid = proc, proc.pid
        entry.exit_task = asyncio.create_task(proc.wait(), name=f"engine-exit:{entry.key}")
        entry.started = procs.start_time(proc.pid) or ""
        entry.digest = procs.argv_digest(launch.argv)
        entry.started_at = datetime.now(UTC)
        entry.follower = logs.Follower(entry.log_path)
        self._write_record(entry)
        _log.info(
            "engine started", key=entry.key, pid=proc.pid, port=launch.port, argv=launch.redacted_argv()
        )
        self._set(entry, phase="Starting", pid=proc.pid, start_time=entry.started_at, measured=None)

    def _prepare(self, entry: _Entry) -> None:
        for d in entry.launch.prepare_dirs:
            Path(d).mkdir(parents=True, exist_ok=True)
        entry.log_path.parent.mkdir(parents=True, exist_ok=True)
        logs.rotate(entry.log_path, self.config.log_backups)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    async def _watch(self, entry: _Entry, *, ready: bool) -> str:
        """Return why the process stopped serving (exit, failed liveness, readiness timeout)."""
        cfg, launch = self.config, entry.launch
        loop = asyncio.get_running_loop()
        begun = loop.time()
        next_probe = begun
        misses = 0
        while True:
            exited = await self._exited(entry, cfg.tick)
            self._follow_log(entry)
            if exited is not None:
                return exited
            now = loop.time()
            if entry.follower is not None and entry.log_path.exists():
                with contextlib.suppress(OSError):
                    if entry.log_path.stat().st_size > cfg.log_max_bytes:
                        logs.copy_truncate(entry.log_path, cfg.log_backups)
                        entry.follower.reset()
            if now < next_probe:
                continue
            if not ready:
                next_probe = now + cfg.tick
                if now - begun > cfg.ready_timeout:
                    return f"not ready after {cfg.ready_timeout:.0f} s"
                if not await self._health(launch):
                    continue
                problem = await probe.completion(
                    self._http(),
                    launch.probe_host,
                    launch.port,
                    launch.probe.path,
                    launch.probe.body,
                    api_key=launch.api_key,
                    within=cfg.completion_timeout,
                )
                if problem is not None:
                    _log.info("engine healthy but not generating yet", key=entry.key, problem=problem)
                    error = LastError("Starting", f"healthy but the readiness completion failed: {problem}")
                    if entry.status.last_error != error:
                        self._set(entry, last_error=error)  # e.g. a 401 says the key is wrong
                    next_probe = loop.time() + 1.0
                    continue
                ready = True
                became_ready = loop.time()
                _log.info("engine ready", key=entry.key, seconds=round(became_ready - begun, 2))
                last = entry.status.last_error
                self._set(
                    entry, phase="Ready", last_error=None if last and last.reason == "Starting" else last
                )
                next_probe = became_ready + cfg.probe_interval
                continue
            next_probe = now + cfg.probe_interval
            if await self._health(launch):
                misses = 0
                up = (datetime.now(UTC) - entry.started_at).total_seconds() if entry.started_at else 0.0
                entry.failures = failures_after_uptime(entry.failures, up, stable_after=cfg.stable_after)
                if entry.status.phase != "Ready":
                    self._set(entry, phase="Ready")
                continue
            misses += 1
            if misses >= cfg.liveness_failures:
                return f"{launch.health_path} failed {misses} times in a row"

    async def _exited(self, entry: _Entry, wait: float) -> str | None:
        """Wait up to `wait` seconds; the exit description if the process is gone."""
        if entry.exit_task is not None:
            done, _ = await asyncio.wait({entry.exit_task}, timeout=wait)
            if not done:
                return None
            code = entry.exit_task.result()
            return f"engine exited with code {code}" if code >= 0 else f"engine killed by signal {-code}"
        await asyncio.sleep(wait)
        if entry.pid is None or not procs.same_process(entry.pid, entry.started, entry.digest):
            return "engine process is gone"
        return None

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

    async def _terminate(self, entry: _Entry) -> None:
        """SIGTERM the group, SIGKILL it after the timeout; never signal a pid that is no longer ours."""
        pid = entry.pid
        if pid is None:
            return
        ours = entry.proc is not None and entry.proc.returncode is None
        if not ours and not procs.same_process(pid, entry.started, entry.digest):
            entry.pid = entry.proc = entry.exit_task = None
            return
        procs.signal_group(pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_timeout
        while loop.time() < deadline:
            if entry.exit_task is not None:
                done, _ = await asyncio.wait({entry.exit_task}, timeout=0.2)
                if done:
                    break
            else:
                await asyncio.sleep(0.2)
                if not procs.alive(pid):
                    break
        else:
            _log.warning("engine ignored SIGTERM; killing its group", key=entry.key, pid=pid)
        # Also ends helpers (e.g. vLLM's EngineCore) left in the group after the leader exited, and
        # waits for them: a killed process with gigabytes mapped takes a moment to go.
        procs.signal_group(pid, signal.SIGKILL)
        for _ in range(50):
            if not procs.group_alive(pid):
                break
            await asyncio.sleep(0.1)
        if entry.exit_task is not None:
            await asyncio.wait({entry.exit_task}, timeout=5)
        entry.pid = entry.proc = entry.exit_task = None

    # ---- bookkeeping ------------------------------------------------------------------------------

    def _write_record(self, entry: _Entry) -> None:
        if entry.pid is None:
            return
        launch, m = entry.launch, entry.status.measured
        records.write(
            self.state_dir,
            records.Record(
                key=entry.key,
                pid=entry.pid,
                start_time=entry.started,
                cmdline_sha256=entry.digest,
                fingerprint=launch.fingerprint(),
                argv=list(launch.argv),
                env=dict(launch.env),
                host=launch.host,
                port=launch.port,
                health_path=launch.health_path,
                probe_path=launch.probe.path,
                probe_body=dict(launch.probe.body),
                api_key=launch.api_key,
                log_path=str(entry.log_path),
                started_at=(entry.started_at or datetime.now(UTC)).isoformat(),
                restarts=entry.status.restarts,
                measured=(
                    {
                        "overhead_bytes": m.overhead_bytes,
                        "num_blocks": m.num_blocks,
                        "details": dict(m.details),
                    }
                    if m
                    else {}
                ),
            ),
        )

    def _set(self, entry: _Entry, **changes: object) -> None:
        entry.status = replace(entry.status, **changes)  # type: ignore[arg-type]
        if "restarts" in changes:
            self._write_record(entry)
        self._emit(entry)

    def _emit(self, entry: _Entry) -> None:
        if self.events.full():  # nobody reads the queue: keep the newest snapshots
            self.events.get_nowait()
        self.events.put_nowait(entry.status)
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


__all__ = [
    "EngineStatus",
    "LastError",
    "Launchable",
    "Phase",
    "Supervisor",
    "SupervisorConfig",
    "free_port",
]
