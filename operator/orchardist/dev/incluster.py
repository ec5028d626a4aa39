"""`orchardist dev up --in-cluster`: the operator runs as a Pod from the Helm chart on a real node,
and clients reach a deployment through its Service's ClusterIP (kube-proxy's rules), not the Mac's
address. The node itself is :mod:`orchardist.dev.node`; this module is what the demo asks of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchardist.dev import node as node_mod
from orchardist.dev import nodeconf
from orchardist.dev.cluster import Cluster, repo_root


@dataclass(frozen=True)
class InCluster:
    node: node_mod.Node
    image: str
    operator_pod: str
    seconds: dict[str, float]


CA_CONFIGMAP = "orchardist-registry-ca"
CA_DIR = "/etc/orchardist/registry-ca"


def registry_ca_values(cluster: Cluster, ca: Path) -> dict[str, Any]:
    """Chart values that trust a registry's own CA: a ConfigMap holding it, mounted read-only, and
    SSL_CERT_FILE pointing there (the operator reads model manifests to resolve digests)."""
    cluster.kubectl("create", "namespace", node_mod.RELEASE_NAMESPACE, check=False)
    made = cluster.kubectl(
        "create",
        "configmap",
        CA_CONFIGMAP,
        "-n",
        node_mod.RELEASE_NAMESPACE,
        f"--from-file=ca.crt={ca}",
        "--dry-run=client",
        "-o",
        "json",
    )
    cluster.kubectl("apply", "-f", "-", input=made.stdout)
    return {
        "operator": {
            "env": [{"name": "SSL_CERT_FILE", "value": f"{CA_DIR}/ca.crt"}],
            "extraVolumes": [{"name": "registry-ca", "configMap": {"name": CA_CONFIGMAP}}],
            "extraVolumeMounts": [{"name": "registry-ca", "mountPath": CA_DIR, "readOnly": True}],
        }
    }


def run_operator(
    cluster: Cluster, *, registry_ca: Path | None = None, note: Callable[[str], None] = print
) -> InCluster:
    """Start the node, push the operator image (built or reused by ``hack/build-image.sh``) to its
    registry, install the chart with it and wait until the operator Pod is Running and Ready.
    ``registry_ca``: the CA of the registry models come from, when it has its own."""
    root = repo_root()
    if root is None:
        raise node_mod.NodeError("--in-cluster needs an Orchardist checkout (hack/, charts/)")
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    bins = node_mod.node_bins(root)
    node = node_mod.Node.start(cluster, bin_dir=bins)
    seconds["node"] = node.ready_seconds
    name, pods = nodeconf.NODE_NAME, node.layout.pod_subnet
    note(f"node {name} Ready in {node.ready_seconds:.1f} s (pods on {pods})")
    try:
        t1 = time.monotonic()
        image = node.push_operator(node_mod.operator_layout(root))
        seconds["image"] = time.monotonic() - t1
        note(f"operator image {image}")
        t2 = time.monotonic()
        values = registry_ca_values(cluster, registry_ca) if registry_ca is not None else None
        pod = node.install_operator(image, values=values)
        seconds["install"] = time.monotonic() - t2
    except BaseException:
        node.stop()
        raise
    note(f"helm chart installed; operator pod {pod} Running and Ready ({time.monotonic() - t0:.0f} s in all)")
    return InCluster(node, image, pod, seconds)


def service_address(cluster: Cluster, namespace: str, name: str) -> str:
    """``<ClusterIP>:<port>`` of a Service."""
    out = cluster.kubectl("get", "service", name, "-n", namespace, "-o", "json")
    spec = json.loads(out.stdout)["spec"]
    return f"{spec['clusterIP']}:{spec['ports'][0]['port']}"


_CHAT = (
    "import json, sys, urllib.request as u\n"
    "msg = {'role': 'user', 'content': 'Hello, orchard.'}\n"
    "body = json.dumps({'messages': [msg], 'max_tokens': 8}).encode()\n"
    "req = u.Request(sys.argv[1], data=body, headers={'Content-Type': 'application/json'})\n"
    "r = u.urlopen(req, timeout=60)\n"
    "answer = json.loads(r.read())['choices'][0]['message']['content']\n"
    "print(json.dumps({'status': r.status, 'answer': answer}))\n"
)


def chat(address: str, wrap: Callable[[Sequence[str]], list[str]] | None = None) -> dict[str, object]:
    """POST a chat completion to ``http://<address>`` from a process (in a network namespace when
    ``wrap`` puts it there); returns ``{"status", "answer"}`` or raises with the client's stderr."""
    argv = [sys.executable, "-c", _CHAT, f"http://{address}/v1/chat/completions"]
    out = subprocess.run(wrap(argv) if wrap else argv, capture_output=True, text=True, timeout=90)
    if out.returncode != 0:
        raise node_mod.NodeError(f"chat through {address} failed: {out.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(out.stdout)
    return result
