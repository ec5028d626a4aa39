"""`orchardist agent run` against the real control plane: MacNode registration and the Lease.

The agent runs as users run it: a subprocess of the installed `orchardist` command, with a
simulated Mac profile (the host here is Linux).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchardist.dev.cluster import Cluster
from tests.fixtures.agents import ORCHARDIST, Agent, kget, make_agent, registered, wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def agent(cluster: Cluster, tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(cluster, tmp_path / "agent")
    try:
        yield a
    finally:
        a.stop()
        cluster.kubectl("delete", "macnode", a.node, "--ignore-not-found", "--wait=false", check=False)


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
    assert header[:8] == ["NAME", "CHIP", "MEMORY", "WORKING", "SET", "ALLOCATED", "FREE", "READY"]
    assert row[0] == agent.node
    assert row[1:3] == ["M4", "Pro"]
    assert row[3] == "64Gi"
    assert row[4] == status["memory"]["gpuWorkingSet"] and row[4].endswith("Gi")
    assert row[5:7] == ["0Gi", status["memory"]["gpuWorkingSet"]]  # nothing allocated: all free
    assert row[7] == "True"

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
    # Watched for four heartbeat intervals: a renewal would end the wait (and fail the test) at once.
    with pytest.raises(AssertionError, match="a renewal after the kill"):
        wait_for("a renewal after the kill", lambda: renew_time(cluster, agent.node) != last, timeout=4.0)


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
    log = tmp_path / "agent.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([*argv, "--log-format", "json"], stderr=stderr, env=env)
    try:
        retries = wait_for(
            "two registration retries",
            lambda: (n := log.read_text().count("registration failed; retrying")) >= 2 and n,
            timeout=30,
        )
        assert retries >= 2 and proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


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
