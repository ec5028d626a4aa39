"""The MacNode status the agent composes, and its MacNode and Lease writes against a fake API."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from orchardist import __version__
from orchardist.kube import AGENT, JSON, MERGE_PATCH, Kube, RawApi
from orchardist.kube.aio import APPLY_PATCH
from orchardist_agent.node import NodeAgent, micro_time, status_of

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
    node = NodeAgent(Kube(RawApi(ApiClient(Configuration()))), "mac-1", facts, address="10.0.0.7")
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


class ObjectsApi:
    """Objects by path: GET, POST (409 when taken), PATCH as a merge patch or as the sole manager's
    apply of a subresource, which replaces it whole (404 when missing)."""

    def __init__(self) -> None:
        self.objects: dict[str, JSON] = {}
        self.calls: list[tuple[str, str]] = []

    def request(
        self, method: str, path: str, *, body: Any = None, content_type: str = "", query: Any = None, **_: Any
    ) -> JSON:
        self.calls.append((method, path))
        target = path.removesuffix("/status")
        if method == "GET":
            if target not in self.objects:
                raise ApiException(status=404, reason="NotFound")
            return copy.deepcopy(self.objects[target])
        if method == "POST":
            full = f"{path}/{body['metadata']['name']}"
            if full in self.objects:
                raise ApiException(status=409, reason="AlreadyExists")
            self.objects[full] = copy.deepcopy(body)
            return body
        if method == "PATCH":
            if target not in self.objects:
                raise ApiException(status=404, reason="NotFound")
            obj = self.objects[target]
            if content_type == APPLY_PATCH:
                assert path.endswith("/status") and query == {"fieldManager": AGENT, "force": "true"}
                assert (body["apiVersion"], body["kind"], body["metadata"]) == (
                    obj["apiVersion"],
                    obj["kind"],
                    {"name": obj["metadata"]["name"]},
                )
                obj["status"] = copy.deepcopy(body["status"])
                return copy.deepcopy(obj)
            assert content_type == MERGE_PATCH
            for field, value in body.items():
                part = dict(obj.get(field) or {})
                for k, v in value.items():
                    if v is None:
                        part.pop(k, None)
                    else:
                        part[k] = v
                obj[field] = part
            return copy.deepcopy(obj)
        raise AssertionError(f"unexpected {method} {path}")

    def get(self, path: str, **query: str | int) -> JSON:
        raise AssertionError("not used")

    def watch(self, path: str, **query: str | int) -> Iterator[JSON]:
        raise AssertionError("not used")


MACNODE = "/apis/orchardist.io/v1alpha1/macnodes/mac-1"
LEASE = "/apis/coordination.k8s.io/v1/namespaces/orchardist-system/leases/mac-1"


def fake_agent() -> tuple[NodeAgent, ObjectsApi]:
    api = ObjectsApi()
    return NodeAgent(Kube(api), "mac-1", facts, address="10.0.0.7"), api


async def test_register_creates_the_macnode_and_writes_its_whole_status() -> None:
    node, api = fake_agent()
    await node.register()
    stored = api.objects[MACNODE]
    assert (stored["kind"], stored["apiVersion"]) == ("MacNode", "orchardist.io/v1alpha1")
    assert "spec" not in stored  # the user's: never written by the agent
    assert stored["status"]["address"] == "10.0.0.7"
    assert stored["status"]["memory"]["gpuWorkingSetBytes"] == 48 * GiB
    assert ("PATCH", MACNODE + "/status") in api.calls
    # The Lease is taken before the status says Ready.
    assert api.calls.index(("POST", LEASE.rsplit("/", 1)[0])) < api.calls.index(
        ("PATCH", MACNODE + "/status")
    )


async def test_register_keeps_an_existing_macnodes_spec_and_condition_times() -> None:
    node, api = fake_agent()
    await node.register()
    for c in api.objects[MACNODE]["status"]["conditions"]:
        c["lastTransitionTime"] = "2026-01-01T00:00:00Z"  # set by an earlier agent
    api.objects[MACNODE]["spec"] = {"unschedulable": True}
    restarted = NodeAgent(node.kube, "mac-1", facts, address="10.0.0.7")
    await restarted.register()
    assert api.objects[MACNODE]["spec"] == {"unschedulable": True}
    times = {c["lastTransitionTime"] for c in api.objects[MACNODE]["status"]["conditions"]}
    assert times == {"2026-01-01T00:00:00Z"}  # nothing flipped: no transition


async def test_a_macnode_deleted_behind_the_agents_back_is_registered_again() -> None:
    node, api = fake_agent()
    await node.register()
    del api.objects[MACNODE]
    node.state.allocated_bytes = 2 * GiB
    node.changed()
    await node._push_status()
    assert api.objects[MACNODE]["status"]["memory"]["allocatedBytes"] == 2 * GiB


async def test_the_lease_is_created_once_then_renewed_by_patch() -> None:
    node, api = fake_agent()
    await node.renew_lease()
    lease = api.objects[LEASE]
    assert lease["spec"]["holderIdentity"] == "mac-1"
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["spec"]["acquireTime"] == lease["spec"]["renewTime"]
    assert "/api/v1/namespaces/orchardist-system" in api.objects  # created when missing
    first = lease["spec"]["renewTime"]
    api.calls.clear()
    await node.renew_lease()
    assert api.calls == [("PATCH", LEASE)]
    assert api.objects[LEASE]["spec"]["renewTime"] >= first


async def test_a_deleted_lease_is_created_again() -> None:
    node, api = fake_agent()
    await node.renew_lease()
    del api.objects[LEASE]
    await node.renew_lease()
    assert api.objects[LEASE]["spec"]["holderIdentity"] == "mac-1"


async def test_mark_stopped_turns_ready_false_with_agent_stopped() -> None:
    node, api = fake_agent()
    await node.register()
    await node.mark_stopped()
    ready = {c["type"]: c for c in api.objects[MACNODE]["status"]["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "AgentStopped")


def test_status_of_reads_the_fields_the_server_sent_through_the_model() -> None:
    body = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "MacNode",
        "metadata": {"name": "mac-1"},
        "status": {"address": "10.0.0.7", "memory": {"totalBytes": 64 * GiB}, "unknownField": 1},
    }
    assert status_of(body) == {"address": "10.0.0.7", "memory": {"totalBytes": 64 * GiB}}
    assert status_of({"kind": "MacNode", "status": {"cachedModels": [{"digest": "not-a-digest"}]}}) == {}
