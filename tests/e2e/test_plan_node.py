"""`orchardist plan --node NAME` plans against what a registered Mac's agent reports and what the
ModelReplicas bound to it hold."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from orchardist.dev.cluster import Cluster
from orchardist.planning.memory import NodeCapacity, PlanRequest, plan
from orchardist.planning.profile import from_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "data" / "model-configs" / "mlx-llama-3.3-70b-instruct-4bit.json"
WEIGHTS = 39_700_000_000
GiB = 1 << 30


def _register(cluster: Cluster, allocated: int) -> tuple[str, dict[str, Any]]:
    """A MacNode with the status of examples/macnode.yaml, written through /status as an agent does."""
    doc = yaml.safe_load((ROOT / "examples" / "macnode.yaml").read_text())
    name = f"plan-{secrets.token_hex(3)}"
    status = doc["status"]
    status["memory"]["allocatedBytes"] = allocated
    cluster.kubectl("create", "-f", "-", input=json.dumps({**doc, "metadata": {"name": name}, "status": {}}))
    cluster.kubectl(
        "patch", "macnode", name, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status})
    )
    return name, status


def _bind_replica(cluster: Cluster, namespace: str, name: str, node: str, reserved: int) -> None:
    """A ModelReplica as the controller creates it (examples/modelreplica.yaml), bound to ``node``."""
    doc = yaml.safe_load((ROOT / "examples" / "modelreplica.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace, "labels": {"orchardist.io/node": node}}
    doc["spec"]["nodeName"] = node
    doc["spec"]["memoryPlan"]["reservedBytes"] = reserved
    del doc["status"]
    cluster.kubectl("create", "-f", "-", input=json.dumps(doc))


def _expected(name: str, status: dict[str, Any], reserved: int) -> dict[str, Any]:
    model = from_config(json.loads(CONFIG.read_text()), weight_bytes=WEIGHTS)
    memory = status["memory"]
    node = NodeCapacity(
        gpu_working_set_bytes=memory["gpuWorkingSetBytes"],
        memory_bandwidth_bytes_per_second=status["memoryBandwidthBytesPerSecond"],
        total_memory_bytes=memory["totalBytes"],
        reserved_bytes=reserved,
        name=name,
    )
    return plan(model, node, PlanRequest()).to_json()


def _plan_node(cluster: Cluster, name: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "orchardist", "plan", "--model-config", str(CONFIG), "--weights-bytes",
         str(WEIGHTS), "--node", name, "--kubeconfig", str(cluster.kubeconfig), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_plan_uses_the_macs_reported_working_set_and_what_its_agent_says_is_held(cluster: Cluster) -> None:
    fits: dict[int, bool] = {}
    for allocated in (0, 6 * GiB):
        name, status = _register(cluster, allocated)
        try:
            code, got = _plan_node(cluster, name)
            expected = _expected(name, status, reserved=allocated)
            assert got == expected
            assert code == (0 if expected["fits"] else 1)
            fits[allocated] = got["fits"]
        finally:
            cluster.kubectl("delete", "macnode", name, "--wait=false")
    # Alone, the 70B model fits the M4 Pro's 48 GiB working set; with 6 GiB held by other replicas
    # there is no room left for its KV cache, and the reason says so in GiB.
    assert fits == {0: True, 6 * GiB: False}
    assert "GiB" in got["reason"]


def test_replicas_bound_to_the_mac_count_before_its_agent_reports_them(
    cluster: Cluster, namespace: str
) -> None:
    """The controller bound 6 GiB here, the agent still reports 0: the plan counts the 6 GiB (and
    not a replica bound to another Mac)."""
    name, status = _register(cluster, allocated=0)
    try:
        _bind_replica(cluster, namespace, f"{name}-a", node=name, reserved=4 * GiB)
        _bind_replica(cluster, namespace, f"{name}-b", node=name, reserved=2 * GiB)
        _bind_replica(cluster, namespace, f"{name}-elsewhere", node=f"{name}-other", reserved=30 * GiB)
        code, got = _plan_node(cluster, name)
        assert got == _expected(name, status, reserved=6 * GiB)
        assert (code, got["fits"]) == (1, False)
    finally:
        cluster.kubectl("delete", "macnode", name, "--wait=false")


def test_an_unknown_node_is_named(cluster: Cluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchardist", "plan", "--model-config", str(CONFIG), "--weights-bytes",
         str(WEIGHTS), "--node", "no-such-mac", "--kubeconfig", str(cluster.kubeconfig)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no MacNode 'no-such-mac' in the cluster" in out.stderr
