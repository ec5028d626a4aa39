"""Process facts and signals by pid (the OS adapter): start time, command line, liveness, groups.

A pid alone is not an identity: after an agent restart a recorded pid may belong to another process.
Start time (plus the boot id on Linux) and the command line together are.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

_LINUX = sys.platform.startswith("linux")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _linux_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def _ps(pid: int, field: str) -> str | None:
    try:
        out = subprocess.run(
            ["ps", "-o", f"{field}=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = out.stdout.strip()
    return text or None


def start_time(pid: int) -> str | None:
    """An opaque, comparable start stamp: `<boot id>:<ticks since boot>` on Linux, `ps lstart` on macOS."""
    if _LINUX:
        fields = _linux_stat(pid)
        return f"{_boot_id()}:{fields[19]}" if fields and len(fields) > 19 else None
    return _ps(pid, "lstart")


def cmdline(pid: int) -> str | None:
    """The command line, arguments joined by single spaces."""
    if _LINUX:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return " ".join(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")) or None
    return _ps(pid, "command")


def argv_digest(argv: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256(" ".join(argv).encode()).hexdigest()


def cmdline_digest(pid: int) -> str | None:
    line = cmdline(pid)
    return hashlib.sha256(line.encode()).hexdigest() if line is not None else None


def alive(pid: int) -> bool:
    """The pid exists and is not a zombie (an exited child not yet reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _LINUX:
        fields = _linux_stat(pid)
        return fields is not None and fields[0] != "Z"
    state = _ps(pid, "stat")
    return state is not None and not state.startswith("Z")


def same_process(pid: int, started: str, digest: str) -> bool:
    """The live process at `pid` is the one recorded: same start stamp and same command line."""
    return alive(pid) and start_time(pid) == started and cmdline_digest(pid) == digest


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Some non-zombie process is still in the group (a killed process takes a moment to exit)."""
    if _LINUX:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                raw = stat.read_text()
            except OSError:
                continue
            fields = raw[raw.rfind(")") + 2 :].split()
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
