"""Every URL path the project sends, spelled in one table."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orchardist.kube import paths

OURS = "/apis/orchardist.io/v1alpha1"


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (lambda: paths.macnode(), f"{OURS}/macnodes"),
        (lambda: paths.macnode("mac-1"), f"{OURS}/macnodes/mac-1"),
        (lambda: paths.macnode("mac-1", status=True), f"{OURS}/macnodes/mac-1/status"),
        (lambda: paths.modelreplica(), f"{OURS}/modelreplicas"),
        (lambda: paths.modelreplica("team"), f"{OURS}/namespaces/team/modelreplicas"),
        (lambda: paths.modelreplica("team", "r-1"), f"{OURS}/namespaces/team/modelreplicas/r-1"),
        (
            lambda: paths.modelreplica("team", "r-1", status=True),
            f"{OURS}/namespaces/team/modelreplicas/r-1/status",
        ),
        (lambda: paths.modeldeployment("team"), f"{OURS}/namespaces/team/modeldeployments"),
        (
            lambda: paths.modeldeployment("team", "qwen", status=True),
            f"{OURS}/namespaces/team/modeldeployments/qwen/status",
        ),
        (
            lambda: paths.lease("orchardist-system", "mac-1"),
            "/apis/coordination.k8s.io/v1/namespaces/orchardist-system/leases/mac-1",
        ),
        (lambda: paths.secret("team", "pull"), "/api/v1/namespaces/team/secrets/pull"),
        (lambda: paths.secret(None), "/api/v1/secrets"),
        (
            lambda: paths.role("orchardist-node-mac-1", "reader"),
            "/apis/rbac.authorization.k8s.io/v1/namespaces/orchardist-node-mac-1/roles/reader",
        ),
        (
            lambda: paths.rolebinding("orchardist-node-mac-1"),
            "/apis/rbac.authorization.k8s.io/v1/namespaces/orchardist-node-mac-1/rolebindings",
        ),
        (lambda: paths.service("team"), "/api/v1/namespaces/team/services"),
        (
            lambda: paths.endpointslice("team", "qwen-x"),
            "/apis/discovery.k8s.io/v1/namespaces/team/endpointslices/qwen-x",
        ),
        (lambda: paths.event("team"), "/api/v1/namespaces/team/events"),
        (lambda: paths.namespace(), "/api/v1/namespaces"),
        (lambda: paths.namespace("team"), "/api/v1/namespaces/team"),
        (
            lambda: paths.serviceaccount("default", "default"),
            "/api/v1/namespaces/default/serviceaccounts/default",
        ),
        (
            lambda: paths.customresourcedefinition("macnodes.orchardist.io"),
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/macnodes.orchardist.io",
        ),
        (lambda: paths.kopfpeering(), "/apis/kopf.dev/v1/clusterkopfpeerings"),
        (lambda: paths.kopfpeering("team", "p"), "/apis/kopf.dev/v1/namespaces/team/kopfpeerings/p"),
        # A name is quoted: a path is built before the API server checks the name.
        (lambda: paths.secret("team", "a/b c"), "/api/v1/namespaces/team/secrets/a%2Fb%20c"),
    ],
)
def test_path(built: Callable[[], str], expected: str) -> None:
    assert built() == expected


@pytest.mark.parametrize(
    ("built", "error"),
    [
        (lambda: paths.macnode(status=True), "a status subresource needs an object name"),
        (lambda: paths.modelreplica(None, "r-1"), "a named modelreplicas object needs a namespace"),
    ],
)
def test_paths_that_cannot_address_anything_are_refused(built: Callable[[], str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        built()
