"""Engines run as an unprivileged user and cannot read the agent's credentials.

The agent's state directory is 0700 with its token 0600 (as `orchardist agent run` keeps them);
an engine started by the supervisor under the engine user tries to read the token, its own log
by name and the agent's environment, and is refused all three, while a world-readable file next to
them is read (so the refusals are the permissions' doing, not a broken test). A real mlx-lm engine
serves the tiny model under that uid.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from orchardist_agent.engines import EngineSpec, Launch, Plan, Probe, Runtime
from orchardist_agent.supervisor import Supervisor, SupervisorConfig, records
from orchardist_agent.supervisor.launcher import command
from orchardist_agent.supervisor.users import EngineUser, engine_env, sudo_prefix
from tests.fixtures.wait import async_wait_for

PLAN = Plan(kv_budget_bytes=64 << 20, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512)

SNOOP = textwrap.dedent(
    """
    import os, sys, time
    def attempt(label, path):
        try:
            with open(path) as f:
                print(label, "READ", f.read().strip(), flush=True)
        except OSError as e:
            print(label, "REFUSED", type(e).__name__, flush=True)
    print("uid", os.getuid(), "gid", os.getgid(), "groups", os.getgroups(), flush=True)
    print("env", sorted(os.environ), flush=True)
    print("home", os.environ.get("HOME"), "cwd", os.getcwd(), flush=True)
    for label, path in zip(["token", "log", "record", "public"], sys.argv[1:]):
        attempt(label, path)
    print("done", flush=True)
    time.sleep(600)
    """
)


@dataclass(frozen=True)
class Snoop:
    """A Launchable whose 'engine' is the snooping script above (run by the runtime's python)."""

    python: str
    paths: tuple[str, ...]
    host: str = "127.0.0.1"

    def launch(self, port: int) -> Launch:
        return Launch(
            argv=(self.python, "-c", SNOOP, *self.paths),
            env={"ORCHARDIST_ENGINE_PORT": str(port)},
            host=self.host,
            port=port,
            probe=Probe(path="/v1/completions", body={}),
        )


async def test_the_engine_cannot_read_the_agents_token(
    engine_user: EngineUser, mlx_runtime: Runtime, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = shared_dir / "agent"  # what `orchardist agent run` makes of --state-dir: 0700
    agent.mkdir(mode=0o700)
    token = agent / "token"
    token.write_text("agent-token-value")
    token.chmod(0o600)
    public = shared_dir / "public.txt"
    public.write_text("anyone may read this")
    public.chmod(0o644)
    monkeypatch.setenv("KUBECONFIG", str(agent / "kubeconfig"))
    monkeypatch.setenv("ORCHARDIST_AGENT_SECRET", "do-not-inherit")
    cfg = SupervisorConfig(engine_user=engine_user, ready_timeout=600, tick=0.2)
    sup = Supervisor(agent / "engines", agent / "logs", config=cfg)
    log = agent / "logs" / "team%2Fsnoop.log"
    record = records.path_for(agent / "engines", "team/snoop")
    spec = Snoop(str(mlx_runtime.bin("python")), (str(token), str(log), str(record), str(public)))
    try:
        st = await sup.ensure("team/snoop", spec)
        text = await async_wait_for(
            lambda: log.read_text() if log.exists() and "done" in log.read_text() else None,
            timeout=30,
            message="the snooping engine reported",
        )
        running = sup.status("team/snoop")
        assert running is not None and running.pid is not None
        assert psutil.Process(running.pid).uids().real == engine_user.uid
    finally:
        await sup.shutdown()
    lines = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    assert lines["uid"].startswith(f"{engine_user.uid} gid {engine_user.gid} groups []")
    assert lines["token"] == "REFUSED PermissionError"
    assert lines["log"] == "REFUSED PermissionError"  # it writes through the descriptor it was given
    assert lines["record"] == "REFUSED PermissionError"
    assert lines["public"] == "READ anyone may read this"  # the control: reading works where allowed
    assert "ORCHARDIST_AGENT_SECRET" not in lines["env"] and "KUBECONFIG" not in lines["env"]
    assert lines["home"] == "/nonexistent cwd /"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE((agent / "logs").stat().st_mode) == 0o700
    assert stat.S_IMODE((agent / "engines").stat().st_mode) == 0o700
    assert st.key == "team/snoop"


async def test_mlx_serves_as_the_engine_user(
    engine_user: EngineUser, mlx_runtime: Runtime, tiny_model: Path, shared_dir: Path
) -> None:
    model = shared_dir / "model"  # the store is world-readable (0644 files, 0755 directories)
    shutil.copytree(tiny_model, model)
    for p in [model, *model.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    cfg = SupervisorConfig(engine_user=engine_user, ready_timeout=120, probe_interval=1.0, tick=0.2)
    sup = Supervisor(shared_dir / "state", shared_dir / "logs", config=cfg)
    spec = EngineSpec(engine="mlx-lm", runtime=mlx_runtime, model_dir=model, plan=PLAN, served_model_name="m")
    try:
        await sup.ensure("team/mlx", spec)
        ready = await sup.wait("team/mlx", {"Ready", "CrashLoop"}, within=120)
        log = (shared_dir / "logs" / "team%2Fmlx.log").read_text(errors="replace")
        assert ready.phase == "Ready", log[-2000:]
        assert ready.pid is not None and psutil.Process(ready.pid).uids().real == engine_user.uid
        assert ready.endpoint is not None and ready.endpoint.startswith("127.0.0.1:")
    finally:
        await sup.shutdown()


def test_a_launch_with_the_key_on_its_command_line_is_refused() -> None:
    probe = Probe(path="/v1/completions", body={})
    on_argv = Launch(
        argv=("engine", "--api-key", "s3cr3t"),
        env={},
        host="127.0.0.1",
        port=1,
        probe=probe,
        api_key="s3cr3t",
    )
    in_env = Launch(
        argv=("engine",),
        env={"ENGINE_API_KEY": "s3cr3t"},
        host="127.0.0.1",
        port=1,
        probe=probe,
        api_key="s3cr3t",
    )
    with pytest.raises(ValueError, match="must come by environment"):
        command(on_argv, None, as_root=True)
    assert command(in_env, None, as_root=True) == ["engine"]


def test_a_non_root_agent_goes_through_sudo_keeping_only_the_launch_env() -> None:
    user = EngineUser(name="orchardist-engine", uid=480, gid=480, home="/var/empty")
    probe = Probe(path="/", body={})
    launch = Launch(
        argv=("py", "-m", "mlx_lm"), env={"B": "2", "A": "1"}, host="127.0.0.1", port=1, probe=probe
    )
    assert command(launch, user, as_root=False) == [
        "sudo",
        "-n",
        "-u",
        "orchardist-engine",
        "--preserve-env=A,B",
        "--",
        "py",
        "-m",
        "mlx_lm",
    ]
    assert command(launch, user, as_root=True) == ["py", "-m", "mlx_lm"]  # root sets the uid itself
    assert sudo_prefix(user, []) == ["sudo", "-n", "-u", "orchardist-engine", "--"]


@pytest.mark.parametrize(
    ("inherited", "launch_env", "user", "expected"),
    [
        (
            {
                "PATH": "/bin",
                "HOME": "/root",
                "KUBECONFIG": "/k",
                "LANG": "C.UTF-8",
                "AWS_SECRET_ACCESS_KEY": "x",
            },
            {"HF_HUB_OFFLINE": "1"},
            EngineUser("e", 480, 480, "/var/empty"),
            {
                "PATH": "/bin",
                "LANG": "C.UTF-8",
                "HOME": "/var/empty",
                "USER": "e",
                "LOGNAME": "e",
                "HF_HUB_OFFLINE": "1",
            },
        ),
        (
            {"PATH": "/bin", "HOME": "/Users/me", "PYTHONPATH": "/agent/venv"},
            {"PATH": "/engine/bin"},
            None,
            {"PATH": "/engine/bin", "HOME": "/Users/me"},
        ),
    ],
)
def test_engine_env_is_an_allowlist(
    inherited: dict[str, str], launch_env: dict[str, str], user: EngineUser | None, expected: dict[str, str]
) -> None:
    assert engine_env(inherited, launch_env, user) == expected


def test_this_process_is_not_the_engine_user(engine_user: EngineUser) -> None:
    """The premise of the tests above: the agent (this test) and the engine are different uids."""
    assert os.geteuid() != engine_user.uid and sys.platform == "linux"
