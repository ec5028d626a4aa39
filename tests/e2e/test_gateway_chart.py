"""The gateway in the Helm chart: a reason on every RBAC rule, what the real RBAC authorizer grants
its ServiceAccount after `helm install` on a fresh apiserver, and `gateway.enabled=false`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from orchardist.dev.cluster import Cluster
from tests.fixtures.chart import CHART, SYSTEM_NS, bare_cluster, render

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh control plane without our CRDs, so the chart installs them itself."""
    yield from bare_cluster(tmp_path_factory, "gateway-chart")


def test_every_gateway_rbac_rule_says_why() -> None:
    lines = (CHART / "templates" / "gateway-rbac.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert len(rules) == 4
    for i in rules:
        assert lines[i - 1].strip().startswith("#"), f"gateway-rbac.yaml:{i + 1}: a rule without a comment"


def test_gateway_writes_only_leases(bare: Cluster) -> None:
    docs = render(bare)
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role") and "-gateway" in d["metadata"]["name"]]
    assert {d["kind"] for d in roles} == {"ClusterRole", "Role"}
    writes = set()
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            if {"create", "patch", "update", "delete"} & set(rule["verbs"]):
                writes |= set(rule["resources"])
    assert writes == {"leases"}


def test_gateway_can_be_left_out(bare: Cluster) -> None:
    names = [d["metadata"]["name"] for d in render(bare, "gateway.enabled=false")]
    assert names and not [n for n in names if "gateway" in n]


def test_helm_install_grants_the_gateway_what_it_uses(bare: Cluster) -> None:
    out = bare.helm("install", "orchardist", str(CHART), "-n", SYSTEM_NS, "--create-namespace", check=False)
    assert out.returncode == 0, out.stderr
    dep = json.loads(
        bare.kubectl("get", "deploy", "orchardist-gateway", "-n", SYSTEM_NS, "-o", "json").stdout
    )
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "orchardist-gateway"
    assert pod["containers"][0]["command"] == ["orchardist", "gateway"]
    assert f"--key-namespace={SYSTEM_NS}" in pod["containers"][0]["args"]
    svc = json.loads(
        bare.kubectl("get", "service", "orchardist-gateway", "-n", SYSTEM_NS, "-o", "json").stdout
    )
    assert svc["spec"]["ports"][0]["port"] == 80
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "gateway"

    gw = f"--as=system:serviceaccount:{SYSTEM_NS}:orchardist-gateway"
    expect = [
        (["watch", "secrets", "-n", SYSTEM_NS], True),  # the key Secrets
        (["list", "secrets", "-n", "default"], False),  # ...only there
        (["get", "secrets", "-n", "default"], True),  # a deployment's upstream key, by name
        (["watch", "modeldeployments.orchardist.io", "--all-namespaces"], True),
        (["watch", "modelreplicas.orchardist.io", "--all-namespaces"], True),
        (["watch", "macnodes.orchardist.io"], True),
        (["create", "leases.coordination.k8s.io", "-n", "default"], True),
        (["patch", "leases.coordination.k8s.io", "-n", "default"], True),
        (["delete", "leases.coordination.k8s.io", "-n", "default"], True),  # its own, on a stop
        (["patch", "modeldeployments.orchardist.io", "-n", "default"], False),
        (["create", "modelreplicas.orchardist.io", "-n", "default"], False),
        (["create", "secrets", "-n", SYSTEM_NS], False),
    ]
    wrong = []
    for args, allowed in expect:
        got = bare.kubectl("auth", "can-i", gw, *args, check=False).stdout.strip() == "yes"
        if got != allowed:
            wrong.append((args, got))
    assert not wrong
