"""Per-Mac agent identities from the chart: each agent's token may write its own MacNode, Lease and
the status of replicas bound to its node, and the ValidatingAdmissionPolicy refuses the same writes
to another node's objects, with its message, on the real apiserver."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev import procs
from orchardist.dev.cluster import Cluster
from tests.fixtures.agents import stop_process
from tests.fixtures.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "orchardist"
SYSTEM_NS = "orchardist-system"
A, B = "mac-id-a", "mac-id-b"
DIGEST = "sha256:" + "cd" * 32

pytestmark = pytest.mark.cluster


class Agent:
    """kubectl with one agent ServiceAccount's token (a kubeconfig of its own)."""

    def __init__(self, cluster: Cluster, node: str, directory: Path) -> None:
        token = cluster.kubectl("create", "token", f"orchardist-agent-{node}", "-n", SYSTEM_NS).stdout.strip()
        self.kubeconfig = directory / f"{node}.kubeconfig"
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": cluster.server,
                                                            "certificate-authority": str(cluster.ca_file)}}],
                    "users": [{"name": node, "user": {"token": token}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": node}}],
                    "current-context": "c",
                }
            )
        )  # fmt: skip
        self.bin = cluster.bin("kubectl")

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=60,
        )  # fmt: skip


@pytest.fixture(scope="module")
def agents(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Agent]]:
    """The chart installed (our CRDs already there) with two agent identities; the kopf peering
    CRDs applied from the chart's files, as an administrator would."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "files" / "kopf"))
    cluster.helm(
        "install", "identity", str(CHART), "-n", SYSTEM_NS, "--create-namespace",
        "--set", "crds.enabled=false", "--set", f"agents.nodes={{{A},{B}}}",
    )  # fmt: skip
    try:
        directory = tmp_path_factory.mktemp("agents")
        found = {node: Agent(cluster, node, directory) for node in (A, B)}
        _wait_for_policies(cluster, found[A])
        yield found
    finally:
        cluster.helm("uninstall", "identity", "-n", SYSTEM_NS, check=False)
        cluster.kubectl("delete", "macnode", A, B, "mac-id-c", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "lease", A, B, "-n", SYSTEM_NS, "--ignore-not-found", check=False)


def _wait_for_policies(cluster: Cluster, agent: Agent, timeout: float = 30) -> None:
    """New policies reach the admission plugin within seconds: probe each with a server-side dry
    run (admission runs, nothing is stored) until it refuses."""
    cluster.kubectl("apply", "-n", SYSTEM_NS, "-f", "-", input=_replica("probe-on-b", B, SYSTEM_NS))
    status = json.dumps({"status": {"phase": "Pending"}})
    probes = [
        (["create", "--dry-run=server", "-f", "-"], _macnode("mac-id-probe"), "its own MacNode"),
        (["create", "--dry-run=server", "-f", "-"], _lease("mac-id-probe"), "its own Lease"),
        (["patch", "mr", "probe-on-b", "-n", SYSTEM_NS, "--subresource=status", "--type=merge", "-p", status,
          "--dry-run=server"], None, "bound to its own node"),
    ]  # fmt: skip
    try:
        for args, body, message in probes:
            _wait_refused(agent, args, body, message, timeout)
    finally:
        cluster.kubectl("delete", "mr", "probe-on-b", "-n", SYSTEM_NS, "--ignore-not-found", check=False)


def _wait_refused(agent: Agent, args: list[str], body: str | None, message: str, timeout: float) -> None:
    """Repeat one dry-run write as ``agent`` until a policy refuses it with ``message``."""
    stderr = [""]

    def refused() -> bool:
        out = agent.kubectl(*args, input=body)
        stderr[0] = out.stderr
        return out.returncode != 0 and message in out.stderr

    wait_for(
        refused, timeout=timeout, interval=0.3, message=lambda: f"policy ({message}) enforced: {stderr[0]}"
    )


def _macnode(name: str) -> str:
    return json.dumps({"apiVersion": "orchardist.io/v1alpha1", "kind": "MacNode", "metadata": {"name": name}})


def _lease(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": SYSTEM_NS},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40},
        }
    )


def _replica(name: str, node: str, namespace: str) -> str:
    obj: dict[str, Any] = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelReplica",
        "metadata": {"name": name, "namespace": namespace, "labels": {"orchardist.io/node": node}},
        "spec": {
            "nodeName": node,
            "deployment": "qwen",
            "model": f"oci://registry.example.com/models/qwen@{DIGEST}",
            "digest": DIGEST,
            "servedModelName": "qwen",
            "memoryPlan": {
                "weightBytes": 1 << 30, "overheadBytes": 1 << 29, "kvBudgetBytes": 1 << 31,
                "kvBytesPerToken": 114688, "blockSize": 16, "numBlocks": 2048, "maxModelLen": 32768,
                "maxNumSeqs": 8, "maxNumBatchedTokens": 4096, "gpuMemoryUtilization": 0.92,
                "reservedBytes": 4 << 30,
            },
        },
    }  # fmt: skip
    return json.dumps(obj)


# What the operator watches (its handlers and indexes), cluster-wide; the chart's RBAC allows each.
OPERATOR_WATCHES = ("modeldeployments", "modelreplicas", "macnodes", "leases", "services", "endpointslices")
_WATCH_GAUGE = re.compile(r"^apiserver_longrunning_requests\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)


def open_watches(cluster: Cluster) -> dict[str, float]:
    """Open WATCH requests per resource, from the kube-apiserver's own gauge (every client counts)."""
    counts: dict[str, float] = {}
    for m in _WATCH_GAUGE.finditer(cluster.kubectl("get", "--raw", "/metrics").stdout):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if labels.get("verb") == "WATCH" and not labels.get("subresource"):
            counts[labels["resource"]] = counts.get(labels["resource"], 0) + float(m.group("value"))
    return counts


STATUS = json.dumps({"status": {"agentVersion": "0.1.0", "address": "192.0.2.10"}})


def refused(out: subprocess.CompletedProcess[str], message: str) -> str:
    assert out.returncode != 0, f"allowed, expected a refusal with {message!r}: {out.stdout}"
    assert message in out.stderr, out.stderr
    return out.stderr


def test_agent_writes_its_own_macnode_and_is_refused_on_another(
    cluster: Cluster, agents: dict[str, Agent]
) -> None:
    a = agents[A]
    created = a.kubectl("create", "-f", "-", input=_macnode(A))
    assert created.returncode == 0, created.stderr
    cluster.kubectl("create", "-f", "-", input=_macnode(B))  # node B registered by someone else

    # A server-side apply writes without reading first (kubectl patch reads, which the
    # authorization webhook refuses before admission is reached).
    foreign = json.dumps({**json.loads(_macnode(B)), "status": json.loads(STATUS)["status"]})
    err = refused(
        a.kubectl("apply", "--server-side", "--subresource=status", "-f", "-", input=foreign),
        f"orchardist agent {A} may only write its own MacNode, not MacNode {B}",
    )
    read = a.kubectl("patch", "macnode", B, "--subresource=status", "--type=merge", "-p", STATUS)
    refused(read, f"orchardist agent {A} may read only its own MacNode, not MacNode {B}")
    assert "ValidatingAdmissionPolicy" in err and "denied request" in err

    own = a.kubectl("patch", "macnode", A, "--subresource=status", "--type=merge", "-p", STATUS)
    assert own.returncode == 0, own.stderr
    status = json.loads(cluster.kubectl("get", "macnode", A, "-o", "json").stdout)["status"]
    assert status["address"] == "192.0.2.10"
    # B's own agent may do what A may not.
    theirs = agents[B].kubectl("patch", "macnode", B, "--subresource=status", "--type=merge", "-p", STATUS)
    assert theirs.returncode == 0, theirs.stderr

    impostor = a.kubectl("create", "-f", "-", input=_macnode("mac-id-c"))
    assert impostor.returncode != 0
    assert "may only write its own MacNode, not MacNode mac-id-c" in impostor.stderr
    relabel = a.kubectl("label", "macnode", B, "stolen=yes")
    assert relabel.returncode != 0 and "may read only its own MacNode" in relabel.stderr
    # RBAC still bounds what an agent can do at all.
    delete = a.kubectl("delete", "macnode", A)
    assert delete.returncode != 0 and "forbidden" in delete.stderr.lower()


def test_agent_keeps_its_own_lease_only(agents: dict[str, Agent]) -> None:
    a = agents[A]
    refused(
        a.kubectl("create", "-f", "-", input=_lease(B)),
        f"orchardist agent {A} may only write its own Lease ({SYSTEM_NS}/{A}), not {SYSTEM_NS}/{B}",
    )
    own = a.kubectl("create", "-f", "-", input=_lease(A))
    assert own.returncode == 0, own.stderr
    renew = a.kubectl("patch", "lease", A, "-n", SYSTEM_NS, "--type=merge", "-p",
                      json.dumps({"spec": {"renewTime": "2026-11-26T12:00:00.000000Z"}}))  # fmt: skip
    assert renew.returncode == 0, renew.stderr
    replaced = a.kubectl("replace", "-f", "-", input=_lease(A))
    assert replaced.returncode == 0, replaced.stderr
    elsewhere = a.kubectl("create", "-n", "default", "-f", "-", input=_lease(A).replace(SYSTEM_NS, "default"))
    assert elsewhere.returncode != 0 and "forbidden" in elsewhere.stderr.lower()


def test_agent_reports_status_only_for_replicas_on_its_node(
    cluster: Cluster, agents: dict[str, Agent], namespace: str
) -> None:
    cluster.kubectl("create", "-f", "-", input=_replica("on-a", A, namespace))
    cluster.kubectl("create", "-f", "-", input=_replica("on-b", B, namespace))
    a = agents[A]
    progress = json.dumps({"status": {"phase": "Pulling", "restarts": 0}})
    patch = ["--subresource=status", "--type=merge", "-p", progress]
    refused(
        a.kubectl("patch", "mr", "on-b", "-n", namespace, *patch),
        f"orchardist agent {A} may only write ModelReplicas bound to its own node, not on-b on node {B}",
    )
    own = a.kubectl(
        "patch", "mr", "on-a", "-n", namespace, "--subresource=status", "--type=merge", "-p", progress
    )
    assert own.returncode == 0, own.stderr
    assert (
        json.loads(cluster.kubectl("get", "mr", "on-a", "-n", namespace, "-o", "json").stdout)["status"][
            "phase"
        ]
        == "Pulling"
    )
    # The agent sees the replicas (list/watch) but cannot create or change their spec (RBAC).
    listed = a.kubectl("get", "mr", "-n", namespace, f"--field-selector=spec.nodeName={A}", "-o", "name")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["modelreplica.orchardist.io/on-a"]
    create = a.kubectl("create", "-f", "-", input=_replica("forged", A, namespace))
    assert create.returncode != 0 and "forbidden" in create.stderr.lower()


def test_other_identities_pass_the_policy(cluster: Cluster, agents: dict[str, Agent]) -> None:
    """The policy judges agent identities only: the admin writes any MacNode's status."""
    cluster.kubectl("apply", "-f", "-", input=_macnode(B))
    cluster.kubectl("patch", "macnode", B, "--subresource=status", "--type=merge", "-p", STATUS)


def _run_agent(agent: Agent, node: str, workdir: Path) -> subprocess.Popen[bytes]:
    """`orchardist agent run` as a Mac runs it, with only that agent's token."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(Path(sys.executable).with_name("orchardist")), "agent", "run",
        "--kubeconfig", str(agent.kubeconfig), "--node-name", node, "--simulate", "m4-pro-64gb",
        "--store", str(workdir / "store"), "--state-dir", str(workdir / "state"),
        "--address", "127.0.0.1", "--bind-address", "127.0.0.1", "--heartbeat-interval", "1",
        "--log-format", "json",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    with (workdir / "agent.log").open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def test_the_real_agent_runs_with_only_its_own_credentials(
    cluster: Cluster, agents: dict[str, Agent], tmp_path: Path
) -> None:
    """The chart's RBAC is enough for `orchardist agent run`: it registers and heartbeats as A."""
    proc = _run_agent(agents[A], A, tmp_path / "a")
    log = tmp_path / "a" / "agent.log"
    try:

        def ready_and_renewed() -> bool:
            assert proc.poll() is None, f"agent exited:\n{log.read_text()[-3000:]}"
            node = cluster.kubectl("get", "macnode", A, "-o", "json", check=False)
            lease = cluster.kubectl("get", "lease", A, "-n", SYSTEM_NS, "-o", "json", check=False)
            if node.returncode != 0 or lease.returncode != 0:
                return False
            conditions = json.loads(node.stdout).get("status", {}).get("conditions", [])
            spec = json.loads(lease.stdout)["spec"]
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            return ready and spec.get("holderIdentity") == A and bool(spec.get("renewTime"))

        wait_for(
            ready_and_renewed,
            timeout=60,
            interval=0.5,
            message=lambda: (
                f"MacNode {A} Ready and its Lease renewed with the agent's own token:\n"
                + log.read_text()[-3000:]
            ),
        )
        assert "forbidden" not in log.read_text().lower(), log.read_text()[-3000:]
    finally:
        stop_process(proc)


def test_the_real_agent_cannot_pose_as_another_node(agents: dict[str, Agent], tmp_path: Path) -> None:
    """A's token with another node name: the agent's first call (reading that MacNode) is refused."""
    proc = _run_agent(agents[A], "mac-id-impostor", tmp_path / "impostor")
    log = tmp_path / "impostor" / "agent.log"
    try:
        wait_for(
            lambda: "may read only its own" in log.read_text() or proc.poll() is not None,
            timeout=60,
            interval=0.5,
            message=lambda: f"the impostor refused (or exited):\n{log.read_text()[-3000:]}",
        )
        # Its first call, reading the MacNode, is refused by the authorization webhook.
        assert (
            f"orchardist agent {A} may read only its own MacNode, not MacNode mac-id-impostor"
            in log.read_text()
        )
    finally:
        stop_process(proc)


def test_the_real_operator_runs_with_only_its_chart_credentials(
    cluster: Cluster, agents: dict[str, Agent], namespace: str, tmp_path: Path
) -> None:
    """`orchardist operator run` (standalone) with the chart's operator token: it opens a watch on
    everything it needs and writes ModelDeployment status, without a single Forbidden."""
    token = cluster.kubectl("create", "token", "identity-orchardist-operator", "-n", SYSTEM_NS).stdout.strip()
    kubeconfig = tmp_path / "operator.kubeconfig"
    config = json.loads(agents[A].kubeconfig.read_text())
    config["users"] = [{"name": A, "user": {"token": token}}]
    kubeconfig.write_text(json.dumps(config))
    port = procs.free_port()  # nothing listens there: the model cannot be resolved
    md = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "op-rbac", "namespace": namespace},
        "spec": {"model": f"oci://127.0.0.1:{port}/models/none:v1"},
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(md))
    log = tmp_path / "operator.log"
    orchardist = str(Path(sys.executable).with_name("orchardist"))
    argv = [
        orchardist,
        "operator",
        "run",
        "--kubeconfig",
        str(kubeconfig),
        "--standalone",
        "--log-format",
        "json",
    ]
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    before = open_watches(cluster)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:

        def resolve_failed() -> bool:
            assert proc.poll() is None, f"operator exited:\n{log.read_text()[-3000:]}"
            obj = json.loads(cluster.kubectl("get", "md", "op-rbac", "-n", namespace, "-o", "json").stdout)
            return any(
                c.get("reason") == "ResolveFailed" for c in obj.get("status", {}).get("conditions", [])
            )

        wait_for(
            resolve_failed,
            timeout=60,
            interval=0.5,
            message=lambda: f"status ResolveFailed written:\n{log.read_text()[-3000:]}",
        )

        def watching() -> bool:
            assert proc.poll() is None, f"operator exited:\n{log.read_text()[-3000:]}"
            now = open_watches(cluster)
            return all(now.get(r, 0) > before.get(r, 0) for r in OPERATOR_WATCHES)

        # A refused watch is never opened: the operator's watches are open, one more per resource.
        wait_for(
            watching,
            timeout=60,
            interval=0.5,
            message=lambda: (
                f"a new watch on each of {OPERATOR_WATCHES}: before {before}, "
                f"now {open_watches(cluster)}\n{log.read_text()[-3000:]}"
            ),
        )
        text = log.read_text()
        assert "forbidden" not in text.lower(), text[-3000:]
    finally:
        stop_process(proc)


def test_the_policies_type_check_clean(cluster: Cluster, agents: dict[str, Agent]) -> None:
    """The controller-manager type-checks each policy's CEL against its resource's schema."""
    for resource in ("macnodes", "macnode-spec", "leases", "modelreplicas"):
        name = f"identity-orchardist-agent-{resource}"

        def checked(name: str = name) -> dict[str, Any] | None:
            policy = cluster.kubectl("get", "validatingadmissionpolicy", name, "-o", "json")
            status: dict[str, Any] = json.loads(policy.stdout).get("status", {})
            return status if "typeChecking" in status else None

        status = wait_for(checked, timeout=60, interval=0.5, message=f"{name} type-checked")
        assert not status["typeChecking"].get("expressionWarnings"), (name, status)
