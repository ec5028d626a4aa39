"""The Kubernetes API adapter shared by the controller, the agent and the dev tools.

Only connection set-up lives here: where credentials come from (an explicit kubeconfig, then
``$KUBECONFIG``/``~/.kube/config``, then the in-cluster service account). Callers use the official
client's typed APIs on the returned ``ApiClient``; blocking calls from async code go through
``asyncio.to_thread``.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

GROUP = "orchardist.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SYSTEM_NAMESPACE = "orchardist-system"


def api_client(kubeconfig: str | Path | None = None, context: str | None = None) -> client.ApiClient:
    """An ApiClient for the given kubeconfig, else the usual kubeconfig, else in-cluster."""
    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG")
    if path or Path("~/.kube/config").expanduser().exists():
        cfg = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, context=context, client_configuration=cfg
        )
        return client.ApiClient(cfg)
    try:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise ConfigException(
            "no Kubernetes credentials: pass --kubeconfig, set KUBECONFIG, or run inside a cluster"
        ) from exc
    return client.ApiClient(cfg)
