"""The catalog: which replicas are routable, relists and deletes, and the Macs' weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchardist.gateway.catalog import DEFAULT_HOLD_S, Catalog, parse_deployment, parse_replica

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MD: dict[str, Any] = yaml.safe_load((EXAMPLES / "modeldeployment-minimal.yaml").read_text())
MR: dict[str, Any] = yaml.safe_load((EXAMPLES / "modelreplica.yaml").read_text())


def replica(name: str, *, meta: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    mr = copy.deepcopy(MR)
    mr["metadata"] = {"name": name, "namespace": "default", **(meta or {})}
    mr["status"] = status
    return mr


def node(name: str, bandwidth: int | None) -> dict[str, Any]:
    status = {"memoryBandwidthBytesPerSecond": bandwidth} if bandwidth else {}
    return {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "MacNode",
        "metadata": {"name": name},
        "status": status,
    }


@pytest.mark.parametrize(
    ("obj", "ready"),
    [
        (replica("r", phase="Ready", endpoint="10.0.0.5:8000"), True),
        (replica("r", phase="Starting", endpoint="10.0.0.5:8000"), False),
        (replica("r", phase="Ready"), False),  # no endpoint yet
        (
            replica("r", meta={"deletionTimestamp": "2026-01-01T00:00:00Z"}, phase="Ready", endpoint="a:1"),
            False,
        ),
        (
            replica("r", meta={"annotations": {"orchardist.io/lost": "true"}}, phase="Ready", endpoint="a:1"),
            False,
        ),
    ],
)
def test_routable_replicas(obj: dict[str, Any], ready: bool) -> None:
    entry = parse_replica(obj)
    assert entry is not None and entry.ready is ready
    assert entry.deployment == ("default", MR["spec"]["deployment"])


def test_deployment_view() -> None:
    md = copy.deepcopy(MD)
    assert parse_deployment(md) is not None and parse_deployment(md).hold_timeout_s == DEFAULT_HOLD_S  # type: ignore[union-attr]
    md["spec"] |= {
        "engine": "mlx-lm",
        "aliases": ["small"],
        "scaling": {"minReplicas": 0, "maxReplicas": 1, "holdTimeoutSeconds": 42},
        "apiKeySecretRef": {"name": "s", "key": "k"},
    }
    served = parse_deployment(md)
    assert served is not None
    assert (served.engine, served.aliases, served.hold_timeout_s, served.api_key_ref) == (
        "mlx-lm",
        ("small",),
        42.0,
        ("s", "k"),
    )
    assert parse_deployment({"metadata": {"name": "x"}, "spec": {"model": "not a reference"}}) is None


def test_catalog_follows_relists_and_deletes() -> None:
    cat = Catalog()
    deployment = ("default", MR["spec"]["deployment"])
    a = replica("a", phase="Ready", endpoint="10.0.0.1:8000")
    b = replica("b", phase="Ready", endpoint="10.0.0.2:8000")
    cat.apply("mr", "relist", [b, a])
    assert [u.id for u in cat.upstreams(deployment)] == ["default/a", "default/b"]
    cat.apply("mr", "MODIFIED", replica("a", phase="Failed", endpoint="10.0.0.1:8000"))
    assert [u.id for u in cat.upstreams(deployment)] == ["default/b"]
    cat.apply("mr", "DELETED", b)
    assert cat.upstreams(deployment) == []
    cat.apply("mr", "relist", [a])  # a relist replaces, it does not merge
    assert [u.address for u in cat.upstreams(deployment)] == ["10.0.0.1:8000"]


def test_weights_are_bandwidth_or_the_fleet_mean() -> None:
    cat = Catalog()
    assert cat.weight("anything") == 1.0
    cat.apply(
        "node", "relist", [node("fast", 546_000_000_000), node("slow", 100_000_000_000), node("new", None)]
    )
    assert cat.weight("fast") == 546e9
    assert cat.weight("new") == cat.weight("unknown") == (546e9 + 100e9) / 2
    cat.apply("node", "DELETED", node("fast", 546_000_000_000))
    assert cat.weight("new") == 100e9
