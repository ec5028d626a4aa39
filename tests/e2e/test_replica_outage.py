"""`kubectl get mr` during an agent outage: the controller shows the replica Unknown, the agent puts
its own phase back when it reports again.

The real control plane, a real `orchardist operator run` (Lease grace 6 s, resync 1 s) and a real
agent (a simulated M4 Pro) serving the tiny model with mlx-lm. The engine is a process group of its
own, so it keeps running through both outages (paused agent, killed agent): the replica's proxy,
which lives in the agent, is what stops answering, and the column must not say Ready meanwhile.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from orchardist_agent.engines import Runtime
from tests.e2e.test_controller import GRACE, World, tiny_tag, world  # noqa: F401 (fixtures)
from tests.e2e.test_day2_status import table
from tests.fixtures.agents import alive, engine_pid, make_agent, stop_recorded_engines
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine]

RESYNC = 1.0  # World.start_operator's --resync


def shown(w: World, name: str) -> str | None:
    """The STATUS column of `kubectl get mr` for ``name``, as printed."""
    rows = [r for r in table(w.cluster, "mr", "-n", w.ns) if r["NAME"] == name]
    return rows[0]["STATUS"] if rows else None


def ready_condition(w: World, name: str) -> dict[str, Any]:
    got = w.get("modelreplica", name, "-n", w.ns) or {}
    conds = (got.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Ready"), {})


def test_a_silent_macs_replica_is_unknown_until_its_agent_reports_again(
    world: World,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    mlx_runtime: Runtime,
) -> None:
    """SIGSTOP, then SIGKILL, the agent of a Ready replica: each time `kubectl get mr` says Unknown
    once the Lease expired (Ready=Unknown, NodeNotReady, the Lease's age), and Ready again once the
    agent reports: the paused one though nothing changed in its own view, the restarted one after
    adopting the engine that kept running."""
    agent = make_agent(world.cluster, tmp_path / "agent", extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}"))
    agent.start()
    try:
        wait_for(lambda: world.get("macnode", agent.node), timeout=60, message="the agent's MacNode")
        world.kubectl("label", "macnode", agent.node, f"test={world.ns}")
        world.macs.append(agent.node)
        world.start_operator()
        world.deploy("tiny", replicas=1)
        (rep,) = wait_for(lambda: world.replicas("tiny"), timeout=60, message="a replica")
        name = rep["metadata"]["name"]
        wait_for(
            lambda: shown(world, name) == "Ready",
            timeout=240,
            message=lambda: f"{name} Ready; agent:\n{agent.tail(40)}",
        )
        serving = world.get("modelreplica", name, "-n", world.ns)["status"]
        outage = GRACE + RESYNC + 30

        # 1. Paused: the process lives on, its Lease does not.
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: shown(world, name) == "Unknown", timeout=outage, message="Unknown while paused")
            st = world.get("modelreplica", name, "-n", world.ns)["status"]  # read before it resumes
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        ready = next(c for c in st["conditions"] if c["type"] == "Ready")
        assert (st["phase"], ready["status"], ready["reason"]) == ("Unknown", "Unknown", "NodeNotReady"), st
        assert ready["message"].startswith(f"Mac {agent.node} is NotReady: its agent last renewed the Lease")
        assert ready["message"].endswith(" s ago") and st["message"] == ready["message"]
        assert {c["type"] for c in st["conditions"]} == {c["type"] for c in serving["conditions"]}  # kept
        wait_for(
            lambda: shown(world, name) == "Ready",
            timeout=30,
            message=lambda: f"Ready again after SIGCONT; agent:\n{agent.tail(40)}",
        )
        assert agent.proc.poll() is None  # the same process: its own view never changed
        back = world.get("modelreplica", name, "-n", world.ns)["status"]
        assert "message" not in back and ready_condition(world, name)["status"] == "True"

        # 2. Killed: the engine keeps running (its own process group); the proxy died with the agent.
        pid = engine_pid(serving)
        assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
        wait_for(lambda: shown(world, name) == "Unknown", timeout=outage, message="Unknown while killed")
        assert alive(pid)  # the engine outlived its agent: Unknown, not Failed
        events = world.get("events", "-n", world.ns, "--field-selector", f"involvedObject.name={name}")
        assert "NodeNotReady" in {e["reason"] for e in events["items"]}
        agent.start()
        wait_for(
            lambda: shown(world, name) == "Ready",
            timeout=120,
            message=lambda: f"Ready after the restart; agent:\n{agent.tail(40)}",
        )
        assert engine_pid(world.get("modelreplica", name, "-n", world.ns)["status"]) == pid  # adopted
    finally:
        agent.stop()
        stop_recorded_engines(agent.workdir / "state")  # engines outlive their agent by design
