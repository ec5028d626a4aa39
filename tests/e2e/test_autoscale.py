"""Autoscaling on the real control plane, a real agent and a real mlx-lm engine.

The test writes the gateway's demand Lease itself (the contract in docs/architecture.md), so the
controller's side is judged alone: demand held at zero starts exactly one replica, which becomes
Ready and answers; with no request for the idle timeout the deployment goes back to zero; and the
controller never writes the user's spec (generation unchanged, no spec field in its managedFields).
The same path driven by real requests through the gateway and the openai SDK is in test_gateway.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev.cluster import Cluster
from orchardist.oci.push import push
from orchardist_agent.engines import Runtime
from tests.fixtures.agents import Agent, Operator, chat, make_agent, registered, stop_recorded_engines
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine]

SYSTEM = "orchardist-system"
IDLE_S = 20
HELD = 32


def micro(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="session")
async def tiny_tag(registry: str, tiny_model: Path) -> str:
    await push(tiny_model, f"{registry}/autoscale-e2e/tiny:v1")
    return f"oci://{registry}/autoscale-e2e/tiny:v1"


class Scene:
    """One namespace, one real agent, one operator; kubectl for everything else."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.cluster, self.ns = cluster, ns
        self.operator: Operator | None = None
        self.agent: Agent | None = None

    def get(self, *args: str) -> Any:
        out = self.cluster.kubectl("get", *args, "-n", self.ns, "-o", "json", check=False)
        if out.returncode != 0:
            if "NotFound" in out.stderr:
                return None
            raise AssertionError(out.stderr)
        return json.loads(out.stdout)

    def apply(self, doc: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))

    def md(self) -> dict[str, Any]:
        got = self.get("modeldeployment", "tiny")
        assert got is not None
        return got  # type: ignore[no-any-return]

    def replicas(self) -> list[dict[str, Any]]:
        items = (self.get("modelreplicas", "-l", "orchardist.io/deployment=tiny") or {}).get("items") or []
        return [r for r in items if not r["metadata"].get("deletionTimestamp")]

    def demand(self, in_flight: int, held: int) -> None:
        """Play the gateway: write the demand Lease (requests in flight, held ones included)."""
        self.apply(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": "tiny-demand",
                    "namespace": self.ns,
                    "labels": {"orchardist.io/demand-for": "tiny"},
                    "annotations": {
                        "orchardist.io/in-flight": str(in_flight),
                        "orchardist.io/held": str(held),
                    },
                },
                "spec": {"holderIdentity": "test-gateway", "renewTime": micro(datetime.now(UTC))},
            }
        )

    def events(self) -> list[str]:
        got = self.get("events", "--field-selector", "involvedObject.name=tiny") or {}
        return [e["reason"] for e in got.get("items") or []]

    def logs(self) -> str:
        parts = ["\n".join(self.operator.lines[-60:])] if self.operator else []
        if self.agent is not None:
            parts.append(self.agent.tail(40))
        return "\n\n".join(parts)


@pytest.fixture
def scene(cluster: Cluster, namespace: str, tmp_path: Path, mlx_runtime: Runtime) -> Iterator[Scene]:
    cluster.kubectl("create", "namespace", SYSTEM, check=False)
    s = Scene(cluster, namespace)
    s.agent = make_agent(cluster, tmp_path / "agent", extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}"))
    s.agent.start()
    try:
        registered(cluster, s.agent)
        cluster.kubectl("label", "macnode", s.agent.node, f"test={namespace}")
        s.operator = Operator.spawn(cluster, "--namespace", namespace, "--standalone", "--resync", "1")
        s.operator.wait_started(60)
        yield s
    finally:
        if s.operator is not None:
            s.operator.stop()
        s.agent.stop()
        stop_recorded_engines(s.agent.workdir / "state")  # engines outlive their agent by design
        print(s.logs())  # shown by pytest only when the test failed
        cluster.kubectl("delete", "macnode", s.agent.node, "--ignore-not-found", "--wait=false", check=False)


def spec_writers(md: dict[str, Any]) -> list[str]:
    """Managers other than the test's kubectl that own any field under spec."""
    return [
        f["manager"]
        for f in md["metadata"].get("managedFields") or []
        if not f["manager"].startswith("kubectl") and "f:spec" in (f.get("fieldsV1") or {})
    ]


def test_demand_starts_one_replica_from_zero_and_idle_returns_to_zero(scene: Scene, tiny_tag: str) -> None:
    """32 held at zero -> exactly one replica -> Ready and serving -> idle timeout -> zero; spec untouched."""
    scene.apply(
        {
            "apiVersion": "orchardist.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "tiny", "namespace": scene.ns},
            "spec": {
                "model": tiny_tag,
                "engine": "mlx-lm",
                "replicas": 0,
                "contextLength": 1024,
                "maxConcurrentSequences": 2,
                "placement": {"nodeSelector": {"test": scene.ns}},
                "scaling": {
                    "minReplicas": 0,
                    "maxReplicas": 3,
                    "targetInFlight": 64,
                    "idleTimeoutSeconds": IDLE_S,
                    "scaleDownStabilizationSeconds": 5,
                },
            },
        }
    )
    first = wait_for(
        lambda: (a := (scene.md().get("status") or {}).get("autoscaling")) and a,
        timeout=60,
        interval=0.5,
        message=lambda: f"status.autoscaling written\n{scene.logs()}",
    )
    assert (first["desiredReplicas"], first["reason"]) == (0, "Starting"), first
    assert scene.replicas() == []
    generation = scene.md()["metadata"]["generation"]

    scene.demand(in_flight=HELD, held=HELD)
    most = 0

    def serving() -> dict[str, Any] | None:
        nonlocal most
        reps = scene.replicas()
        most = max(most, len(reps))
        assert most <= 1, f"{len(reps)} replicas for one burst of held requests"
        entries = (scene.md().get("status") or {}).get("replicaStatuses") or []
        return next((e for e in entries if e.get("phase") == "Ready"), None)

    entry = wait_for(serving, timeout=240, interval=1.0, message=lambda: f"one replica Ready\n{scene.logs()}")
    assert chat(entry["endpoint"])["choices"]
    auto = scene.md()["status"]["autoscaling"]
    assert (auto["desiredReplicas"], auto["reason"], auto["held"]) == (1, "ScaleFromZero", HELD), auto
    assert len(scene.replicas()) == 1

    scene.demand(in_flight=0, held=0)  # the held requests were answered; nothing since
    wait_for(
        lambda: scene.replicas() == [] and scene.md()["status"]["autoscaling"]["desiredReplicas"] == 0,
        timeout=IDLE_S + 60,
        interval=1.0,
        message=lambda: f"back to zero after {IDLE_S}s idle\n{scene.logs()}",
    )
    md = scene.md()
    assert md["status"]["autoscaling"]["reason"] == "Idle", md["status"]["autoscaling"]
    ready = next(c for c in md["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ScaledDown", ready
    reasons: list[str] = wait_for(
        lambda: r if {"ScaleFromZero", "Idle"} <= set(r := scene.events()) else None,
        timeout=30,
        interval=0.5,
        message="ScaleFromZero and Idle Events",
    )
    assert reasons.count("ScaleFromZero") == 1, reasons
    assert (md["metadata"]["generation"], md["spec"]["replicas"]) == (generation, 0)
    assert spec_writers(md) == [], md["metadata"]["managedFields"]

    # `kubectl scale` writes spec.replicas through the scale subresource; with scaling set it is
    # only the count to start with, so nothing starts while no request is held.
    scene.cluster.kubectl("scale", "modeldeployment", "tiny", "-n", scene.ns, "--replicas=2")
    scaled = scene.md()
    assert scaled["spec"]["replicas"] == 2 and scaled["metadata"]["generation"] == generation + 1
    wait_for(
        lambda: scene.md()["status"].get("observedGeneration") == generation + 1,
        timeout=30,
        interval=0.5,
        message="the scaled generation reconciled",
    )
    assert scene.md()["status"]["autoscaling"]["desiredReplicas"] == 0
    assert scene.replicas() == []
