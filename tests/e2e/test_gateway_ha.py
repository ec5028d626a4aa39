"""Two gateway instances in front of one deployment: demand per instance, summed by the controller.

The real control plane, the operator, one real agent with a real mlx-lm engine, and TWO
`orchardist gateway` processes. A deployment at zero gets requests held on both gateways at once:
each gateway writes its own demand Lease, the controller sums them and starts exactly one replica,
every request is answered; with no request for the idle timeout it goes back to zero; a gateway
stopped with SIGTERM deletes its own Lease and leaves the other's alone.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest

from orchardist.dev.cluster import Cluster
from orchardist.dev.procs import free_port
from orchardist.oci.push import push
from orchardist_agent.engines import Runtime
from tests.fixtures.agents import (
    Agent,
    Operator,
    gateway_argv,
    kget,
    make_agent,
    registered,
    stop_process,
)
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine]

IDLE_S = 15
PER_GATEWAY = 8
TOKEN = "sk-ha-test"


@dataclass
class Gateway:
    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()[:8]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=TOKEN, max_retries=0, timeout=300
        )

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


@dataclass
class Scene:
    cluster: Cluster
    ns: str
    agent: Agent | None = None
    operator: Operator | None = None
    gateways: list[Gateway] = field(default_factory=list)

    def leases(self) -> dict[str, dict[str, Any]]:
        """The deployment's demand Leases by gateway-instance label."""
        got = kget(self.cluster, "leases", "-n", self.ns, "-l", "orchardist.io/demand-for=tiny") or {}
        return {
            (lease["metadata"].get("labels") or {}).get("orchardist.io/gateway-instance", ""): lease
            for lease in got.get("items") or []
        }

    def replicas(self) -> list[dict[str, Any]]:
        got = kget(self.cluster, "modelreplicas", "-n", self.ns, "-l", "orchardist.io/deployment=tiny") or {}
        return [r for r in got.get("items") or [] if not r["metadata"].get("deletionTimestamp")]

    def autoscaling(self) -> dict[str, Any]:
        md = kget(self.cluster, "modeldeployment", "-n", self.ns, "tiny") or {}
        return dict((md.get("status") or {}).get("autoscaling") or {})

    def check(self) -> None:
        assert self.agent is not None and (self.agent.proc is None or self.agent.proc.poll() is None)
        assert self.operator is not None and self.operator.proc.poll() is None, self.logs()
        for gw in self.gateways:
            assert gw.proc.poll() is None or gw.proc.returncode == 0, gw.log.read_text(errors="replace")[
                -3000:
            ]

    def logs(self) -> str:
        parts = ["\n".join(self.operator.lines[-60:])] if self.operator else []
        parts += [f"{g.name}:\n{g.log.read_text(errors='replace')[-2000:]}" for g in self.gateways]
        return "\n\n".join(parts)


def apply(cluster: Cluster, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def start_gateway(cluster: Cluster, ns: str, name: str, work: Path) -> Gateway:
    port, log = free_port(), work / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            gateway_argv(cluster, port, ns, "--instance", name, "--instances", "2"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Gateway(name, port, log, proc)


@pytest.fixture
def scene(
    cluster: Cluster, namespace: str, tmp_path: Path, mlx_runtime: Runtime, registry: str, tiny_model: Path
) -> Iterator[Scene]:
    s = Scene(cluster, namespace)
    s.agent = make_agent(cluster, tmp_path / "agent", extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}"))
    s.agent.start()
    try:
        registered(cluster, s.agent)
        cluster.kubectl("label", "macnode", s.agent.node, f"test={namespace}")
        s.operator = Operator.spawn(cluster, "--namespace", namespace, "--standalone", "--resync", "1")
        s.operator.wait_started(60)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "ha",
                "namespace": namespace,
                "labels": {"orchardist.io/gateway-key": "true"},
            },
            "data": {
                "key": base64.b64encode(TOKEN.encode()).decode(),
                "namespaces": base64.b64encode(namespace.encode()).decode(),
            },
        }
        apply(cluster, secret)
        s.gateways = [start_gateway(cluster, namespace, f"gw-{c}-{namespace}", tmp_path) for c in "ab"]
        wait_for(
            lambda: all(g.ready() for g in s.gateways), timeout=60, interval=0.5, message="gateways ready"
        )
        yield s
    finally:
        for gw in s.gateways:
            stop_process(gw.proc)
        if s.operator is not None:
            cluster.kubectl(
                "delete", "modeldeployments", "--all", "-n", namespace, "--wait=false", check=False
            )
            wait_for(lambda: not s.replicas(), timeout=120, message="replicas deleted with the deployment")
            s.operator.stop()
        s.agent.stop()
        print(s.logs())  # shown by pytest only when the test failed
        cluster.kubectl("delete", "macnode", s.agent.node, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
async def tiny_tag(registry: str, tiny_model: Path) -> str:
    await push(tiny_model, f"{registry}/gateway-ha/tiny:v1")
    return f"oci://{registry}/gateway-ha/tiny:v1"


def test_two_gateways_holding_start_one_replica_and_clean_up_their_leases(
    scene: Scene, tiny_tag: str
) -> None:
    """An old, idle Lease is deleted by the controller; held on both gateways at once -> one replica,
    all answered -> idle -> zero; SIGTERM removes a gateway's own Lease only."""
    old = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    apply(  # what an older, single gateway left: no load, last request 2 h ago
        scene.cluster,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "tiny-demand",
                "namespace": scene.ns,
                "labels": {"orchardist.io/demand-for": "tiny"},
                "annotations": {"orchardist.io/in-flight": "0", "orchardist.io/held": "0"},
            },
            "spec": {"holderIdentity": "gone-gateway", "renewTime": old},
        },
    )
    apply(
        scene.cluster,
        {
            "apiVersion": "orchardist.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "tiny", "namespace": scene.ns},
            "spec": {
                "model": tiny_tag,
                "engine": "mlx-lm",
                "replicas": 0,
                "contextLength": 1024,
                "maxConcurrentSequences": 4,
                "placement": {"nodeSelector": {"test": scene.ns}},
                "scaling": {
                    "minReplicas": 0,
                    "maxReplicas": 3,
                    "targetInFlight": 64,
                    "idleTimeoutSeconds": IDLE_S,
                    "scaleDownStabilizationSeconds": 0,
                },
            },
        },
    )

    def listed() -> bool:
        return all("tiny" in [m.id for m in g.client().models.list()] for g in scene.gateways)

    wait_for(listed, timeout=30, interval=0.5, message="tiny listed by both gateways")
    md_uid = (kget(scene.cluster, "modeldeployment", "-n", scene.ns, "tiny") or {})["metadata"]["uid"]
    assert scene.replicas() == []
    wait_for(lambda: "" not in scene.leases(), timeout=30, interval=0.5, message="the old Lease deleted")
    want = {g.hash for g in scene.gateways}

    def ask(gw: Gateway, i: int) -> str:
        answer = gw.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=4, temperature=0
        )
        return answer.choices[0].message.content or ""

    started: set[str] = set()
    both_held = False
    most_held = 0
    with concurrent.futures.ThreadPoolExecutor(2 * PER_GATEWAY) as pool:
        futures = [pool.submit(ask, gw, i) for i in range(PER_GATEWAY) for gw in scene.gateways]
        while not all(f.done() for f in futures):
            scene.check()
            started |= {r["metadata"]["uid"] for r in scene.replicas()}
            leases = scene.leases()
            held = {
                h: int(lease["metadata"]["annotations"]["orchardist.io/held"]) for h, lease in leases.items()
            }
            both_held = both_held or (set(held) == want and all(held.values()))
            most_held = max(most_held, int(scene.autoscaling().get("held") or 0))
            concurrent.futures.wait(futures, timeout=0.3)
        answers = [f.result() for f in futures]  # each succeeded (result() re-raises otherwise)
    started |= {r["metadata"]["uid"] for r in scene.replicas()}
    assert len(answers) == 2 * PER_GATEWAY
    assert len(started) == 1, f"{len(started)} replicas started for requests held on two gateways"
    assert both_held, "both gateways' Leases were never seen holding at once"
    # Each gateway writes its first held request at once (the rest follow every 2 s, often after the
    # replica is Ready): the status shows the sum over both Leases, so at least one per gateway.
    assert most_held >= len(scene.gateways), f"status.autoscaling.held peaked at {most_held}"
    leases = scene.leases()
    assert set(leases) == want, leases.keys()
    for gw in scene.gateways:
        lease = leases[gw.hash]
        assert lease["metadata"]["name"] == f"tiny-demand-{gw.hash}"
        assert lease["spec"]["holderIdentity"] == gw.name
        assert [(o["kind"], o["name"], o["uid"]) for o in lease["metadata"]["ownerReferences"]] == [
            ("ModelDeployment", "tiny", md_uid)
        ]

    wait_for(
        lambda: scene.replicas() == [] and scene.autoscaling().get("desiredReplicas") == 0,
        timeout=IDLE_S + 90,
        interval=1.0,
        message=lambda: f"back to zero after {IDLE_S}s idle\n{scene.logs()}",
    )
    assert scene.autoscaling()["reason"] == "Idle"

    first, second = scene.gateways
    first.proc.terminate()
    assert first.proc.wait(20) == 0, first.log.read_text(errors="replace")[-3000:]
    assert set(scene.leases()) == {second.hash}  # its own gone at once, the other's untouched
    second.proc.terminate()
    assert second.proc.wait(20) == 0, second.log.read_text(errors="replace")[-3000:]
    assert scene.leases() == {}
