"""A replica on a Mac whose Lease expired is shown Unknown by the controller, as Pods on a NotReady node."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchardist.api.macnode import MacNode
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller.nodehealth import down
from orchardist.controller.replicahealth import NODE_NOT_READY, mark, marks

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
DIGEST = "sha256:" + "a" * 64
DOWN = {"mac-a": "Mac mac-a is NotReady: its agent last renewed the Lease at 2026-03-01T11:59:00Z, 60 s ago"}
SERVING = [
    {"type": "Scheduled", "status": "True", "reason": "Scheduled"},
    {"type": "Pulled", "status": "True", "reason": "Pulled"},
    {"type": "Started", "status": "True", "reason": "Started"},
    {"type": "Ready", "status": "True", "reason": "Ready", "message": "serving at 10.0.0.7:8001"},
]


def replica(
    phase: str | None = "Ready", node: str = "mac-a", *, deleting: bool = False, conds: Any = None
) -> ModelReplica:
    meta: dict[str, Any] = {"name": "tiny-1", "namespace": "default", "resourceVersion": "42"}
    if deleting:
        meta["deletionTimestamp"] = "2026-03-01T11:59:30Z"
    status: dict[str, Any] = {"conditions": SERVING if conds is None else conds, "observedGeneration": 1}
    if phase is not None:
        status["phase"] = phase
    plan = {
        "weightBytes": 1, "overheadBytes": 1, "kvBudgetBytes": 1, "kvBytesPerToken": 1, "numBlocks": 64,
        "maxModelLen": 1024, "maxNumSeqs": 1, "maxNumBatchedTokens": 1, "gpuMemoryUtilization": 0.1,
        "reservedBytes": 3,
    }  # fmt: skip
    spec = {
        "nodeName": node, "deployment": "tiny", "model": f"oci://127.0.0.1:5000/m@{DIGEST}",
        "digest": DIGEST, "memoryPlan": plan, "servedModelName": "tiny",
    }  # fmt: skip
    return ModelReplica.model_validate({"metadata": meta, "spec": spec, "status": status})


TABLE = [
    ("Ready on a NotReady Mac", replica(), True),
    ("crash-looping on a NotReady Mac", replica("CrashLoopBackOff"), True),
    ("pulling on a NotReady Mac", replica("Pulling"), True),
    ("no status yet on a NotReady Mac", replica(None, conds=[]), True),
    ("already Unknown: nothing to write (the Lease's age is not refreshed)", replica("Unknown"), False),
    ("Terminating stays Terminating", replica("Terminating"), False),
    ("being deleted", replica(deleting=True), False),
    ("on a Ready Mac", replica(node="mac-b"), False),
]


@pytest.mark.parametrize(("case", "rep", "marked"), TABLE, ids=[t[0] for t in TABLE])
def test_mark(case: str, rep: ModelReplica, marked: bool) -> None:
    """Unknown phase, Ready=Unknown (NodeNotReady, the Lease's age) and the same line as message."""
    got = mark(rep, DOWN, NOW)
    if not marked:
        assert got is None
        return
    assert got is not None
    line = DOWN["mac-a"]
    assert (got.namespace, got.name, got.node, got.resource_version) == ("default", "tiny-1", "mac-a", "42")
    assert (got.status["phase"], got.status["message"], got.status["nextRestartTime"]) == (
        "Unknown",
        line,
        None,
    )
    ready = [c for c in got.status["conditions"] if c["type"] == "Ready"]
    assert ready == [
        {
            "type": "Ready",
            "status": "Unknown",
            "reason": NODE_NOT_READY,
            "message": line,
            "lastTransitionTime": "2026-03-01T12:00:00Z",
            "observedGeneration": 1,
        }
    ]
    others = [c["type"] for c in got.status["conditions"] if c["type"] != "Ready"]
    assert others == [
        c["type"] for c in rep.status.model_dump(by_alias=True)["conditions"] if c["type"] != "Ready"
    ]


def test_marks_only_the_dead_macs_replicas_in_order() -> None:
    reps = [replica(node="mac-b"), replica(), replica("Unknown")]
    assert [(m.node, m.status["phase"]) for m in marks(reps, DOWN, NOW)] == [("mac-a", "Unknown")]
    assert marks(reps, {}, NOW) == []


def mac(name: str, created: datetime = NOW - timedelta(hours=1)) -> MacNode:
    stamp = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    return MacNode.model_validate({"metadata": {"name": name, "creationTimestamp": stamp}})


def test_down_names_each_expired_mac_with_its_leases_age() -> None:
    """Whatever the MacNode's conditions say: a clean exit's Ready=False serves nothing either."""
    nodes = {
        "mac-a": [mac("mac-a")],
        "mac-b": [mac("mac-b")],
        "mac-c": [mac("mac-c", NOW - timedelta(seconds=5))],
    }
    leases = {"mac-a": [NOW - timedelta(seconds=75)], "mac-b": [NOW - timedelta(seconds=3)]}
    assert down(nodes, leases, NOW, 40.0) == {
        "mac-a": "Mac mac-a is NotReady: its agent last renewed the Lease at 2026-03-01T11:58:45Z, 75 s ago"
    }
