"""The Helm chart: lint and template clean, a values schema that refuses unknown keys, CRDs that are
the repo's own, least-privilege RBAC with a reason on every rule, and `helm install` on a fresh
real apiserver (no kubelet: the operator pod stays Pending, which is fine here; the chart on a real
node is tests/e2e/test_in_cluster.py)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchardist.dev.cluster import Cluster, find_kubebins
from tests.fixtures.chart import CHART, SYSTEM_NS, bare_cluster, render

REPO = Path(__file__).resolve().parents[2]
NODES = "agents.nodes={mac-a,mac-b}"

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh control plane without our CRDs, so the chart installs them itself."""
    yield from bare_cluster(tmp_path_factory, "chart")


def test_chart_crds_are_the_repos_crds() -> None:
    """One source: the chart's files/crds is a link to crds/ (templated, so upgrades reach them)."""
    link = CHART / "files" / "crds"
    assert link.is_symlink() and link.resolve() == (REPO / "crds").resolve()
    ours = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    assert len(ours) == 3


def test_packaged_chart_carries_the_crds(bare: Cluster, tmp_path: Path) -> None:
    """`helm package` resolves the link, so a published chart holds the same CRD bytes."""
    bare.helm("package", str(CHART), "-d", str(tmp_path))
    [tgz] = tmp_path.glob("orchardist-*.tgz")
    with tarfile.open(tgz) as tar:
        packed = {
            Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.startswith("orchardist/files/crds/")
        }
    assert packed == {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}


@pytest.mark.parametrize("sets", [(), (NODES,), (NODES, "crds.enabled=false", "systemNamespace.create=true")])
def test_helm_lint_is_clean(bare: Cluster, sets: tuple[str, ...]) -> None:
    args = [a for s in sets for a in ("--set", s)]
    out = bare.helm("lint", "--strict", str(CHART), *args, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_template_renders_crds_from_the_repo_with_keep(bare: Cluster) -> None:
    docs = render(bare, NODES)
    kinds = [d["kind"] for d in docs]
    for kind in ("Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                 "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"):  # fmt: skip
        assert kind in kinds, kind
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    for path in (REPO / "crds").glob("*.yaml"):
        source = yaml.safe_load(path.read_text())
        rendered = crds.pop(source["metadata"]["name"])
        assert rendered["spec"] == source["spec"]
        assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert set(crds) == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}

    no_keep = render(bare, "crds.keep=false")
    assert all("annotations" not in d["metadata"] for d in no_keep if d["kind"] == "CustomResourceDefinition")
    assert not [d for d in render(bare, "crds.enabled=false") if d["kind"] == "CustomResourceDefinition"]


def test_operator_deployment_image_is_configurable(bare: Cluster) -> None:
    docs = render(
        bare, "image.repository=example.invalid/orchardist", "image.tag=1.2.3", "image.pullPolicy=Always"
    )
    [dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")]
    [container] = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "example.invalid/orchardist:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["command"] == ["orchardist", "operator", "run"]


def test_operator_pod_options(bare: Cluster) -> None:
    """Names, priority, probes on kopf's health endpoint; PDB and NetworkPolicy only when asked."""
    docs = render(
        bare, "fullnameOverride=orch", "operator.priorityClassName=fleet-critical", "operator.healthPort=9090"
    )
    [dep] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "orch-operator"]
    pod = dep["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["priorityClassName"] == "fleet-critical"
    assert pod["serviceAccountName"] == "orch-operator"
    assert "--liveness=http://0.0.0.0:9090/healthz" in container["args"]
    assert {"name": "health", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not [d for d in docs if d["kind"] in ("PodDisruptionBudget", "NetworkPolicy")]
    named = render(bare, "nameOverride=fleet")
    [dep] = [d for d in named if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")]
    assert dep["metadata"]["name"] == "orchardist-fleet-operator"
    assert dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "fleet"
    extra = render(bare, "podDisruptionBudget.enabled=true", "networkPolicy.enabled=true")
    [pdb] = [d for d in extra if d["kind"] == "PodDisruptionBudget"]
    [netpol] = [d for d in extra if d["kind"] == "NetworkPolicy"]
    selector = dep["spec"]["selector"]["matchLabels"] | {"app.kubernetes.io/name": "orchardist"}
    assert pdb["spec"]["selector"]["matchLabels"] == selector and pdb["spec"]["maxUnavailable"] == 1
    assert netpol["spec"]["podSelector"]["matchLabels"] == selector
    [ingress] = netpol["spec"]["ingress"]
    assert "from" not in ingress and {"protocol": "TCP", "port": 8080} in ingress["ports"]
    assert {"protocol": "UDP", "port": 53} in [p for rule in netpol["spec"]["egress"] for p in rule["ports"]]


@pytest.mark.parametrize(("version", "ok"), [("1.31.9", False), ("1.32.0", True), ("1.36.3", True)])
def test_kubernetes_floor_matches_selectable_fields(bare: Cluster, version: str, ok: bool) -> None:
    """The CRDs use selectableFields (GA in 1.32): the chart refuses older clusters."""
    assert any("selectableFields" in p.read_text() for p in (REPO / "crds").glob("*.yaml"))
    out = bare.helm("template", "orchardist", str(CHART), "--kube-version", version, check=False)
    assert (out.returncode == 0) == ok, out.stderr


def test_crds_first_applied_with_kubectl_are_adopted(tmp_path: Path) -> None:
    """The documented upgrade path from `kubectl apply -f crds/`: Helm refuses objects it does not
    own unless told to take them (`--take-ownership`, and `--force-conflicts` for the fields
    kubectl's apply owns); then they belong to the release like freshly installed ones."""
    cl = Cluster.start(
        tmp_path / "state", bin_dir=find_kubebins(), controller_manager=False, die_with_parent=True
    )
    try:
        cl.kubectl("apply", "-f", str(REPO / "crds"))
        install = ["install", "orchardist", str(CHART), "-n", SYSTEM_NS, "--create-namespace"]
        refused = cl.helm(*install, check=False)
        assert refused.returncode != 0 and "ownership" in refused.stderr, refused.stderr
        cl.helm("uninstall", "orchardist", "-n", SYSTEM_NS, check=False)  # the failed release, if recorded
        cl.helm(*install, "--take-ownership", "--force-conflicts")
        crd = json.loads(cl.kubectl("get", "crd", "modeldeployments.orchardist.io", "-o", "json").stdout)
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "orchardist"
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    finally:
        cl.stop()


@pytest.mark.parametrize(
    "key",
    ["bogus", "image.bogus", "operator.bogus", "operator.resources.bogus", "operator.resources.limits.bogus",
     "serviceAccount.bogus", "rbac.bogus", "crds.bogus", "systemNamespace.bogus", "agents.bogus",
     "agents.admissionPolicy.bogus", "podDisruptionBudget.bogus", "networkPolicy.bogus",
     "operator.livenessProbe.bogus", "operator.readinessProbe.bogus"],
)  # fmt: skip
def test_values_schema_refuses_unknown_keys(bare: Cluster, key: str) -> None:
    out = bare.helm("template", "orchardist", str(CHART), "--set", f"{key}=1", check=False)
    assert out.returncode != 0
    assert "additional properties 'bogus' not allowed" in out.stderr


def test_values_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "")
    assert not open_objects


@pytest.mark.parametrize("template", ["operator-rbac.yaml", "agents.yaml"])
def test_every_rbac_rule_says_why(template: str) -> None:
    lines = (CHART / "templates" / template).read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert rules
    for i in rules:
        assert lines[i - 1].strip().startswith("#"), f"{template}:{i + 1}: a rule without a comment"


def _rules(docs: list[dict[str, Any]], kind: str, suffix: str) -> list[dict[str, Any]]:
    [role] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_rbac_is_least_privilege(bare: Cluster) -> None:
    docs = render(bare, NODES)
    for kind, suffix in [("ClusterRole", "-operator"), ("ClusterRole", "-agent"), ("Role", "-agent")]:
        for rule in _rules(docs, kind, suffix):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    operator = _rules(docs, "ClusterRole", "-operator")
    writes = {
        r
        for rule in operator
        for r in rule["resources"]
        if {"create", "patch", "update"} & set(rule["verbs"])
    }
    # The controller patches a MacNode's and a ModelReplica's status only to mark a Mac whose Lease
    # expired NotReady and its replicas Unknown.
    assert "macnodes" not in writes
    assert [r["verbs"] for r in operator if "macnodes/status" in r["resources"]] == [["patch"]]
    assert [r["verbs"] for r in operator if "modelreplicas/status" in r["resources"]] == [["patch"]]
    agent = _rules(docs, "ClusterRole", "-agent")
    assert not [r for r in agent if "delete" in r["verbs"]]
    agent_writes = {
        r for rule in agent for r in rule["resources"] if {"create", "patch", "update"} & set(rule["verbs"])
    }
    # tokenreviews: a peer server checks a calling Mac's peer token (agent/orchardist_agent/peer_auth.py).
    assert agent_writes == {"macnodes", "macnodes/status", "modelreplicas/status", "events", "tokenreviews"}


def test_helm_install_on_the_real_apiserver(bare: Cluster) -> None:
    out = bare.helm(
        "install",
        "orchardist",
        str(CHART),
        "-n",
        SYSTEM_NS,
        "--create-namespace",
        "--set",
        NODES,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(bare.helm("status", "orchardist", "-n", SYSTEM_NS, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    bare.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/modeldeployments.orchardist.io", "crd/modelreplicas.orchardist.io", "crd/macnodes.orchardist.io",
        "crd/clusterkopfpeerings.kopf.dev", "crd/kopfpeerings.kopf.dev",
    )  # fmt: skip
    dep = json.loads(
        bare.kubectl("get", "deploy", "orchardist-operator", "-n", SYSTEM_NS, "-o", "json").stdout
    )
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "orchardist-operator"
    for sa in ("orchardist-operator", "orchardist-agent-mac-a", "orchardist-agent-mac-b"):
        bare.kubectl("get", "serviceaccount", sa, "-n", SYSTEM_NS)
    for resource in ("macnodes", "macnode-spec", "leases", "modelreplicas"):
        bare.kubectl("get", "validatingadmissionpolicy", f"orchardist-agent-{resource}")
        bare.kubectl("get", "validatingadmissionpolicybinding", f"orchardist-agent-{resource}")

    # The granted permissions, as the real RBAC authorizer sees them.
    op = f"--as=system:serviceaccount:{SYSTEM_NS}:orchardist-operator"
    agent = f"--as=system:serviceaccount:{SYSTEM_NS}:orchardist-agent-mac-a"
    expect = [
        (op, ["create", "modelreplicas.orchardist.io", "-n", "default"], True),
        (op, ["patch", "modeldeployments.orchardist.io", "--subresource=status", "-n", "default"], True),
        (op, ["create", "endpointslices.discovery.k8s.io", "-n", "default"], True),
        (op, ["watch", "leases.coordination.k8s.io", "-n", SYSTEM_NS], True),
        (op, ["update", "leases.coordination.k8s.io", "-n", SYSTEM_NS], False),
        (op, ["patch", "macnodes.orchardist.io", "--subresource=status"], True),  # NotReady on Lease expiry
        (op, ["patch", "macnodes.orchardist.io"], False),
        # Unknown on the replicas of a Mac whose Lease expired; a patch, never a whole-status update.
        (op, ["patch", "modelreplicas.orchardist.io", "--subresource=status", "-n", "default"], True),
        (op, ["update", "modelreplicas.orchardist.io", "--subresource=status", "-n", "default"], False),
        (op, ["create", "pods", "-n", "default"], False),
        (agent, ["patch", "macnodes.orchardist.io", "--subresource=status"], True),
        (agent, ["create", "tokenreviews.authentication.k8s.io"], True),  # peers' tokens
        (agent, ["update", "leases.coordination.k8s.io", "-n", SYSTEM_NS], True),
        (agent, ["create", "leases.coordination.k8s.io", "-n", "default"], False),
        # RBAC grants list/watch; the authorization webhook refuses them unless narrowed to
        # spec.nodeName=mac-a, which `can-i` cannot express (tests/e2e/test_hostile_rbac.py can).
        (agent, ["watch", "modelreplicas.orchardist.io", "-n", "default"], False),
        (agent, ["get", "modelreplicas.orchardist.io", "-n", "default"], False),
        (agent, ["patch", "modelreplicas.orchardist.io", "--subresource=status", "-n", "default"], True),
        (agent, ["create", "modelreplicas.orchardist.io", "-n", "default"], False),
        (agent, ["delete", "macnodes.orchardist.io"], False),
        (agent, ["patch", "modeldeployments.orchardist.io", "-n", "default"], False),
        (agent, ["list", "secrets", "-n", "default"], False),
        (agent, ["get", "secrets", "-n", "default"], False),  # only its projection's Role grants any
        (agent, ["get", "secrets", "-n", "orchardist-node-mac-a"], False),  # nothing projected yet
        # The per-Mac Secret projection (controller/projection.py).
        (op, ["create", "namespaces"], True),
        (op, ["create", "secrets", "-n", "orchardist-node-mac-a"], True),
        (op, ["create", "roles.rbac.authorization.k8s.io", "-n", "orchardist-node-mac-a"], True),
        (op, ["create", "rolebindings.rbac.authorization.k8s.io", "-n", "orchardist-node-mac-a"], True),
        (op, ["delete", "namespaces"], False),
        (op, ["create", "clusterroles.rbac.authorization.k8s.io"], False),
    ]
    wrong = []
    for who, args, allowed in expect:
        got = bare.kubectl("auth", "can-i", who, *args, check=False).stdout.strip() == "yes"
        if got != allowed:
            wrong.append((who, args, got))
    assert not wrong

    # Upgrades reach everything, the templated CRDs included: a new Mac gets its identity.
    bare.helm(
        "upgrade", "orchardist", str(CHART), "-n", SYSTEM_NS, "--set", "agents.nodes={mac-a,mac-b,mac-c}"
    )
    bare.kubectl("get", "serviceaccount", "orchardist-agent-mac-c", "-n", SYSTEM_NS)
    crd = json.loads(bare.kubectl("get", "crd", "modeldeployments.orchardist.io", "-o", "json").stdout)
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "orchardist"

    # Uninstall keeps the CRDs (crds.keep), so ModelDeployments survive a mistaken uninstall.
    bare.helm("uninstall", "orchardist", "-n", SYSTEM_NS)
    assert bare.kubectl("get", "crd", "modeldeployments.orchardist.io", check=False).returncode == 0
    assert bare.kubectl("get", "clusterrole", "orchardist-operator", check=False).returncode != 0
