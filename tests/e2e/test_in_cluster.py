"""The in-cluster path for real: `orchardist dev up --in-cluster --demo` builds (or reuses) the operator
image, starts a kubelet node (containerd, CNI bridge, kube-proxy), installs the chart with that image
and serves the quickstart model from a simulated Mac in its own network namespace.

Then: the operator Pod is Running and Ready from the chart, the deployment Ready and not Degraded, a
client Pod on the node chats through the Service's ClusterIP, the operator's container killed is
restarted by the kubelet while the deployment stays Ready (and the restarted operator still acts),
and the operator's ServiceAccount is refused what its RBAC does not grant. Needs root and network
namespaces; it fails, not skips, without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev import node as node_mod
from orchardist.dev import nodeconf
from orchardist.dev.cluster import Cluster
from tests.fixtures.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
NS = node_mod.RELEASE_NAMESPACE
SA = f"system:serviceaccount:{NS}:orchardist-operator"
DEPLOYMENT = "quickstart"

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """`dev up --in-cluster --demo` in a state dir of its own, on a free /24 of the test pool."""
    lack = node_mod.missing(node_mod.node_bins(REPO))
    assert not lack, f"this machine cannot run the dev node: missing {lack}"
    from orchardist.dev import netns

    state = tmp_path_factory.mktemp("incluster") / "state"
    env = dict(os.environ)
    env[netns.SUBNET_ENV] = str(netns.pick_subnet(netns.routes(), start=os.getpid() % 200))
    cmd = [sys.executable, "-m", "orchardist", "dev"]
    t0 = time.monotonic()
    out = subprocess.run(
        [*cmd, "up", "--in-cluster", "--demo", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        cwd=REPO,
    )
    try:
        assert out.returncode == 0, f"dev up failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        print(f"dev up --in-cluster --demo took {time.monotonic() - t0:.0f} s")
        cluster = Cluster.load(state)
        assert cluster is not None
        yield cluster
    finally:
        down = subprocess.run(
            [*cmd, "down", "--state-dir", str(state)], capture_output=True, text=True, env=env
        )
        assert down.returncode == 0, down.stderr
        assert (
            node_mod.tag_for(state)
            not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
        ), "dev down left the pod bridge"


def _get(cluster: Cluster, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return out


def _operator_pod(cluster: Cluster) -> dict[str, Any]:
    pods = _get(cluster, "pods", "-n", NS, "-l", "app.kubernetes.io/component=operator")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, [p["metadata"]["name"] for p in pods]
    pod: dict[str, Any] = live[0]
    return pod


def _ready(obj: dict[str, Any]) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _degraded(md: dict[str, Any]) -> list[dict[str, Any]]:
    conds = (md.get("status") or {}).get("conditions") or []
    return [c for c in conds if c["type"] == "Degraded" and c["status"] == "True"]


def test_operator_runs_from_the_chart_with_the_local_image(up: Cluster) -> None:
    pod = _operator_pod(up)
    assert pod["status"]["phase"] == "Running" and _ready(pod)
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "orchardist-operator"
    assert not spec.get("hostNetwork"), "a pod on the pod network, reaching the API through its Service"
    [container] = spec["containers"]
    assert container["image"].split("/", 1)[0].startswith("127.0.0.1:"), "the node's own registry"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert ip_address(pod["status"]["podIP"]) in nodeconf.pod_subnet()


def test_deployment_ready_not_degraded_with_real_addresses(up: Cluster) -> None:
    md = _get(up, "modeldeployment", DEPLOYMENT)
    assert _ready(md), md.get("status")
    assert not _degraded(md), _degraded(md)
    slices = _get(up, "endpointslices", "-l", f"kubernetes.io/service-name={DEPLOYMENT}")["items"]
    addresses = [a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]]
    assert addresses and not any(a.startswith("127.") for a in addresses), addresses


_CHAT = (
    "import json, sys, urllib.request as u\n"
    "body = json.dumps({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 4}).encode()\n"
    "req = u.Request(sys.argv[1], data=body, headers={'Content-Type': 'application/json'})\n"
    "r = u.urlopen(req, timeout=60)\n"
    "reply = json.loads(r.read())\n"
    "result = json.dumps({'status': r.status, 'object': reply['object']})\n"
    "open('/dev/termination-log', 'w').write(result)\n"
)


def _chat_from_pod(cluster: Cluster, name: str, url: str, image: str) -> dict[str, Any]:
    """A client Pod (the operator's image: it has Python) POSTs to ``url``; its result comes back in
    the container's termination message."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "chat",
                    "image": image,
                    "command": ["python3", "-c", _CHAT, url],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))

    def done() -> dict[str, Any] | None:
        got = _get(cluster, "pod", name, "-n", "default")
        phase = got["status"].get("phase")
        assert phase != "Failed", got["status"]
        return got if phase == "Succeeded" else None

    finished = wait_for(done, timeout=120, interval=0.5, message=f"client pod {name} finished")
    [state] = finished["status"]["containerStatuses"]
    result: dict[str, Any] = json.loads(state["state"]["terminated"]["message"])
    return result


def test_client_pod_chats_through_the_service_cluster_ip(up: Cluster) -> None:
    svc = _get(up, "service", DEPLOYMENT)
    address = f"{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"
    image = _operator_pod(up)["spec"]["containers"][0]["image"]
    result = _chat_from_pod(up, "chat-client", f"http://{address}/v1/chat/completions", image)
    assert result == {"status": 200, "object": "chat.completion"}


def test_operator_killed_is_restarted_by_the_kubelet_and_the_deployment_stays_ready(up: Cluster) -> None:
    pod = _operator_pod(up)
    name = pod["metadata"]["name"]
    [cs] = pod["status"]["containerStatuses"]
    before = int(cs["restartCount"])
    container_id = cs["containerID"].removeprefix("containerd://")
    layout = nodeconf.NodeLayout(node_mod.tag_for(up.state_dir), up.state_dir / "node")
    ctr = ["ctr", "--address", str(layout.containerd_socket), "-n", nodeconf.CRI_NAMESPACE]
    subprocess.run([*ctr, "tasks", "kill", "-s", "SIGKILL", container_id], check=True, timeout=30)
    not_ready_seen: list[object] = []

    def restarted_and_ready() -> bool:
        md = _get(up, "modeldeployment", DEPLOYMENT)
        if not _ready(md) or _degraded(md):
            not_ready_seen.append(md.get("status"))
        now = _get(up, "pod", name, "-n", NS)
        [st] = now["status"]["containerStatuses"]
        return int(st["restartCount"]) > before and _ready(now)

    wait_for(restarted_and_ready, timeout=180, interval=0.5, message="operator container restarted and Ready")
    assert _operator_pod(up)["metadata"]["name"] == name, "the same Pod, restarted in place by the kubelet"
    assert not not_ready_seen, not_ready_seen[:1]

    # The restarted operator acts: the Service it owns, deleted, comes back.
    up.kubectl("delete", "service", DEPLOYMENT, "--wait=true")
    wait_for(
        lambda: up.kubectl("get", "service", DEPLOYMENT, check=False).returncode == 0,
        timeout=90,
        interval=0.5,
        message="the restarted operator recreated the deployment's Service",
    )
    assert _ready(_get(up, "modeldeployment", DEPLOYMENT))


REFUSED = [
    ("create", "pods"),
    ("get", "configmaps"),
    ("delete", "nodes"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("delete", "modeldeployments.orchardist.io"),
    ("update", "macnodes.orchardist.io"),
    ("patch", "leases.coordination.k8s.io"),
    ("escalate", "roles.rbac.authorization.k8s.io"),
]
GRANTED = [
    ("list", "modeldeployments.orchardist.io"),
    ("patch", "modeldeployments.orchardist.io/status"),
    ("create", "endpointslices.discovery.k8s.io"),
    ("watch", "macnodes.orchardist.io"),
]


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"), [(*r, False) for r in REFUSED] + [(*g, True) for g in GRANTED]
)
def test_operator_service_account_holds_only_its_grants(
    up: Cluster, verb: str, resource: str, allowed: bool
) -> None:
    out = up.kubectl("auth", "can-i", verb, resource, "-A", f"--as={SA}", check=False)
    assert out.stdout.strip() == ("yes" if allowed else "no"), (verb, resource, out.stdout, out.stderr)


def test_operator_was_never_forbidden_while_running(up: Cluster) -> None:
    """Least privilege proven by running: the Pod served the deployment with its ServiceAccount
    alone, and its log has no refused call."""
    pod = _operator_pod(up)
    logs = up.state_dir / "node" / "pod-logs"
    files = list(logs.glob(f"{NS}_{pod['metadata']['name']}_*/operator/*.log"))
    assert files, f"no operator log under {logs}"
    text = "\n".join(f.read_text(errors="replace") for f in files)
    assert '"event": "reconciled"' in text, text[-2000:]
    assert "Forbidden" not in text and " 403" not in text, [ln for ln in text.splitlines() if "403" in ln][:3]
