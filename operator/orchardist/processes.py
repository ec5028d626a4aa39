"""Process identity, liveness, groups and signals by pid, through psutil (the OS adapter for processes).

A pid alone is not an identity: after whoever recorded it restarts, the pid may belong to another
process. The pid, the kernel's start time and a digest of the command line together are, and
:func:`check` is the one place that compares them; the agent's engine supervisor and the local
control plane both use it before they adopt or signal a recorded process. psutil reads the kernel
directly (``/proc`` on Linux, ``sysctl`` on macOS), so no ``ps`` is run. Each call is a few system
calls, but async callers that check many processes run them in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import psutil

#: How a recorded process compares with what now runs at its pid.
Verdict = Literal["same", "gone", "other"]

_LINUX = sys.platform.startswith("linux")


@dataclass(frozen=True)
class Identity:
    """What a record keeps to find its process again: pid, start stamp, command line digest."""

    pid: int
    started: str  # opaque; compared for equality only (see start_stamp)
    digest: str  # argv_digest of the command line


def argv_digest(argv: Sequence[str]) -> str:
    """sha256 of the arguments joined by single spaces (the format records have always used)."""
    return hashlib.sha256(" ".join(argv).encode()).hexdigest()


def compare(recorded: Identity, found: Identity | None, *, exists: bool) -> Verdict:
    """Pure: `found` is what `identify` read at the recorded pid; `exists` whether any process has it.

    A pid that exists but cannot be identified (another user's process, a zombie) is "other", so
    it is never signalled.
    """
    if found is None:
        return "other" if exists else "gone"
    return "same" if found == recorded else "other"


@cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stamp(proc: psutil.Process) -> str:
    """Linux: boot id + seconds since boot (immune to wall-clock steps); macOS: the kernel's start time.

    psutil's Linux create_time() adds the current boot time, which moves when the clock is stepped;
    subtracting it again leaves the kernel's tick count. macOS keeps the wall-clock start time itself.
    """
    created = proc.create_time()
    if _LINUX:
        return f"{_boot_id()}:{created - psutil.boot_time():.2f}"
    return f"{created:.6f}"


def identify(pid: int) -> Identity | None:
    """The live process at `pid`; None when there is none, it is a zombie, or it is not readable."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return Identity(pid=pid, started=_stamp(proc), digest=argv_digest(proc.cmdline()))
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def check(recorded: Identity) -> Verdict:
    """The one pid-reuse check: is the process at `recorded.pid` still the one recorded?"""
    return compare(recorded, identify(recorded.pid), exists=psutil.pid_exists(recorded.pid))


def same(recorded: Identity) -> bool:
    return check(recorded) == "same"


def settle(pid: int, argv: Sequence[str], *, within: float = 5.0) -> Identity | None:
    """The identity of a child just started from `argv`, once the kernel shows that command line.

    When fork+exec returns, the kernel may still show an empty command line for a moment (exec is
    finishing), and a check then would call the new process "other". None when it exited meanwhile
    or never showed `argv` (a program that rewrites its own arguments cannot be identified).
    """
    wanted = argv_digest(argv)
    deadline = time.monotonic() + within
    while True:
        found = identify(pid)
        if found is not None and found.digest == wanted:
            return found
        if not alive(pid) or time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def start_stamp(pid: int) -> str | None:
    """The start stamp `identify` would record for `pid` (None when gone or a zombie)."""
    found = identify(pid)
    return found.started if found is not None else None


def cmdline(pid: int) -> list[str] | None:
    """The process's arguments, or None when it is gone or not readable."""
    try:
        return [str(a) for a in psutil.Process(pid).cmdline()]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def alive(pid: int) -> bool:
    """Some process holds `pid` and it is not a zombie (an exited, unreaped child counts as dead)."""
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return bool(status != psutil.STATUS_ZOMBIE)


def descendants(pid: int) -> list[int]:
    """Children, grandchildren ... of `pid` (empty when it is gone)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members: list[int] = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def group_alive(pgid: int) -> bool:
    """Some non-zombie process is still in the group (a killed process takes a moment to go)."""
    return bool(group_members(pgid))


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a whole process group; False when it no longer exists (or is not ours)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
