"""``orchardist plan --node``: a registered Mac and the replicas bound to it, read from Kubernetes.

Two GETs through the shared adapter (``orchardist.kube``), parsed with the API types; what they
mean for the plan is decided by ``planning.capacity``.
"""

from __future__ import annotations

from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from orchardist.api import MacNode, ModelReplica
from orchardist.kube import RawApi, api_client, paths
from orchardist.plancmd import InputError

#: Seconds to wait for the API server on each call: a person is waiting at a prompt.
TIMEOUT = 10.0


def read_node(name: str, kubeconfig: str | None) -> tuple[MacNode, list[ModelReplica]]:
    """The MacNode ``name`` and every ModelReplica bound to it, in any namespace."""
    try:
        api = RawApi(api_client(kubeconfig), timeout=TIMEOUT)
        body = api.get(paths.macnode(name))
        listed = api.get(paths.modelreplica(), fieldSelector=f"spec.nodeName={name}")
    except ApiException as exc:
        if exc.status == 404:
            raise InputError(f"no MacNode {name!r} in the cluster (kubectl get macnodes)") from None
        raise InputError(f"reading MacNode {name!r}: HTTP {exc.status} {exc.reason}") from None
    except (ConfigException, HTTPError, OSError) as exc:
        raise InputError(f"--node {name}: cannot reach the cluster: {exc}") from None
    try:
        node = MacNode.model_validate(body)
        replicas = [ModelReplica.model_validate(item) for item in listed.get("items") or ()]
    except ValidationError as exc:
        raise InputError(f"MacNode {name!r} or one of its replicas does not parse: {exc}") from None
    return node, replicas
