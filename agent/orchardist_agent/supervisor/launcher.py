"""Starting and stopping engine processes: the one place the agent starts an engine.

Each engine runs in its own session and process group, writing straight to its log file, so it
outlives the agent and one signal reaches all of its processes (vLLM's EngineCore, say).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from orchardist import log, processes
from orchardist_agent.engines.base import Launch

_log = log.get(__name__)

# An agent run from a venv must not hand its own interpreter settings to an engine's venv.
_SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


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


async def spawn(launch: Launch, log_path: Path, *, cwd: Path) -> asyncio.subprocess.Process:
    """Start the launch's argv in a new session, stdout and stderr appended to `log_path`."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV} | dict(launch.env)
    with log_path.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *launch.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,
        )


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
