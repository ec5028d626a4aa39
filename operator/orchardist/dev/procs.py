"""Process helpers for the local control plane: ports, start, readiness, stop.

Processes are started in their own session (so one signal reaches the whole group and a dying
parent shell does not take them along) with output to a log file. A :class:`ProcRecord` keeps the
PID, the kernel's start stamp and the command line, so stopping from a stale record never signals
an unrelated process that happens to have reused the PID (the check is :mod:`orchardist.processes`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from orchardist import log, processes

_log = log.get(__name__)

#: Popen handles of children started by this Python process, so stop() can reap them (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


class ProcessError(RuntimeError):
    """A managed process failed to start, died early or did not become ready."""


@dataclass(frozen=True)
class ProcRecord:
    """Enough to find a started process again, from another invocation, without guessing."""

    name: str
    pid: int
    start_time: str
    argv: list[str]
    log: str

    @property
    def identity(self) -> processes.Identity:
        return processes.Identity(self.pid, self.start_time, processes.argv_digest(self.argv))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ProcRecord:
        data = json.loads(text)
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_time=str(data["start_time"]),
            argv=[str(a) for a in data["argv"]],
            log=str(data["log"]),
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick); races are possible but rare."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def is_running(rec: ProcRecord) -> bool:
    """True when the recorded process is still the same live process (pid, start, command line)."""
    _reap(rec.pid)
    return processes.same(rec.identity)


def start(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
    before_exec: Callable[[], None] | None = None,
) -> ProcRecord:
    """Start ``argv`` in a new session with stdout+stderr appended to ``log_path``.

    ``die_with_parent`` (Linux): the kernel sends SIGTERM when this Python process dies, so a test
    run killed by a timeout leaves no control plane behind on a shared machine. Off for
    ``dev cluster up``, whose processes must outlive the command. ``before_exec`` runs in the child
    before exec (e.g. entering a network namespace, which keeps the command line the record checks).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_preexec(die_with_parent and sys.platform == "linux", before_exec),
        )
    _children[proc.pid] = proc
    found = processes.settle(proc.pid, argv)
    if found is None:
        if proc.poll() is None:  # it runs, but a record of it could never be checked: refuse it
            proc.kill()
            proc.wait()
            raise ProcessError(f"{name} does not show the command line it was started with ({argv[0]})")
        proc.wait()
        raise ProcessError(
            f"{name} exited at once (code {proc.returncode}); log: {log_path}\n{tail(log_path)}"
        )
    rec = ProcRecord(name=name, pid=proc.pid, start_time=found.started, argv=list(argv), log=str(log_path))
    _log.debug("started", proc=name, pid=proc.pid, log=str(log_path))
    return rec


def _preexec(tie: bool, before_exec: Callable[[], None] | None) -> Callable[[], None] | None:
    if not tie:
        return before_exec
    if before_exec is None:
        return _tie_to_parent

    def both() -> None:
        _tie_to_parent()
        before_exec()

    return both


def _tie_to_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def tail(path: Path | str, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_http(
    url: str,
    *,
    timeout: float = 60.0,
    proc: ProcRecord | None = None,
    expect: str | None = None,
    token: str | None = None,
    ca_file: Path | None = None,
) -> float:
    """Poll ``url`` until it answers 200 (and contains ``expect``); returns the seconds waited.

    HTTPS is verified against ``ca_file`` when given, else unverified (loopback readiness only).
    Fails fast with the log tail when ``proc`` dies while waiting.
    """
    context: ssl.SSLContext | None = None
    if url.startswith("https:"):
        if ca_file is not None:
            context = ssl.create_default_context(cafile=str(ca_file))
        else:
            context = ssl._create_unverified_context()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    t0 = time.monotonic()
    last = "no answer yet"
    delay = 0.05
    while True:
        if proc is not None and not is_running(proc):
            raise ProcessError(
                f"{proc.name} exited while waiting for {url}; log {proc.log}:\n{tail(proc.log)}"
            )
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=5, context=context) as resp:
                body = resp.read().decode(errors="replace")
                if resp.status == 200 and (expect is None or expect in body):
                    return time.monotonic() - t0
                last = f"HTTP {resp.status}: {body[:200]}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        if time.monotonic() - t0 > timeout:
            where = f"; log {proc.log}:\n{tail(proc.log)}" if proc else ""
            raise ProcessError(f"{url} not ready after {timeout:.0f} s ({last}){where}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)


def stop(rec: ProcRecord, *, grace: float = 10.0) -> bool:
    """SIGTERM the record's process group, SIGKILL after ``grace`` s. False if it was already gone.

    Every signal is preceded by a start-time check, so a reused PID is never signalled.
    """
    if not is_running(rec):
        return False
    _signal(rec, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_running(rec):
            return True
        time.sleep(0.05)
    _log.warning("did not stop on SIGTERM, killing", proc=rec.name, pid=rec.pid)
    _signal(rec, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while is_running(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _signal(rec: ProcRecord, sig: signal.Signals) -> None:
    if not is_running(rec):
        return
    try:
        # The process leads its own group (start_new_session), so its pgid is its pid.
        if os.getpgid(rec.pid) == rec.pid:
            processes.signal_group(rec.pid, sig)
        else:
            os.kill(rec.pid, sig)
    except ProcessLookupError:
        pass


def save(records: Sequence[ProcRecord], directory: Path) -> None:
    """Write one ``<name>.pid.json`` per record."""
    directory.mkdir(parents=True, exist_ok=True)
    for rec in records:
        (directory / f"{rec.name}.pid.json").write_text(rec.to_json())


def load(directory: Path) -> list[ProcRecord]:
    """Records saved by :func:`save`, in start order (oldest first)."""
    recs = [ProcRecord.from_json(p.read_text()) for p in sorted(directory.glob("*.pid.json"))]
    return sorted(recs, key=lambda r: (_start_key(r), r.name))


def _start_key(rec: ProcRecord) -> float:
    """Seconds in the start stamp (after the boot id on Linux); 0 for a stamp of another format."""
    try:
        return float(rec.start_time.rpartition(":")[2])
    except ValueError:
        return 0.0
