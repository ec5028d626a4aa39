"""`orchardist agent run` against the real control plane: MacNode registration and the Lease.

The agent runs as users run it: a subprocess of the installed `orchardist` command, with a
simulated Mac profile (the host here is Linux).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from orchardist.dev.cluster import Cluster

pytestmark = pytest.mark.cluster

ORCHARDIST = Path(sys.executable).with_name("orchardist")
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0, every: float = 0.3) -> T:
    """Poll until `probe` returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except subprocess.CalledProcessError as exc:
            last = exc.stderr
        if last:
            return last  # type: ignore[no-any-return]
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def kget(cluster: Cluster, *args: str) -> Any:
    """`kubectl get ... -o json` as JSON, or None when not found."""
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    if out.returncode != 0:
        if "NotFound" in out.stderr:
            return None
        raise subprocess.CalledProcessError(out.returncode, args, out.stdout, out.stderr)
    return json.loads(out.stdout)


@dataclass
class Agent:
    """One `orchardist agent run` subprocess and where it keeps its things."""

    node: str
    workdir: Path
    cluster: Cluster
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "agent.log"

    def start(self) -> Agent:
        env = self.cluster.env()
        env.pop("KUBECONFIG", None)  # the agent is told explicitly
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def make_agent(
    cluster: Cluster,
    workdir: Path,
    *,
    node: str | None = None,
    extra: tuple[str, ...] = (),
    heartbeat: float = 1.0,
) -> Agent:
    node = node or f"mac-{secrets.token_hex(3)}"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(ORCHARDIST),
        "agent",
        "run",
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--node-name",
        node,
        "--simulate",
        "m4-pro-64gb",
        "--store",
        str(workdir / "store"),
        "--state-dir",
        str(workdir / "state"),
        "--address",
        "127.0.0.1",
        "--bind-address",
        "127.0.0.1",
        "--heartbeat-interval",
        str(heartbeat),
        "--log-format",
        "json",
        *extra,
    ]
    return Agent(node=node, workdir=workdir, cluster=cluster, argv=argv)


@pytest.fixture
def agent(cluster: Cluster, tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(cluster, tmp_path / "agent")
    try:
        yield a
    finally:
        a.stop()
        cluster.kubectl("delete", "macnode", a.node, "--ignore-not-found", "--wait=false", check=False)


def registered(cluster: Cluster, agent: Agent) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        assert agent.proc is None or agent.proc.poll() is None, f"agent exited:\n{agent.tail()}"
        node = kget(cluster, "macnode", agent.node)
        ready = [c for c in ((node or {}).get("status") or {}).get("conditions", []) if c["type"] == "Ready"]
        return node if ready and ready[0]["status"] == "True" else None

    node: dict[str, Any] = wait_for(f"MacNode {agent.node} Ready", probe, timeout=60)
    return node


def renew_time(cluster: Cluster, node: str) -> str | None:
    lease = kget(cluster, "lease", "-n", "orchardist-system", node)
    return None if lease is None else str(lease["spec"].get("renewTime"))


def test_agent_registers_its_macnode_and_renews_its_lease(cluster: Cluster, agent: Agent) -> None:
    agent.start()
    node = registered(cluster, agent)
    status = node["status"]
    assert status["simulatedProfile"] == "m4-pro-64gb"
    assert status["chip"]["family"] == "M4 Pro"
    assert status["memory"]["totalBytes"] == 64 * 2**30
    assert 0 < status["memory"]["gpuWorkingSetBytes"] < status["memory"]["totalBytes"]
    assert status["memory"]["allocatedBytes"] == 0
    assert status["address"] == "127.0.0.1"
    assert status["cachedModels"] == []
    assert {c["type"] for c in status["conditions"]} == {"Ready", "MemoryPressure", "DiskPressure"}

    # The printer columns a person sees.
    table = cluster.kubectl("get", "macnodes", agent.node).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:6] == ["NAME", "CHIP", "MEMORY", "WORKING", "SET", "READY"]
    assert row[0] == agent.node
    assert row[1:3] == ["M4", "Pro"]
    assert row[3] == "64Gi"
    assert row[4] == status["memory"]["gpuWorkingSet"] and row[4].endswith("Gi")
    assert row[5] == "True"

    lease = kget(cluster, "lease", "-n", "orchardist-system", agent.node)
    assert lease["spec"]["holderIdentity"] == agent.node
    assert lease["spec"]["leaseDurationSeconds"] == 40
    first = lease["spec"]["renewTime"]
    wait_for("the Lease to be renewed", lambda: renew_time(cluster, agent.node) != first, timeout=10)


def test_killed_agent_stops_renewing(cluster: Cluster, agent: Agent) -> None:
    agent.start()
    registered(cluster, agent)
    wait_for("a first renewal", lambda: renew_time(cluster, agent.node), timeout=10)
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    last = renew_time(cluster, agent.node)
    time.sleep(4.0)  # four heartbeat intervals
    assert renew_time(cluster, agent.node) == last


def test_sigterm_exits_cleanly_and_marks_the_node(cluster: Cluster, agent: Agent) -> None:
    agent.start()
    registered(cluster, agent)
    assert agent.signal(signal.SIGTERM) == 0, agent.tail()
    node = kget(cluster, "macnode", agent.node)
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AgentStopped")


def test_user_spec_and_labels_survive_an_agent_restart(cluster: Cluster, agent: Agent) -> None:
    agent.start()
    registered(cluster, agent)
    cluster.kubectl(
        "patch",
        "macnode",
        agent.node,
        "--type=merge",
        "-p",
        json.dumps(
            {
                "spec": {
                    "unschedulable": True,
                    "taints": [{"key": "dedicated", "value": "ci", "effect": "NoSchedule"}],
                }
            }
        ),
    )
    cluster.kubectl("label", "macnode", agent.node, "team=ml")
    agent.signal(signal.SIGTERM)
    agent.start()
    node = registered(cluster, agent)
    assert node["spec"]["unschedulable"] is True
    assert node["spec"]["taints"] == [{"key": "dedicated", "value": "ci", "effect": "NoSchedule"}]
    assert node["metadata"]["labels"]["team"] == "ml"


def test_agent_waits_for_an_unreachable_api_server_and_exits_on_sigterm(tmp_path: Path) -> None:
    """No control plane at all: the agent keeps retrying registration and still stops on SIGTERM."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "current-context: c\n"
    )
    argv = [str(ORCHARDIST), "agent", "run", "--kubeconfig", str(kubeconfig), "--node-name", "nowhere"]
    argv += ["--simulate", "m1-8gb", "--store", str(tmp_path / "s"), "--state-dir", str(tmp_path / "st")]
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = subprocess.Popen([*argv, "--log-format", "json"], stderr=subprocess.PIPE, env=env)
    try:
        time.sleep(3.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None
    assert b"registration failed; retrying" in proc.stderr.read()


def test_a_deleted_macnode_is_registered_again(cluster: Cluster, agent: Agent) -> None:
    agent.start()
    first = registered(cluster, agent)
    cluster.kubectl("delete", "macnode", agent.node, "--wait=true")
    agent_node = wait_for(
        "the MacNode to come back",
        lambda: (
            (n := kget(cluster, "macnode", agent.node))
            and n["metadata"]["uid"] != first["metadata"]["uid"]
            and n
        ),
        timeout=30,  # host facts are refreshed (and the status rewritten) every 6 heartbeats
    )
    assert agent_node["status"]["chip"]["family"] == "M4 Pro"
