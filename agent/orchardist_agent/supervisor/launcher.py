"""Starting and stopping engine processes: the one place the agent starts an engine.

Each engine runs in its own session and process group, writing straight to its log file, so it
outlives the agent and one signal reaches all of its processes (vLLM's EngineCore, say). With an
engine user (`users`) it runs under that uid, with only an allowlisted environment.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

from orchardist import log, processes
from orchardist_agent.engines.base import Launch
from orchardist_agent.supervisor import users

_log = log.get(__name__)


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


def command(launch: Launch, user: users.EngineUser | None, *, as_root: bool) -> list[str]:
    """The argv that starts `launch`: as is, or through sudo when a non-root agent needs `user`.

    The API key must reach the engine by environment or file: argv is visible to every local
    user (`ps`), so a launch carrying it there is refused.
    """
    if launch.api_key and any(launch.api_key in arg for arg in launch.argv):
        raise ValueError("the engine's command line carries the API key; it must come by environment")
    if user is None or as_root:
        return list(launch.argv)
    return [*users.sudo_prefix(user, list(launch.env)), *launch.argv]


async def spawn(
    launch: Launch, log_path: Path, *, cwd: Path, user: users.EngineUser | None = None
) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start the launch in a new session (as `user` when given), output appended to `log_path`.

    The log is opened here, 0600 in a directory the supervisor keeps 0700: the engine writes
    through the inherited descriptor and cannot open the file (or its neighbours) by name.
    Returns the process and the argv it was started with (its identity's command line).
    """
    as_root = users.is_root()
    argv = command(launch, user, as_root=as_root)
    env = users.engine_env(os.environ, launch.env, user)
    extra: dict[str, Any] = {}
    if user is not None:
        cwd = Path("/")  # the agent's state directory is not the engine's to read
        if as_root:
            extra = {"user": user.uid, "group": user.gid, "extra_groups": []}
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fd,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,
            **extra,
        )
    finally:
        os.close(fd)
    return proc, argv


async def terminate(
    identity: processes.Identity,
    exit_task: asyncio.Task[int] | None,
    *,
    grace: float,
    key: str,
) -> None:
    """SIGTERM the group, SIGKILL it after `grace` seconds, then wait until no member is left.

    `exit_task` is the child's waiter when this agent started it (then its exit is known at once);
    an adopted process is checked against its record first, so a reused pid is never signalled.
    """
    pid = identity.pid
    if exit_task is None and await asyncio.to_thread(processes.check, identity) != "same":
        return
    processes.signal_group(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if exit_task is not None:
            done, _ = await asyncio.wait({exit_task}, timeout=0.2)
            if done:
                break
        else:
            await asyncio.sleep(0.2)
            if await asyncio.to_thread(processes.check, identity) != "same":
                break
    else:
        _log.warning("engine ignored SIGTERM; killing its group", key=key, pid=pid)
    # Also ends child processes (e.g. vLLM's EngineCore) left in the group after the leader exited, and
    # waits for them: a killed process with gigabytes mapped takes a moment to go.
    processes.signal_group(pid, signal.SIGKILL)
    for _ in range(50):
        if not await asyncio.to_thread(processes.group_alive, pid):
            break
        await asyncio.sleep(0.1)
    if exit_task is not None:
        await asyncio.wait({exit_task}, timeout=5)
