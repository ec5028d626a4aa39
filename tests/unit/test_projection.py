"""The per-Mac Secret projection, decided purely: names, what each Mac's namespace holds, and the
writes that take what exists to that (none once converged)."""

from __future__ import annotations

from typing import Any

import pytest

from orchardist.api.modelreplica import ModelReplica
from orchardist.api.projection import node_namespace, projected_secret
from orchardist.controller.projection import Observed, changes, desired_projections, references

DIGEST = "sha256:" + "ab" * 32
AGENTS = "orchardist-system"


def replica(
    name: str, node: str, ns: str = "team-a", pull: str | None = None, key: str | None = None
) -> ModelReplica:
    spec: dict[str, Any] = {
        "nodeName": node,
        "deployment": "qwen",
        "model": f"oci://r.example/m@{DIGEST}",
        "digest": DIGEST,
        "servedModelName": "qwen",
        "memoryPlan": {
            "weightBytes": 1, "overheadBytes": 1, "kvBudgetBytes": 1, "kvBytesPerToken": 1, "blockSize": 16,
            "numBlocks": 1, "maxModelLen": 16, "maxNumSeqs": 1, "maxNumBatchedTokens": 16,
            "gpuMemoryUtilization": 0.5, "reservedBytes": 1,
        },
    }  # fmt: skip
    if pull:
        spec["pullSecretRef"] = {"name": pull}
    if key:
        spec["apiKeySecretRef"] = {"name": key, "key": "api-key"}
    return ModelReplica.model_validate({"metadata": {"name": name, "namespace": ns}, "spec": spec})


def secret(data: str = "c2VjcmV0", type_: str = "Opaque") -> dict[str, Any]:
    return {"metadata": {"name": "ignored"}, "type": type_, "data": {"k": data}}


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ("mac-mini-1", "orchardist-node-mac-mini-1"),
        ("studio", "orchardist-node-studio"),
        ("mac.lan", "orchardist-node-mac-lan-" + "__digest__"),
        ("m" * 60, "orchardist-node-" + "m" * 38 + "-" + "__digest__"),
    ],
)
def test_node_namespace_is_a_dns_label_derived_from_the_node(node: str, expected: str) -> None:
    got = node_namespace(node)
    assert len(got) <= 63
    if "__digest__" in expected:
        prefix = expected.replace("__digest__", "")
        assert got.startswith(prefix) and len(got) == len(prefix) + 8
    else:
        assert got == expected


def test_node_namespaces_differ_for_names_that_sanitise_alike() -> None:
    assert node_namespace("mac.lan") != node_namespace("mac-lan")
    assert node_namespace("a" * 60 + "x") != node_namespace("a" * 60 + "y")


@pytest.mark.parametrize(
    ("ns", "name", "expected"),
    [
        ("team-a", "regcred", "team-a.regcred"),
        ("team", "a.regcred", "team.a.regcred"),
        ("team-a", "k", "team-a.k"),
    ],
)
def test_projected_secret_name(ns: str, name: str, expected: str) -> None:
    assert projected_secret(ns, name) == expected


def test_projected_names_never_collide_across_namespaces() -> None:
    """team.a/regcred and team/a.regcred would collide with a dot join if namespaces held dots; they
    cannot (a namespace is a DNS label), so the first dot always splits namespace from name."""
    assert projected_secret("team-a", "x") != projected_secret("team", "a-x")
    long = "n" * 250
    assert len(projected_secret("ns", long)) <= 253
    assert projected_secret("ns", long) != projected_secret("ns", long[:-1] + "m")


def test_references_per_node() -> None:
    rs = [
        replica("r1", "a", pull="regcred", key="key"),
        replica("r2", "a", ns="team-b", key="key"),
        replica("r3", "b"),
        replica("r4", "c", pull="regcred"),
    ]
    assert references(rs) == {
        "a": {("team-a", "regcred"), ("team-a", "key"), ("team-b", "key")},
        "b": set(),
        "c": {("team-a", "regcred")},
    }


def test_desired_projection_copies_only_what_the_nodes_replicas_reference() -> None:
    rs = [replica("r1", "a", pull="regcred", key="key"), replica("r2", "b", key="other")]
    sources = {
        ("team-a", "regcred"): secret("cmVn", "kubernetes.io/dockerconfigjson"),
        ("team-a", "key"): secret("a2V5"),
        # ("team-a", "other") is missing: not projected
    }
    want = desired_projections(rs, sources)
    assert set(want) == {"a", "b"}
    a = want["a"]
    assert a.namespace == "orchardist-node-a"
    assert sorted(a.secrets) == ["team-a.key", "team-a.regcred"]
    copy = a.secrets["team-a.regcred"]
    assert copy["type"] == "kubernetes.io/dockerconfigjson" and copy["data"] == {"k": "cmVn"}
    assert copy["metadata"]["annotations"] == {"orchardist.io/projected-from": "team-a/regcred"}
    assert a.role()["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["get"],
            "resourceNames": ["team-a.key", "team-a.regcred"],
        }
    ]
    assert a.binding(AGENTS)["subjects"] == [
        {"kind": "ServiceAccount", "name": "orchardist-agent-a", "namespace": AGENTS}
    ]
    assert want["b"].secrets == {}


def test_a_node_with_nothing_to_read_gets_a_role_without_rules() -> None:
    """An empty resourceNames list would mean every Secret in the namespace: no rule at all instead."""
    want = desired_projections([], {}, nodes=["gone"])
    assert want["gone"].secrets == {}
    assert want["gone"].role()["rules"] == []


def observed_from(want: dict[str, Any]) -> dict[str, Observed]:
    return {
        p.namespace: Observed(dict(p.secrets), p.role()["rules"], p.binding(AGENTS)) for p in want.values()
    }


def test_changes_from_nothing_create_everything_then_nothing_once_converged() -> None:
    rs = [replica("r1", "a", pull="regcred")]
    want = desired_projections(rs, {("team-a", "regcred"): secret()})
    first = changes(want, {}, AGENTS)
    assert [n["metadata"]["name"] for n in first.namespaces] == ["orchardist-node-a"]
    assert [(ns, b["metadata"]["name"]) for ns, b in first.put_secrets] == [
        ("orchardist-node-a", "team-a.regcred")
    ]
    assert len(first.put_roles) == 1 and len(first.put_bindings) == 1 and not first.delete_secrets
    assert not changes(want, observed_from(want), AGENTS)


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        ("source data changed", ["put"]),
        ("source type changed", ["put"]),
        ("replica gone", ["delete", "role"]),
        ("copy tampered with", ["put"]),
        ("role widened by hand", ["role"]),
        ("binding points elsewhere", ["binding"]),
    ],
)
def test_changes_follow_the_source_and_undo_drift(edit: str, expect: list[str]) -> None:
    rs = [replica("r1", "a", pull="regcred")]
    sources = {("team-a", "regcred"): secret()}
    converged = observed_from(desired_projections(rs, sources))
    obs = converged["orchardist-node-a"]
    if edit == "source data changed":
        sources = {("team-a", "regcred"): secret("bmV3")}
    elif edit == "source type changed":
        sources = {("team-a", "regcred"): secret(type_="kubernetes.io/dockerconfigjson")}
    elif edit == "replica gone":
        rs = []
    elif edit == "copy tampered with":
        obs.secrets["team-a.regcred"] = {**obs.secrets["team-a.regcred"], "data": {"k": "ZXZpbA=="}}
    elif edit == "role widened by hand":
        obs.rules[0] = {**obs.rules[0], "resourceNames": []}  # type: ignore[index]
    elif edit == "binding points elsewhere":
        converged["orchardist-node-a"] = Observed(obs.secrets, obs.rules, {"subjects": [], "roleRef": {}})
    want = desired_projections(rs, sources, nodes=["a"])
    got = changes(want, converged, AGENTS)
    kinds = (
        ["put"] * len(got.put_secrets)
        + ["delete"] * len(got.delete_secrets)
        + ["role"] * len(got.put_roles)
        + ["binding"] * len(got.put_bindings)
    )
    assert kinds == expect
    assert not got.namespaces
    if "role" in expect and edit == "replica gone":
        assert got.put_roles[0][1]["rules"] == []
        assert got.delete_secrets == [("orchardist-node-a", "team-a.regcred")]
