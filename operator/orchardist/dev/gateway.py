"""The gateway of the local demo: a demo key Secret and one ``orchardist gateway`` process.

The demo calls :func:`start_gateway` after the operator and the agent are up; the process is
recorded with the demo's others, so ``orchardist dev down`` stops it too.
"""

from __future__ import annotations

import base64
import json
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from orchardist.dev import procs
from orchardist.dev.cluster import Cluster

KEY_SECRET = "demo-key"
KEY_NAMESPACE = "orchardist-system"


def key_secret(
    token: str, namespaces: Sequence[str], name: str = KEY_SECRET, namespace: str = KEY_NAMESPACE
) -> dict[str, object]:
    """A key Secret as the gateway reads it (label ``orchardist.io/gateway-key=true``)."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"orchardist.io/gateway-key": "true"}},
        "type": "Opaque",
        "data": {"key": b64(token), "namespaces": b64(",".join(namespaces))},
    }


def start_gateway(
    cluster: Cluster,
    demo_dir: Path,
    *,
    namespaces: Sequence[str] = ("default",),
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 60.0,
) -> tuple[str, str]:
    """Create a demo key for ``namespaces``, start the gateway, wait until it is ready: (url, key)."""
    token = f"orch-{secrets.token_urlsafe(24)}"
    cluster.kubectl("create", "namespace", KEY_NAMESPACE, check=False)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(key_secret(token, namespaces)))
    port = port or procs.free_port(host)
    record = procs.start(
        "gateway",
        [
            sys.executable,
            "-m",
            "orchardist",
            "gateway",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--host",
            host,
            "--port",
            str(port),
            "--key-namespace",
            KEY_NAMESPACE,
            "--instance",
            "demo-gateway",
        ],
        demo_dir / "logs" / "gateway.log",
        env=cluster.env(),
    )
    procs.save([record], demo_dir / "pids")
    url = f"http://{host}:{port}"
    procs.wait_http(f"{url}/readyz", timeout=timeout, proc=record)
    return url, token
