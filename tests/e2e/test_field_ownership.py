"""Who owns which field, as the API server records it (managedFields), with real processes.

The agent creates its MacNode without a spec, so a GitOps tool can own the spec by server-side
apply with no conflict, and the controller honours what it applied. Each process writes under its
own field manager (orchardist-controller, -agent, -gateway), never the client library's default.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev.cluster import Cluster
from orchardist.dev.procs import free_port
from orchardist.oci.push import push
from orchardist_agent.engines import Runtime
from tests.fixtures.agents import (
    ORCHARDIST,
    Agent,
    Operator,
    condition,
    kget,
    make_agent,
    registered,
    stop_process,
    stop_recorded_engines,
)
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry]

SYSTEM = "orchardist-system"
CONTROLLER, AGENT, GATEWAY = "orchardist-controller", "orchardist-agent", "orchardist-gateway"
TOKEN = "sk-ownership-test"
LIBRARY_DEFAULT = "OpenAPI-Generator"


@pytest.fixture(scope="session")
async def tiny_tag(registry: str, tiny_model: Path) -> str:
    await push(tiny_model, f"{registry}/ownership/tiny:v1")
    return f"oci://{registry}/ownership/tiny:v1"


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Operator]:
    cluster.kubectl("create", "namespace", SYSTEM, check=False)
    op = Operator.spawn(cluster, "--namespace", namespace, "--standalone", "--resync", "1")
    try:
        op.wait_started(60)
        yield op
    finally:
        op.stop()
        print("\n".join(op.lines[-60:]))  # shown by pytest only when the test failed


def start_agent(cluster: Cluster, workdir: Path, *extra: str) -> Agent:
    return make_agent(cluster, workdir, extra=extra).start()


def forget(cluster: Cluster, agent: Agent) -> None:
    agent.stop()
    stop_recorded_engines(agent.workdir / "state")  # engines outlive their agent by design
    cluster.kubectl("delete", "macnode", agent.node, "--ignore-not-found", "--wait=false", check=False)
    cluster.kubectl("delete", "lease", agent.node, "-n", SYSTEM, "--ignore-not-found", check=False)


def full(cluster: Cluster, *args: str) -> Any:
    """`kubectl get -o json` with managedFields (kubectl leaves them out unless asked)."""
    return kget(cluster, *args, "--show-managed-fields")


def managers(obj: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """managedFields by manager: each entry's operation, subresource and fields."""
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in obj["metadata"].get("managedFields") or []:
        out.setdefault(entry["manager"], []).append(entry)
    return out


def owns(entries: list[dict[str, Any]], top: str) -> bool:
    """Whether any of these entries owns a field under ``top`` (e.g. "f:spec")."""
    return any(top in (e.get("fieldsV1") or {}) for e in entries)


def apply_macnode(cluster: Cluster, node: str, spec: dict[str, Any], labels: dict[str, str]) -> None:
    """What a GitOps tool does: server-side apply of the MacNode under its own field manager."""
    doc = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "MacNode",
        "metadata": {"name": node, "labels": labels},
        "spec": spec,
    }
    cluster.kubectl("apply", "--server-side", "--field-manager=argocd", "-f", "-", input=json.dumps(doc))


def deploy(cluster: Cluster, namespace: str, name: str, tag: str) -> None:
    doc = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": tag,
            "engine": "mlx-lm",
            "replicas": 1,
            "contextLength": 1024,
            "maxConcurrentSequences": 2,
            "placement": {"nodeSelector": {"test": namespace}},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def rows(cluster: Cluster, node: str) -> dict[str, str]:
    """`kubectl get mn <node>` as printed: header -> cell (columns are split on runs of spaces)."""
    header, line = cluster.kubectl("get", "mn", node).stdout.splitlines()
    starts = [i for i in range(len(header)) if header[i] != " " and (i == 0 or header[i - 2 : i] == "  ")]
    ends = [*starts[1:], None]
    return {header[s:e].strip(): line[s:e].strip() for s, e in zip(starts, ends, strict=True)}


async def test_gitops_owns_the_macnode_spec_the_agent_created_and_the_controller_honours_it(
    cluster: Cluster, namespace: str, tmp_path: Path, operator: Operator, tiny_tag: str
) -> None:
    """A server-side apply of spec.unschedulable and a taint by another manager does not conflict
    with the agent; `kubectl get mn` shows both; the controller places nothing on the cordoned Mac
    until the same manager uncordons it and drops the taint."""
    agent = start_agent(cluster, tmp_path / "agent")
    try:
        node = registered(cluster, agent)
        assert "spec" not in node or not node["spec"], node.get("spec")  # created without one
        row = rows(cluster, agent.node)
        assert (row["CORDONED"], row["TAINTS"]) == ("", ""), row  # a missing field prints blank

        taint = {"key": "example.com/maintenance", "value": "disk", "effect": "NoSchedule"}
        apply_macnode(cluster, agent.node, {"unschedulable": True, "taints": [taint]}, {"test": namespace})
        got = full(cluster, "macnode", agent.node)
        by = managers(got)
        assert by["argocd"][0]["fieldsV1"]["f:spec"] == {
            "f:unschedulable": {},
            "f:taints": {
                'k:{"effect":"NoSchedule","key":"example.com/maintenance"}': {
                    ".": {},
                    "f:effect": {},
                    "f:key": {},
                    "f:value": {},
                }
            },
        }
        assert not owns(by[AGENT], "f:spec"), by[AGENT]
        row = rows(cluster, agent.node)
        assert (row["CORDONED"], row["TAINTS"]) == ("true", "example.com/maintenance"), row

        deploy(cluster, namespace, "held", tiny_tag)

        def unschedulable() -> dict[str, Any] | None:
            md = kget(cluster, "md", "held", "-n", namespace)
            stalled = condition(md.get("status") or {}, "Stalled")
            return stalled if stalled.get("reason") == "Unschedulable" else None

        stalled = wait_for(
            unschedulable,
            timeout=60,
            message="Stalled=Unschedulable while the only matching Mac is cordoned",
        )
        assert "1 unschedulable" in stalled["message"], stalled
        assert kget(cluster, "mr", "-n", namespace)["items"] == []

        apply_macnode(cluster, agent.node, {}, {"test": namespace})  # the manager gives both up
        assert not (kget(cluster, "macnode", agent.node).get("spec") or {})
        placed = wait_for(
            lambda: kget(cluster, "mr", "-n", namespace)["items"],
            timeout=60,
            message="a replica once the Mac is uncordoned",
        )
        assert [r["spec"]["nodeName"] for r in placed] == [agent.node]
        assert rows(cluster, agent.node)["CORDONED"] == ""
    finally:
        forget(cluster, agent)


def start_gateway(cluster: Cluster, namespace: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A gateway taking the key Secret of ``namespace`` (made here); its process and port."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "k", "namespace": namespace, "labels": {"orchardist.io/gateway-key": "true"}},
        "stringData": {"key": TOKEN, "namespaces": namespace},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))
    port = free_port()
    argv = [str(ORCHARDIST), "gateway", "--kubeconfig", str(cluster.kubeconfig), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--key-namespace", namespace, "--instance", f"gw-{namespace}"]
    with (workdir / "gateway.log").open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT), port


def chat_through(port: int, model: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


@pytest.mark.engine
async def test_managed_fields_name_the_operator_the_agent_and_the_gateway(
    cluster: Cluster, namespace: str, tmp_path: Path, operator: Operator, tiny_tag: str, mlx_runtime: Runtime
) -> None:
    """After a deployment is Ready on a real agent and served through a gateway: the controller owns
    no spec of the ModelDeployment, the agent no spec of its MacNode; the controller owns the
    replica's spec and the agent its status; the gateway its demand Lease; no write anywhere is
    named after the client library."""
    agent = start_agent(cluster, tmp_path / "agent", "--runtime", f"mlx-lm={mlx_runtime.prefix}")
    try:
        registered(cluster, agent)
        cluster.kubectl("label", "macnode", agent.node, f"test={namespace}")
        deploy(cluster, namespace, "tiny", tiny_tag)
        try:
            cluster.kubectl("wait", "--for=condition=Ready", "md/tiny", "-n", namespace, "--timeout=240s")
        except Exception as exc:
            raise AssertionError(f"{exc}\nagent:\n{agent.tail(40)}") from None

        gateway, port = start_gateway(cluster, namespace, tmp_path)
        try:
            answer = wait_for(
                lambda: chat_through(port, "tiny"),
                timeout=60,
                interval=0.5,
                message=lambda: (
                    "an answer through the gateway:\n"
                    + (tmp_path / "gateway.log").read_text(errors="replace")[-2000:]
                ),
            )
            assert answer["choices"], answer
            (demand,) = wait_for(  # read while the gateway runs: it deletes its Leases on SIGTERM
                lambda: full(cluster, "lease", "-n", namespace, "-l", "orchardist.io/demand-for=tiny")[
                    "items"
                ],
                timeout=30,
                message="the gateway's demand Lease",
            )
        finally:
            stop_process(gateway)

        md = managers(full(cluster, "md", "tiny", "-n", namespace))
        assert not owns(md[CONTROLLER], "f:spec"), md[CONTROLLER]
        assert owns(md[CONTROLLER], "f:status"), md[CONTROLLER]

        mn = managers(full(cluster, "macnode", agent.node))
        assert not owns(mn[AGENT], "f:spec"), mn[AGENT]
        assert {e.get("subresource") for e in mn[AGENT] if owns([e], "f:status")} == {"status"}

        (replica,) = full(cluster, "mr", "-n", namespace)["items"]
        mr = managers(replica)
        assert owns(mr[CONTROLLER], "f:spec") and not owns(mr[CONTROLLER], "f:status"), mr[CONTROLLER]
        assert owns(mr[AGENT], "f:status") and not owns(mr[AGENT], "f:spec"), mr[AGENT]

        everything = [
            *full(cluster, "md,mr,svc,endpointslices,events,leases", "-n", namespace)["items"],
            full(cluster, "macnode", agent.node),
            full(cluster, "lease", agent.node, "-n", SYSTEM),
            demand,
        ]
        named = {(o["kind"], m) for o in everything for m in managers(o)}
        assert not {n for n in named if n[1].startswith(LIBRARY_DEFAULT)}, sorted(named)
        assert {("Lease", AGENT), ("Lease", GATEWAY), ("Service", CONTROLLER)} <= named, sorted(named)
    finally:
        forget(cluster, agent)
