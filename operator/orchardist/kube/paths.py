"""URL paths of every kind the project touches: the one place that spells them.

Names are URL-quoted (a name is checked by the API server, but a path is built before that).
``status=True`` addresses the status subresource. A namespace of ``None`` means all namespaces
(list and watch only).
"""

from __future__ import annotations

from urllib.parse import quote

from orchardist.api.constants import GROUP, VERSION

_OURS = f"/apis/{GROUP}/{VERSION}"


def _join(base: str, name: str, status: bool) -> str:
    if status and not name:
        raise ValueError("a status subresource needs an object name")
    path = f"{base}/{quote(name, safe='')}" if name else base
    return f"{path}/status" if status else path


def _namespaced(group_version: str, plural: str, namespace: str | None, name: str, status: bool) -> str:
    if namespace is None and name:
        raise ValueError(f"a named {plural} object needs a namespace")
    base = (
        f"{group_version}/namespaces/{quote(namespace, safe='')}/{plural}"
        if namespace
        else f"{group_version}/{plural}"
    )
    return _join(base, name, status)


def macnode(name: str = "", *, status: bool = False) -> str:
    return _join(f"{_OURS}/macnodes", name, status)


def modeldeployment(namespace: str | None = None, name: str = "", *, status: bool = False) -> str:
    return _namespaced(_OURS, "modeldeployments", namespace, name, status)


def modelreplica(namespace: str | None = None, name: str = "", *, status: bool = False) -> str:
    return _namespaced(_OURS, "modelreplicas", namespace, name, status)


def lease(namespace: str, name: str = "") -> str:
    return _namespaced("/apis/coordination.k8s.io/v1", "leases", namespace, name, False)


def secret(namespace: str | None, name: str = "") -> str:
    return _namespaced("/api/v1", "secrets", namespace, name, False)


def role(namespace: str, name: str = "") -> str:
    return _namespaced("/apis/rbac.authorization.k8s.io/v1", "roles", namespace, name, False)


def rolebinding(namespace: str, name: str = "") -> str:
    return _namespaced("/apis/rbac.authorization.k8s.io/v1", "rolebindings", namespace, name, False)


def service(namespace: str, name: str = "") -> str:
    return _namespaced("/api/v1", "services", namespace, name, False)


def endpointslice(namespace: str, name: str = "") -> str:
    return _namespaced("/apis/discovery.k8s.io/v1", "endpointslices", namespace, name, False)


def event(namespace: str, name: str = "") -> str:
    return _namespaced("/api/v1", "events", namespace, name, False)


def namespace(name: str = "") -> str:
    return _join("/api/v1/namespaces", name, False)


def customresourcedefinition(name: str = "") -> str:
    return _join("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", name, False)


def kopfpeering(namespace: str | None = None, name: str = "") -> str:
    """kopf's peering objects: namespaced ``KopfPeering``, or ``ClusterKopfPeering`` without a namespace."""
    if namespace is None:
        return _join("/apis/kopf.dev/v1/clusterkopfpeerings", name, False)
    return _namespaced("/apis/kopf.dev/v1", "kopfpeerings", namespace, name, False)


def serviceaccount(namespace: str, name: str = "") -> str:
    return _namespaced("/api/v1", "serviceaccounts", namespace, name, False)


def serviceaccount_token(namespace: str, name: str) -> str:
    """The TokenRequest subresource: a token for ServiceAccount ``name`` (audience and lifetime asked)."""
    return f"{serviceaccount(namespace, name)}/token"


def tokenreview() -> str:
    """TokenReview (cluster-scoped, create only): whether the API server accepts a token, and whose."""
    return "/apis/authentication.k8s.io/v1/tokenreviews"


def selfsubjectreview() -> str:
    """SelfSubjectReview (create only): who the caller's own credentials say it is."""
    return "/apis/authentication.k8s.io/v1/selfsubjectreviews"
