"""What a Mac offers the planner: from a named profile, or from a MacNode and the replicas bound to it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchardist.api import MacNode, ModelReplica
from orchardist.planning import capacity, macs
from orchardist.planning.memory import NodeCapacity

ROOT = Path(__file__).resolve().parents[2]
NODE: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "macnode.yaml").read_text())
REPLICA: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "modelreplica.yaml").read_text())
GiB = 1 << 30


def _node(allocated: int | None = None, **memory: int | None) -> MacNode:
    body = copy.deepcopy(NODE)
    body["status"]["memory"]["allocatedBytes"] = allocated
    body["status"]["memory"].update(memory)
    return MacNode.model_validate(body)


def _replica(node: str, reserved: int, name: str = "r") -> ModelReplica:
    body = copy.deepcopy(REPLICA)
    body["metadata"]["name"] = name
    body["spec"]["nodeName"] = node
    body["spec"]["memoryPlan"]["reservedBytes"] = reserved
    return ModelReplica.model_validate(body)


def test_a_profile_as_an_agent_would_report_it() -> None:
    mac = macs.get("m4-pro-64gb")
    assert capacity.from_profile(mac, reserved_bytes=3) == NodeCapacity(
        gpu_working_set_bytes=mac.gpu_working_set_bytes,
        memory_bandwidth_bytes_per_second=mac.memory_bandwidth_bytes_per_second,
        total_memory_bytes=mac.memory_bytes,
        reserved_bytes=3,
        name="m4-pro-64gb",
    )


@pytest.mark.parametrize(
    ("allocated", "replicas", "extra", "held"),
    [
        pytest.param(None, [], 0, 0, id="nothing-held"),
        pytest.param(6 * GiB, [], 0, 6 * GiB, id="agent-reports-before-the-replicas-are-listed"),
        pytest.param(0, [("mac-mini-01", 4 * GiB)], 0, 4 * GiB, id="bound-before-the-agent-reports"),
        pytest.param(
            2 * GiB,
            [("mac-mini-01", 4 * GiB), ("mac-mini-01", 1 * GiB)],
            0,
            5 * GiB,
            id="replicas-add-up-and-the-larger-count-wins",
        ),
        pytest.param(9 * GiB, [("mac-mini-01", 4 * GiB)], 0, 9 * GiB, id="agent-count-larger"),
        pytest.param(0, [("mac-mini-02", 8 * GiB)], 0, 0, id="other-macs-replicas-do-not-count"),
        pytest.param(1 * GiB, [], 2 * GiB, 3 * GiB, id="extra-reserved-adds"),
    ],
)
def test_held_is_the_larger_of_the_agents_and_the_replicas_count(
    allocated: int | None, replicas: list[tuple[str, int]], extra: int, held: int
) -> None:
    bound = [_replica(node, reserved, f"r{i}") for i, (node, reserved) in enumerate(replicas)]
    got = capacity.from_macnode(_node(allocated), bound, extra_reserved=extra)
    assert got == NodeCapacity(
        gpu_working_set_bytes=51_539_607_552,
        memory_bandwidth_bytes_per_second=273_000_000_000,
        total_memory_bytes=68_719_476_736,
        reserved_bytes=held,
        name="mac-mini-01",
    )


def test_unknown_bandwidth_and_total_stay_unknown() -> None:
    body = copy.deepcopy(NODE)
    del body["status"]["memoryBandwidthBytesPerSecond"], body["status"]["memory"]["totalBytes"]
    got = capacity.from_macnode(MacNode.model_validate(body))
    assert (got.memory_bandwidth_bytes_per_second, got.total_memory_bytes) == (None, None)


@pytest.mark.parametrize(
    "node",
    [
        pytest.param(MacNode.model_validate({"metadata": {"name": "mac-mini-01"}}), id="no-status-yet"),
        pytest.param(_node(gpuWorkingSetBytes=None), id="no-working-set"),
        pytest.param(_node(gpuWorkingSetBytes=0), id="zero-working-set"),
    ],
)
def test_a_mac_without_a_working_set_cannot_be_planned_on(node: MacNode) -> None:
    with pytest.raises(capacity.CapacityError, match="MacNode 'mac-mini-01' reports no GPU working set yet"):
        capacity.from_macnode(node)
