"""A Mac's credentials reach only that Mac's things, on the real apiserver with the chart installed.

Each agent identity is the chart's per-Mac ServiceAccount. Secrets: an agent reads only the copies
the controller projects for its node (run here with the chart's operator token, so the chart's
operator RBAC is shown to suffice, including the escalation check on the Role it writes).
Replicas: the authorization webhook refuses a list or watch not narrowed to the agent's own node.
MacNodes: admission refuses any spec, label or annotation an agent sets or changes. The last test
runs the real operator and the real agent, each with only its chart token, through a private
registry and an API key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchardist.api.modelreplica import ModelReplica
from orchardist.api.projection import node_namespace, projected_secret
from orchardist.controller.projection import READER, Projector
from orchardist.dev.cluster import Cluster
from orchardist.kube import Kube, api_client
from orchardist.oci.auth import Credentials
from orchardist.oci.push import push
from orchardist_agent.engines import Runtime
from tests.e2e.test_agent_identity import Agent
from tests.fixtures.agents import chat, make_agent, registered, stop_process, stop_recorded_engines
from tests.fixtures.registry import AuthRegistry
from tests.fixtures.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "orchardist"
SYSTEM_NS = "orchardist-system"
RELEASE = "hostile"
A, B = "mac-h-a", "mac-h-b"
SRC = "hostile-src"
USER = f"system:serviceaccount:{SYSTEM_NS}:orchardist-agent-"
DIGEST = "sha256:" + "ef" * 32

pytestmark = pytest.mark.cluster


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str, data: dict[str, str], type_: str = "Opaque") -> str:
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": type_,
        "data": {k: b64(v) for k, v in data.items()},
    }
    return json.dumps(body)


def replica(name: str, node: str, **refs: Any) -> str:
    plan = {
        "weightBytes": 1 << 20,
        "overheadBytes": 1 << 20,
        "kvBudgetBytes": 1 << 20,
        "kvBytesPerToken": 1024,
        "blockSize": 16,
        "numBlocks": 64,
        "maxModelLen": 1024,
        "maxNumSeqs": 1,
        "maxNumBatchedTokens": 1024,
        "gpuMemoryUtilization": 0.1,
        "reservedBytes": 4 << 20,
    }
    return json.dumps(
        {
            "apiVersion": "orchardist.io/v1alpha1",
            "kind": "ModelReplica",
            "metadata": {"name": name, "namespace": SRC},
            "spec": {
                "nodeName": node,
                "deployment": "qwen",
                "model": f"oci://127.0.0.1:1/m@{DIGEST}",
                "digest": DIGEST,
                "servedModelName": "qwen",
                "memoryPlan": plan,
                **refs,
            },
        }
    )


@dataclass
class Fleet:
    cluster: Cluster
    agents: dict[str, Agent]
    operator_kubeconfig: Path

    def project(self) -> None:
        """One pass of the controller's projection, with the chart's operator token."""
        items = json.loads(self.cluster.kubectl("get", "mr", "-A", "-o", "json").stdout)["items"]
        replicas = [ModelReplica.model_validate(i) for i in items]
        projector = Projector(Kube(api_client(self.operator_kubeconfig)), lambda: replicas, SYSTEM_NS)
        asyncio.run(projector.sync())

    def can_i(self, node: str, *args: str) -> str:
        out = self.cluster.kubectl("auth", "can-i", *args, f"--as={USER}{node}", check=False)
        return out.stdout.strip()


@pytest.fixture(scope="module")
def fleet(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The chart (two Macs), a source namespace with four Secrets and a replica on each Mac, and the
    projection made once by the operator's identity."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "files" / "kopf"))
    cluster.helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        SYSTEM_NS,
        "--create-namespace",
        "--set",
        "crds.enabled=false",
        "--set",
        f"agents.nodes={{{A},{B}}}",
    )
    try:
        directory = tmp_path_factory.mktemp("hostile")
        agents = {node: Agent(cluster, node, directory) for node in (A, B)}
        token = cluster.kubectl("create", "token", f"{RELEASE}-orchardist-operator", "-n", SYSTEM_NS).stdout
        config = json.loads(agents[A].kubeconfig.read_text())
        config["users"] = [{"name": "operator", "user": {"token": token.strip()}}]
        config["contexts"][0]["context"]["user"] = "operator"
        operator = directory / "operator.kubeconfig"
        operator.write_text(json.dumps(config))
        cluster.kubectl("create", "namespace", SRC)
        docker = json.dumps({"auths": {"registry.example": {"auth": b64("u:p")}}})
        for body in (
            secret("regcred", {".dockerconfigjson": docker}, "kubernetes.io/dockerconfigjson"),
            secret("key-a", {"api-key": "a-secret"}),
            secret("key-b", {"api-key": "b-secret"}),
            secret("bystander", {"password": "not-for-macs"}),
            replica(
                "ra",
                A,
                pullSecretRef={"name": "regcred"},
                apiKeySecretRef={"name": "key-a", "key": "api-key"},
            ),
            replica("rb", B, apiKeySecretRef={"name": "key-b", "key": "api-key"}),
        ):
            cluster.kubectl("create", "-n", SRC, "-f", "-", input=body)
        found = Fleet(cluster, agents, operator)
        found.project()
        _wait_for_macnode_policy(agents[A])
        yield found
    finally:
        cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, check=False)
        cluster.kubectl(
            "delete",
            "namespace",
            SRC,
            node_namespace(A),
            node_namespace(B),
            "--wait=false",
            "--ignore-not-found",
            check=False,
        )
        cluster.kubectl("delete", "macnode", A, B, "--ignore-not-found", check=False)


def _wait_for_macnode_policy(agent: Agent) -> None:
    """A new policy reaches admission within seconds: a server-side dry run until it refuses."""
    body = json.dumps(
        {
            "apiVersion": "orchardist.io/v1alpha1",
            "kind": "MacNode",
            "metadata": {"name": A, "labels": {"probe": "x"}},
        }
    )
    wait_for(
        lambda: (
            "may not set the labels"
            in agent.kubectl("create", "--dry-run=server", "-f", "-", input=body).stderr
        ),
        timeout=30,
        interval=0.3,
        message="the MacNode spec policy enforced",
    )


def refused(out: subprocess.CompletedProcess[str], *messages: str) -> None:
    assert out.returncode != 0, f"allowed, expected a refusal: {out.stdout}"
    for message in messages:
        assert message in out.stderr, out.stderr


COPY_A = projected_secret(SRC, "regcred")
KEY_A = projected_secret(SRC, "key-a")
KEY_B = projected_secret(SRC, "key-b")


# ---- Secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "answer"),
    [
        (("get", f"secret/{COPY_A}", "-n", node_namespace(A)), "yes"),
        (("get", f"secret/{KEY_A}", "-n", node_namespace(A)), "yes"),
        (("get", "secret/regcred", "-n", SRC), "no"),  # the source itself
        (("get", "secret/bystander", "-n", SRC), "no"),  # a Secret no replica references
        (("get", f"secret/{KEY_B}", "-n", node_namespace(B)), "no"),  # another Mac's copy
        (("get", f"secret/{KEY_B}", "-n", node_namespace(A)), "no"),  # a name its Role does not hold
        (("list", "secrets", "-n", node_namespace(A)), "no"),
        (("watch", "secrets", "-A"), "no"),
        (("get", "secrets", "-n", "kube-system"), "no"),
        (("create", "secrets", "-n", node_namespace(A)), "no"),
        (("update", f"roles/{READER}", "-n", node_namespace(A)), "no"),
    ],
)
def test_can_i_secrets_as_a_mac(fleet: Fleet, args: tuple[str, ...], answer: str) -> None:
    assert fleet.can_i(A, *args) == answer


@pytest.mark.parametrize(
    ("namespace", "name"),
    [(SRC, "regcred"), (SRC, "bystander"), (node_namespace(B), KEY_B), (node_namespace(A), "anything-else")],
)
def test_reading_a_secret_outside_the_projection_is_forbidden(
    fleet: Fleet, namespace: str, name: str
) -> None:
    out = fleet.agents[A].kubectl("get", "secret", name, "-n", namespace, "-o", "json")
    refused(out, f'secrets "{name}" is forbidden', f'User "{USER}{A}" cannot get resource "secrets"')
    assert "not-for-macs" not in out.stdout and b64("b-secret") not in out.stdout


def test_the_projected_copy_is_the_source_and_readable_with_the_macs_token(fleet: Fleet) -> None:
    out = fleet.agents[A].kubectl("get", "secret", KEY_A, "-n", node_namespace(A), "-o", "json")
    assert out.returncode == 0, out.stderr
    copy = json.loads(out.stdout)
    assert base64.b64decode(copy["data"]["api-key"]).decode() == "a-secret"
    assert copy["metadata"]["annotations"]["orchardist.io/projected-from"] == f"{SRC}/key-a"
    pull = json.loads(
        fleet.cluster.kubectl("get", "secret", COPY_A, "-n", node_namespace(A), "-o", "json").stdout
    )
    assert pull["type"] == "kubernetes.io/dockerconfigjson"


# ---- Replicas --------------------------------------------------------------------------------

OWN_ONLY = f"orchardist agent {A} may {{verb}} only the ModelReplicas bound to its own node: use the field selector spec.nodeName={A}"  # noqa: E501


@pytest.mark.parametrize(
    "args",
    [
        ("get", "mr", "-A"),
        ("get", "mr", "-n", SRC),
        ("get", "mr", "-A", f"--field-selector=spec.nodeName={B}"),
        ("get", "mr", "-A", "-l", f"orchardist.io/node={A}"),  # labels are the controller's word, not a bound
    ],
)
def test_an_agent_cannot_list_other_macs_replicas(fleet: Fleet, args: tuple[str, ...]) -> None:
    out = fleet.agents[A].kubectl(*args)
    refused(out, 'cannot list resource "modelreplicas"', OWN_ONLY.format(verb="list"))
    assert "rb" not in out.stdout


def test_an_agent_cannot_watch_other_macs_replicas(fleet: Fleet) -> None:
    path = f"/apis/orchardist.io/v1alpha1/modelreplicas?watch=1&fieldSelector=spec.nodeName%3D{B}"
    out = fleet.agents[A].kubectl("get", "--raw", path, "--request-timeout=10s")
    refused(out, OWN_ONLY.format(verb="watch"))
    assert "rb" not in out.stdout


def test_an_agent_lists_its_own_replicas_only(fleet: Fleet) -> None:
    out = fleet.agents[A].kubectl("get", "mr", "-A", f"--field-selector=spec.nodeName={A}", "-o", "name")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["modelreplica.orchardist.io/ra"]
    assert fleet.can_i(A, "list", "modelreplicas") == "no - " + OWN_ONLY.format(verb="list")
    got = fleet.agents[A].kubectl("get", "mr", "ra", "-n", SRC)
    refused(got, f'User "{USER}{A}" cannot get resource "modelreplicas"')


# ---- MacNodes --------------------------------------------------------------------------------


def _macnode(name: str, **meta: Any) -> str:
    spec = meta.pop("spec", None)
    body: dict[str, Any] = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "MacNode",
        "metadata": {"name": name, **meta},
    }
    if spec is not None:
        body["spec"] = spec
    return json.dumps(body)


@pytest.fixture(scope="module")
def own_node(fleet: Fleet) -> str:
    """A registered itself (bare, as node.py does); an administrator registered B."""
    made = fleet.agents[A].kubectl("create", "-f", "-", input=_macnode(A))
    assert made.returncode == 0, made.stderr
    fleet.cluster.kubectl("apply", "-f", "-", input=_macnode(B))
    return A


SPEC = f"orchardist agent {A} may not change the spec (taints, unschedulable) of MacNode {A}"
SET = f"orchardist agent {A} may not set the {{}} of MacNode {A}"
NOT_OWN = "may only write its own MacNode, not MacNode {}"
TAINT = {"taints": [{"key": "k", "effect": "NoSchedule"}]}
DRY = ("create", "--dry-run=server", "-f", "-")
CHANGE = f"orchardist agent {A} may not change the {{}} of MacNode {A}"
READ = f"orchardist agent {A} may read only its own {{}}, not {{}} {B}"


@pytest.mark.parametrize(
    ("args", "body", "messages"),
    [
        (("patch", "macnode", A, "--type=merge", "-p", json.dumps({"spec": TAINT})), None, (SPEC,)),
        (("patch", "macnode", A, "--type=merge", "-p", '{"spec":{"unschedulable":true}}'), None, (SPEC,)),
        (("label", "macnode", A, "gpu=huge"), None, (CHANGE.format("labels"),)),
        (("annotate", "macnode", A, "n=mine"), None, (CHANGE.format("annotations"),)),
        (DRY, _macnode(A, labels={"tier": "fast"}), (SET.format("labels"),)),
        (DRY, _macnode(A, annotations={"a": "b"}), (SET.format("annotations"),)),
        (DRY, _macnode(A, spec=TAINT), (SET.format("spec (taints, unschedulable)"),)),
        (("create", "-f", "-"), _macnode("mac-h-c"), (NOT_OWN.format("mac-h-c"),)),
        # kubectl label/patch read the object first, which the webhook refuses; a server-side apply
        # writes without reading, so admission answers.
        (("label", "macnode", B, "stolen=yes"), None, (READ.format("MacNode", "MacNode"),)),
        # (both policies refuse this one; the API server names the first)
        (("apply", "--server-side", "-f", "-"), _macnode(B, labels={"stolen": "yes"}),
         ("ValidatingAdmissionPolicy", f"denied request: orchardist agent {A} may", f"MacNode {B}")),
        (("apply", "--server-side", "--subresource=status", "-f", "-"),
         json.dumps({**json.loads(_macnode(B)), "status": {"address": "192.0.2.9"}}), (NOT_OWN.format(B),)),
        (("get", "macnode", B), None, (READ.format("MacNode", "MacNode"),)),
        (("get", "lease", B, "-n", SYSTEM_NS), None, (READ.format("Lease", "Lease"),)),
        (("delete", "macnode", A), None, (f'User "{USER}{A}" cannot delete resource "macnodes"',)),
        (("get", "macnodes"), None, (f'User "{USER}{A}" cannot list resource "macnodes"',)),
    ],
)  # fmt: skip
def test_an_agent_cannot_change_its_macnode_or_touch_another(
    fleet: Fleet, own_node: str, args: tuple[str, ...], body: str | None, messages: tuple[str, ...]
) -> None:
    before = json.loads(fleet.cluster.kubectl("get", "macnode", A, B, "-o", "json").stdout)["items"]
    refused(fleet.agents[A].kubectl(*args, input=body), *messages)
    after = json.loads(fleet.cluster.kubectl("get", "macnode", A, B, "-o", "json").stdout)["items"]
    assert [
        (n["metadata"].get("labels"), n["metadata"].get("annotations"), n.get("spec")) for n in after
    ] == [(n["metadata"].get("labels"), n["metadata"].get("annotations"), n.get("spec")) for n in before]


def test_an_agent_still_reports_its_status_and_the_admin_still_labels(fleet: Fleet, own_node: str) -> None:
    ok = fleet.agents[A].kubectl(
        "patch",
        "macnode",
        A,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"address":"192.0.2.10"}}',
    )
    assert ok.returncode == 0, ok.stderr
    fleet.cluster.kubectl("label", "macnode", A, "pool=hostile-test")
    node = json.loads(fleet.cluster.kubectl("get", "macnode", A, "-o", "json").stdout)
    assert node["status"]["address"] == "192.0.2.10" and node["metadata"]["labels"]["pool"] == "hostile-test"
    assert fleet.can_i(A, "patch", f"macnodes/{A}") == "yes"  # RBAC allows; admission narrows


# ---- the projection follows its sources (last: it changes the module's world) -----------------


def test_the_projection_follows_the_source_and_the_replicas(fleet: Fleet) -> None:
    cluster = fleet.cluster
    cluster.kubectl("apply", "-n", SRC, "-f", "-", input=secret("key-a", {"api-key": "rotated"}))
    fleet.project()
    copy = json.loads(cluster.kubectl("get", "secret", KEY_A, "-n", node_namespace(A), "-o", "json").stdout)
    assert base64.b64decode(copy["data"]["api-key"]).decode() == "rotated"
    cluster.kubectl("delete", "mr", "ra", "-n", SRC, "--wait=true")
    fleet.project()
    left = cluster.kubectl("get", "secrets", "-n", node_namespace(A), "-o", "name").stdout.split()
    assert not [n for n in left if SRC in n], left
    role = json.loads(cluster.kubectl("get", "role", READER, "-n", node_namespace(A), "-o", "json").stdout)
    assert not role.get("rules")  # none at all: an empty resourceNames would mean every Secret
    assert fleet.can_i(A, "get", f"secret/{KEY_A}", "-n", node_namespace(A)) == "no"
    assert fleet.can_i(B, "get", f"secret/{KEY_B}", "-n", node_namespace(B)) == "yes"


def keyed_chat(endpoint: str, key: str) -> dict[str, Any]:
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0})
    req = urllib.request.Request(
        f"http://{endpoint}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


# ---- happy path: the real operator and agent, each with only its chart token -------------------


@pytest.mark.registry
@pytest.mark.engine
def test_the_real_agent_pulls_and_serves_through_the_projection(
    fleet: Fleet, auth_registry: AuthRegistry, tiny_model: Path, mlx_runtime: Runtime, tmp_path: Path
) -> None:
    cluster = fleet.cluster
    creds = Credentials(auth_registry.username, auth_registry.password)
    asyncio.run(push(tiny_model, f"{auth_registry.host}/hostile/tiny:v1", auth=creds))
    ns = "hostile-happy"
    cluster.kubectl("create", "namespace", ns)
    docker = json.dumps({"auths": {auth_registry.host: {"auth": b64(f"{creds.username}:{creds.password}")}}})
    cluster.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=secret("regcred", {".dockerconfigjson": docker}, "kubernetes.io/dockerconfigjson"),
    )
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=secret("key", {"api-key": "happy-key"}))
    agent = make_agent(
        cluster, tmp_path / "agent", node=A, extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}")
    )
    agent.argv[agent.argv.index("--kubeconfig") + 1] = str(fleet.agents[A].kubeconfig)
    env = {k: v for k, v in cluster.env().items() if k != "KUBECONFIG"}
    log = tmp_path / "operator.log"
    argv = [
        sys.executable,
        "-m",
        "orchardist",
        "operator",
        "run",
        "--kubeconfig",
        str(fleet.operator_kubeconfig),
        "--standalone",
        "--log-format",
        "json",
    ]
    with log.open("ab") as out:
        operator = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        agent.start()
        registered(cluster, agent)
        cluster.kubectl("label", "macnode", A, "pool=hostile-test", "--overwrite")
        md = {
            "apiVersion": "orchardist.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "happy", "namespace": ns},
            "spec": {
                "model": f"oci://{auth_registry.host}/hostile/tiny:v1",
                "engine": "mlx-lm",
                "contextLength": 256,
                "maxConcurrentSequences": 1,
                "pullSecretRef": {"name": "regcred"},
                "apiKeySecretRef": {"name": "key", "key": "api-key"},
                "placement": {"nodeSelector": {"pool": "hostile-test"}},
            },
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(md))

        def ready() -> dict[str, Any] | None:
            assert operator.poll() is None, log.read_text()[-3000:]
            assert agent.proc is not None and agent.proc.poll() is None, agent.tail()
            items = json.loads(cluster.kubectl("get", "mr", "-n", ns, "-o", "json").stdout)["items"]
            st = items[0].get("status") or {} if items else {}
            return st if st.get("phase") == "Ready" else None

        st = wait_for(
            ready,
            timeout=240,
            interval=1.0,
            message=lambda: f"replica Ready\nagent:\n{agent.tail()}\noperator:\n{log.read_text()[-2000:]}",
        )
        # The key the agent read from its projected copy guards the endpoint.
        with pytest.raises(urllib.error.HTTPError) as no_key:
            chat(st["endpoint"])
        assert no_key.value.code == 401
        assert keyed_chat(st["endpoint"], "happy-key")["choices"]
        copies = cluster.kubectl("get", "secrets", "-n", node_namespace(A), "-o", "name").stdout.split()
        assert {f"secret/{projected_secret(ns, 'regcred')}", f"secret/{projected_secret(ns, 'key')}"} <= set(
            copies
        )
        assert "forbidden" not in log.read_text().lower(), log.read_text()[-3000:]
        # The agent may meet its new replica before the controller's next projection pass: a read
        # of the not-yet-projected copy is refused and retried. Nothing else is ever refused.
        copy = projected_secret(ns, "regcred")
        refusals = [line for line in agent.log.read_text().splitlines() if "forbidden" in line.lower()]
        assert all(copy in line and "is forbidden" in line for line in refusals), refusals[:3]
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        agent.stop()
        stop_process(operator)
        stop_recorded_engines(agent.workdir / "state")
