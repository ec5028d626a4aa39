"""`orchardist plan --node NAME` plans against what a registered Mac's agent reports."""

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


def _plan_node(cluster: Cluster, name: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "orchardist", "plan", "--model-config", str(CONFIG), "--weights-bytes",
         str(WEIGHTS), "--node", name, "--kubeconfig", str(cluster.kubeconfig), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_plan_uses_the_macs_reported_working_set_and_what_its_replicas_hold(cluster: Cluster) -> None:
    model = from_config(json.loads(CONFIG.read_text()), weight_bytes=WEIGHTS)
    fits: dict[int, bool] = {}
    for allocated in (0, 6 * GiB):
        name, status = _register(cluster, allocated)
        try:
            code, got = _plan_node(cluster, name)
            memory = status["memory"]
            expected = plan(
                model,
                NodeCapacity(
                    gpu_working_set_bytes=memory["gpuWorkingSetBytes"],
                    memory_bandwidth_bytes_per_second=status["memoryBandwidthBytesPerSecond"],
                    total_memory_bytes=memory["totalBytes"],
                    reserved_bytes=allocated,
                    name=name,
                ),
                PlanRequest(),
            ).to_json()
            assert got == expected
            assert code == (0 if expected["fits"] else 1)
            fits[allocated] = got["fits"]
        finally:
            cluster.kubectl("delete", "macnode", name, "--wait=false")
    # Alone, the 70B model fits the M4 Pro's 48 GiB working set; with 6 GiB held by other replicas
    # there is no room left for its KV cache, and the reason says so in GiB.
    assert fits == {0: True, 6 * GiB: False}
    assert "GiB" in got["reason"]


def test_an_unknown_node_is_named(cluster: Cluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "orchardist", "plan", "--model-config", str(CONFIG), "--weights-bytes",
         str(WEIGHTS), "--node", "no-such-mac", "--kubeconfig", str(cluster.kubeconfig)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no MacNode 'no-such-mac' in the cluster" in out.stderr
