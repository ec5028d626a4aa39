"""The MacNode status the agent composes from host facts and the replica loop's numbers."""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient, Configuration

from orchardist import __version__
from orchardist.kube import RawApi
from orchardist_agent.node import NodeAgent, micro_time

GiB = 2**30


def facts() -> dict[str, Any]:
    return {
        "chip": {"name": "Apple M4 Pro", "family": "M4 Pro"},
        "memory": {
            "totalBytes": 64 * GiB,
            "gpuWorkingSetBytes": 48 * GiB,
            "total": "64Gi",
            "gpuWorkingSet": "48Gi",
        },
        "modelStore": {"path": "/s", "freeBytes": 500 * GiB},
        "simulatedProfile": "m4-pro-64gb",
    }


def agent() -> NodeAgent:
    # No request is made: compose_status is pure over the agent's state.
    node = NodeAgent(RawApi(ApiClient(Configuration())), "mac-1", facts, address="10.0.0.7")
    node._host = facts()
    return node


def test_status_carries_facts_allocation_cache_and_conditions() -> None:
    node = agent()
    node.state.allocated_bytes = 10 * GiB
    node.state.cached_models = [{"digest": "sha256:" + "a" * 64, "sizeBytes": 123}]
    node.set_store(used=5 * GiB, free=400 * GiB, budget=100 * GiB)
    st = node.compose_status(None, "T1")
    assert st["chip"]["family"] == "M4 Pro"
    assert st["memory"]["allocatedBytes"] == 10 * GiB
    assert st["memory"]["gpuWorkingSetBytes"] == 48 * GiB
    assert st["modelStore"] == {
        "path": "/s",
        "freeBytes": 400 * GiB,
        "usedBytes": 5 * GiB,
        "budgetBytes": 100 * GiB,
    }
    assert st["cachedModels"] == [{"digest": "sha256:" + "a" * 64, "sizeBytes": 123}]
    assert (st["address"], st["agentVersion"], st["simulatedProfile"]) == (
        "10.0.0.7",
        __version__,
        "m4-pro-64gb",
    )
    conds = {c["type"]: c for c in st["conditions"]}
    assert {t: c["status"] for t, c in conds.items()} == {
        "Ready": "True",
        "MemoryPressure": "False",
        "DiskPressure": "False",
    }
    assert all(
        "observedGeneration" not in c for c in st["conditions"]
    )  # MacNode has no spec generation to echo


def test_pressure_flips_and_times_move_only_on_flips() -> None:
    node = agent()
    first = node.compose_status(None, "T1")
    node.state.allocated_bytes = 47 * GiB
    second = node.compose_status(first, "T2")
    by_type = {c["type"]: c for c in second["conditions"]}
    assert by_type["MemoryPressure"]["status"] == "True"
    assert by_type["MemoryPressure"]["lastTransitionTime"] == "T2"
    assert by_type["Ready"]["lastTransitionTime"] == "T1"


def test_micro_time_is_rfc3339_with_microseconds() -> None:
    stamp = micro_time()
    assert len(stamp) == len("2026-01-01T00:00:00.000000Z")
    assert stamp.endswith("Z")
