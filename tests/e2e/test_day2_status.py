"""Day-2 status on the real control plane: what `kubectl get` shows a platform engineer.

A real agent (a simulated M4 Pro) and a real `orchardist operator run`: a killed agent's MacNode
turns NotReady within the Lease grace plus one resync, and Ready again when the agent returns;
`kubectl get mn` shows the memory allocated and free; `kubectl get md -o wide` says why a
deployment that fits nowhere is not served, without `describe`.
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev.cluster import Cluster
from orchardist.oci.push import push
from tests.fixtures.agents import Agent, Operator, condition, kget, make_agent, registered
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster]

GRACE = 6.0  # the operator's --lease-grace here, so expiry is quick
RESYNC = 1.5  # the operator's --resync
SYSTEM = "orchardist-system"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    proc: Operator
    health_port: int


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[Running]:
    cluster.kubectl("create", "namespace", SYSTEM, check=False)
    port = free_port()
    op = Operator.spawn(
        cluster,
        "--standalone",
        "--lease-grace",
        str(GRACE),
        "--resync",
        str(RESYNC),
        "--health-port",
        str(port),
    )
    try:
        op.wait_started(60)
        yield Running(op, port)
    finally:
        op.stop()


@pytest.fixture
def agent(cluster: Cluster, tmp_path: Path) -> Iterator[Agent]:
    a = make_agent(cluster, tmp_path / "agent", heartbeat=1.0)
    a.start()
    try:
        yield a
    finally:
        a.stop()
        cluster.kubectl("delete", "macnode", a.node, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "lease", a.node, "-n", SYSTEM, "--ignore-not-found", check=False)


def table(cluster: Cluster, *args: str) -> list[dict[str, str]]:
    """`kubectl get ...` as printed (the printer columns), one dict per row keyed by header."""
    lines = cluster.kubectl("get", *args).stdout.splitlines()
    header = lines[0]
    # Column names may hold one space ("WORKING SET"); kubectl pads columns with three or more.
    starts = [i for i in range(len(header)) if header[i] != " " and (i == 0 or header[i - 2 : i] == "  ")]
    names = [header[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
    return [
        {n: line[s:e].strip() for n, s, e in zip(names, starts, [*starts[1:], None], strict=True)}
        for line in lines[1:]
    ]


def renewed_at(cluster: Cluster, node: str) -> datetime:
    lease = kget(cluster, "lease", node, "-n", SYSTEM)
    return datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))


def test_killed_agent_shows_not_ready_within_grace_plus_one_resync(
    cluster: Cluster, agent: Agent, operator: Running
) -> None:
    """SIGKILL the agent: Ready=Unknown (LeaseExpired, naming the last renewal) in time; a restarted
    agent sets it back to True."""
    registered(cluster, agent)
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    last = renewed_at(cluster, agent.node)

    def marked() -> dict[str, Any] | None:
        ready = condition((kget(cluster, "macnode", agent.node) or {}).get("status") or {}, "Ready")
        return ready if ready.get("status") == "Unknown" else None

    ready = wait_for(marked, timeout=GRACE + RESYNC + 30, interval=0.2, message="Ready=Unknown")
    seen = datetime.now(UTC)
    # Grace plus one resync, plus a second for the poll and the write.
    assert (seen - last).total_seconds() <= GRACE + RESYNC + 1.0, (seen, last)
    assert ready["reason"] == "LeaseExpired"
    assert last.strftime("%Y-%m-%dT%H:%M:%SZ") in ready["message"], ready
    [row] = [r for r in table(cluster, "mn") if r["NAME"] == agent.node]
    assert row["READY"] == "Unknown"
    events = kget(cluster, "events", "-n", "default", "--field-selector", f"involvedObject.name={agent.node}")
    assert "NodeNotReady" in {e["reason"] for e in events["items"]}

    agent.start()  # the same Mac comes back
    back = wait_for(
        lambda: (
            (c := condition(kget(cluster, "macnode", agent.node)["status"], "Ready")).get("status") == "True"
            and c
        ),
        timeout=60,
        message=lambda: f"Ready=True again; agent log:\n{agent.tail()}",
    )
    assert back["reason"] == "AgentReady"


def test_a_paused_agent_sets_ready_back_when_it_resumes(
    cluster: Cluster, agent: Agent, operator: Running
) -> None:
    """SIGSTOP past the grace: the controller marks the Mac Unknown; on SIGCONT the same agent
    process writes its whole status again (its heartbeat is late), Ready=True without a restart."""
    registered(cluster, agent)
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: (
                condition(kget(cluster, "macnode", agent.node)["status"], "Ready").get("status") == "Unknown"
            ),
            timeout=GRACE + RESYNC + 30,
            message="Ready=Unknown while paused",
        )
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    back = wait_for(
        lambda: (
            (c := condition(kget(cluster, "macnode", agent.node)["status"], "Ready")).get("status") == "True"
            and c
        ),
        timeout=30,
        message=lambda: f"Ready=True after SIGCONT; agent log:\n{agent.tail()}",
    )
    assert back["reason"] == "AgentReady"
    assert agent.proc.poll() is None  # the same process, not a restart


def test_get_mn_shows_memory_allocated_and_free(cluster: Cluster, agent: Agent) -> None:
    """ALLOCATED and FREE are human sizes beside the numbers they are made from."""
    node = registered(cluster, agent)
    memory = node["status"]["memory"]
    gib = 2**30
    free = memory["gpuWorkingSetBytes"] - memory["allocatedBytes"]
    assert (memory["allocated"], memory["free"]) == ("0Gi", f"{free / gib:.0f}Gi"), memory
    [row] = [r for r in table(cluster, "mn") if r["NAME"] == agent.node]
    assert (row["ALLOCATED"], row["FREE"], row["WORKING SET"]) == (
        memory["allocated"],
        memory["free"],
        memory["gpuWorkingSet"],
    )


@pytest.mark.registry
async def test_get_md_wide_says_why_an_unschedulable_deployment_waits(
    cluster: Cluster, namespace: str, operator: Running, registry: str, tiny_model: Path
) -> None:
    """No Mac matches: REASON Unschedulable and the scheduler's message in `kubectl get md -o wide`."""
    await push(tiny_model, f"{registry}/day2/tiny:v1")
    doc = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "nowhere", "namespace": namespace},
        "spec": {
            "model": f"oci://{registry}/day2/tiny:v1",
            "engine": "mlx-lm",
            "contextLength": 1024,
            "placement": {"nodeSelector": {"day2": namespace}},  # matches no Mac
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def row() -> dict[str, str] | None:
        rows = table(cluster, "md", "-n", namespace, "-o", "wide")
        return rows[0] if rows and rows[0]["REASON"] == "Unschedulable" else None

    got = wait_for(row, timeout=60, message="REASON Unschedulable")
    stalled = condition(kget(cluster, "md", "nowhere", "-n", namespace)["status"], "Stalled")
    assert got["STATUS"] == "Failed"
    assert got["MESSAGE"] == " ".join(stalled["message"].split())[:256], (got, stalled)
    assert got["MESSAGE"], got
    [narrow] = table(cluster, "md", "-n", namespace)  # REASON is a default column; MESSAGE needs -o wide
    assert (narrow["REASON"], "MESSAGE" in narrow) == ("Unschedulable", False)


def test_operator_answers_its_probes(cluster: Cluster, agent: Agent, operator: Running) -> None:
    """/healthz answers 200; /readyz answers 200 once every watched kind was listed and handled."""
    registered(cluster, agent)
    base = f"http://127.0.0.1:{operator.health_port}"

    def get(path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert get("/healthz")[0] == 200
    assert wait_for(lambda: get("/readyz")[0] == 200, timeout=30, message="/readyz 200")
    assert get("/healthz") == (200, {"alive": True, "listed": True})


def test_a_taken_health_port_does_not_stop_the_operator(cluster: Cluster) -> None:
    """Two operators on one machine: the second reports the port and keeps running."""
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        op = Operator.spawn(cluster, "--standalone", "--namespace", "day2-none", "--health-port", str(port))
        try:
            op.wait_started(60)
            wait_for(lambda: op.said("health port in use"), timeout=30, message="the taken port reported")
            assert op.proc.poll() is None
        finally:
            op.stop()
