"""Reading what kopf hands over: MacNode, ModelReplica and ModelDeployment bodies through the API types,
then into the plan's inputs. Pure tables, no cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchardist.api.macnode import MacNode
from orchardist.api.modeldeployment import ModelDeployment
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller import world
from orchardist.controller.scheduler import Mac, Taint

GIB = 1 << 30
DIGEST = "sha256:" + "ab" * 32
NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)

MACNODE: dict[str, Any] = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "MacNode",
    "metadata": {"name": "studio-1", "labels": {"room": "b"}},
    "spec": {"taints": [{"key": "maintenance", "effect": "NoExecute"}]},
    "status": {
        "chip": {"name": "Apple M3 Ultra", "family": "M3 Ultra"},
        "memory": {"totalBytes": 192 * GIB, "gpuWorkingSetBytes": 144 * GIB},
        "memoryBandwidthBytesPerSecond": 819 * 10**9,
        "engines": [{"name": "mlx-lm", "version": "0.26.0"}, {"name": "llama.cpp"}],
        "cachedModels": [{"digest": DIGEST, "sizeBytes": GIB}],
    },
}

PLAN = {
    "weightBytes": 2 * GIB,
    "overheadBytes": GIB // 2,
    "kvBudgetBytes": GIB,
    "kvBytesPerToken": 1024,
    "numBlocks": 256,
    "maxModelLen": 4096,
    "maxNumSeqs": 4,
    "maxNumBatchedTokens": 4096,
    "gpuMemoryUtilization": 0.05,
    "reservedBytes": 4 * GIB,
}

REPLICA: dict[str, Any] = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "ModelReplica",
    "metadata": {
        "name": "qwen-abc123-0",
        "namespace": "ns",
        "creationTimestamp": "2026-11-26T11:00:00Z",
        "labels": {"orchardist.io/deployment": "qwen", "orchardist.io/revision": "abc123def0"},
        "annotations": {world.LOST: "replaced while its Mac was NotReady"},
    },
    "spec": {
        "nodeName": "studio-1",
        "deployment": "qwen",
        "model": f"oci://registry.example/m@{DIGEST}",
        "digest": DIGEST,
        "engine": "mlx-lm",
        "memoryPlan": PLAN,
        "servedModelName": "qwen",
    },
    "status": {
        "phase": "Pulling",
        "progress": {"bytesDone": GIB, "bytesTotal": 2 * GIB},
        "restarts": 2,
        "lastError": {"reason": "PullFailed", "message": "connection reset"},
    },
}


def without(body: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != key}


def with_spec(body: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**body, "spec": {**body["spec"], **spec}}


PARSE = [
    # (case, kind, body, parsed (True) or refused (the error names this field))
    ("MacNode", MacNode, MACNODE, True),
    ("MacNode without status (just registered)", MacNode, without(MACNODE, "status"), True),
    ("MacNode without spec", MacNode, without(MACNODE, "spec"), True),
    (
        "MacNode with a bad taint effect",
        MacNode,
        with_spec(MACNODE, taints=[{"key": "k", "effect": "Evict"}]),
        "effect",
    ),
    ("MacNode with a string for its memory", MacNode, {**MACNODE, "status": {"memory": "lots"}}, "memory"),
    ("ModelReplica", ModelReplica, REPLICA, True),
    ("ModelReplica without status (not reported yet)", ModelReplica, without(REPLICA, "status"), True),
    ("ModelReplica without spec", ModelReplica, without(REPLICA, "spec"), "spec"),
    (
        "ModelReplica with a tag, not a digest",
        ModelReplica,
        with_spec(REPLICA, model="oci://r.example/m:v1"),
        "model",
    ),
    (
        "ModelReplica with a garbage memory plan",
        ModelReplica,
        with_spec(REPLICA, memoryPlan=[1, 2]),
        "memoryPlan",
    ),
    (
        "ModelReplica with an unknown phase",
        ModelReplica,
        {**REPLICA, "status": {"phase": "Dancing"}},
        "phase",
    ),
]


@pytest.mark.parametrize(("case", "kind", "body", "expected"), PARSE, ids=[p[0] for p in PARSE])
def test_parse_bodies(
    case: str, kind: type[MacNode | ModelReplica], body: dict[str, Any], expected: Any
) -> None:
    """A body becomes its model, or one line saying where it does not validate (it is left out)."""
    got = world.parse(kind, body)
    if expected is True:
        assert isinstance(got, kind)
    else:
        assert isinstance(got, str) and expected in got.split(":")[0], got


def test_a_macnode_becomes_the_schedulers_mac() -> None:
    """Every field the scheduler reads comes from the model: memory, chip, engines, cache, taints."""
    node = MacNode.model_validate(MACNODE)
    assert world.mac_from(node, ready=True, reserved_bytes=8 * GIB) == Mac(
        name="studio-1",
        working_set_bytes=144 * GIB,
        ready=True,
        chip="M3 Ultra",
        total_bytes=192 * GIB,
        bandwidth=819 * 10**9,
        unschedulable=False,
        labels={"room": "b"},
        taints=(Taint("maintenance", "", "NoExecute"),),
        engines={"mlx-lm": "0.26.0", "llama.cpp": ""},
        cached=frozenset({DIGEST}),
        reserved_bytes=8 * GIB,
    )


def test_a_macnode_without_status_is_a_mac_with_nothing_to_offer() -> None:
    """Registered but not yet reported: no working set and no engines, so nothing is placed there."""
    mac = world.mac_from(MacNode.model_validate(without(MACNODE, "status")), ready=True, reserved_bytes=0)
    assert (mac.working_set_bytes, mac.engines, mac.chip, mac.cached) == (0, {}, "", frozenset())


def test_a_replica_becomes_the_plans_replica() -> None:
    """Node, revision, phase, reservation, progress, error and the lost mark come from the model."""
    r = world.replica_from(ModelReplica.model_validate(REPLICA))
    assert (r.name, r.node, r.revision, r.phase, r.ready) == (
        "qwen-abc123-0",
        "studio-1",
        "abc123def0",
        "Pulling",
        False,
    )
    assert (r.reserved_bytes, r.restarts, r.lost_mark, r.terminating) == (4 * GIB, 2, True, False)
    assert r.progress is not None and (r.progress.bytes_done, r.progress.bytes_total) == (GIB, 2 * GIB)
    assert r.last_error is not None and r.last_error.reason == "PullFailed"
    assert r.created == "2026-11-26T11:00:00Z"


def test_a_replica_without_status_is_pending_and_unmarked() -> None:
    """Just created: no phase yet (Pending to the plan), nothing restarted."""
    body = without(REPLICA, "status")
    body["metadata"] = without(body["metadata"], "annotations")
    r = world.replica_from(ModelReplica.model_validate(body))
    assert (r.phase, r.ready, r.progress, r.last_error, r.restarts, r.lost_mark) == (
        None,
        False,
        None,
        None,
        0,
        False,
    )


def test_reserved_bytes_add_up_per_mac() -> None:
    """What every replica bound to a Mac holds of its working set, summed per Mac."""
    a = ModelReplica.model_validate(REPLICA)
    b = ModelReplica.model_validate(with_spec(REPLICA, nodeName="mini-2"))
    assert world.reserved_by_node([a, a, b]) == {"studio-1": 8 * GIB, "mini-2": 4 * GIB}


def test_belongs_to_matches_namespace_and_deployment_label() -> None:
    r = ModelReplica.model_validate(REPLICA)
    assert world.belongs_to(r, "ns", "qwen")
    assert not world.belongs_to(r, "other", "qwen")
    assert not world.belongs_to(r, "ns", "llama")


DEPLOYMENT: dict[str, Any] = {
    "metadata": {"name": "qwen", "namespace": "ns", "uid": "u-1", "generation": 4},
    "spec": {"model": "oci://registry.example/m:v1"},
    "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]},
}


def test_a_valid_deployment_parses() -> None:
    md = world.parse_deployment(DEPLOYMENT)
    assert isinstance(md, ModelDeployment) and md.spec.replicas == 1


@pytest.mark.parametrize(
    ("case", "spec", "status", "where"),
    [
        (
            "replicas is a word",
            {"model": "oci://registry.example/m:v1", "replicas": "two"},
            {},
            "spec.replicas",
        ),
        ("no model", {}, {}, "spec.model"),
        ("garbage status too", {}, {"conditions": "yes"}, "spec.model"),
    ],
)
def test_a_refused_deployment_keeps_what_its_status_needs(
    case: str, spec: dict[str, Any], status: dict[str, Any], where: str
) -> None:
    """A spec the types refuse: identity, generation, the status as it was, and where it fails."""
    md = world.parse_deployment({**DEPLOYMENT, "spec": spec, **({"status": status} if status else {})})
    assert isinstance(md, world.Refused)
    assert (md.namespace, md.name, md.uid, md.generation, md.deleting) == ("ns", "qwen", "u-1", 4, False)
    assert md.message.startswith(f"the spec does not validate at {where}: "), md.message
    expected = [] if status else ["Ready"]
    assert [c.type for c in md.status.conditions] == expected


LEASES = [
    # (case, lease spec, Ready within a 40 s grace)
    ("renewed just now", {"renewTime": "2026-11-26T11:59:59.500000Z"}, True),
    ("renewed at the edge of the grace", {"renewTime": "2026-11-26T11:59:20Z"}, True),
    ("renewed too long ago", {"renewTime": "2026-11-26T11:59:19Z"}, False),
    ("only acquired, recently", {"acquireTime": "2026-11-26T11:59:50Z"}, True),
    ("never renewed", {}, False),
    ("garbage time", {"renewTime": "yesterday"}, False),
    ("not a string", {"renewTime": 12}, False),
]


@pytest.mark.parametrize(("case", "spec", "ready"), LEASES, ids=[c[0] for c in LEASES])
def test_lease_readiness(case: str, spec: dict[str, Any], ready: bool) -> None:
    """A Mac is Ready while its Lease was renewed within the grace; anything unreadable is NotReady."""
    assert world.lease_ready(world.renewed_at(spec), NOW, grace=40.0) is ready


def test_renewed_at_reads_the_time() -> None:
    assert world.renewed_at({"renewTime": "2026-11-26T11:59:00Z"}) == NOW - timedelta(minutes=1)
