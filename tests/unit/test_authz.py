"""The agents' authorization webhook, decided purely: an agent lists and watches only its own
node's replicas and reads only its own MacNode and Lease; nobody else gets an opinion."""

from __future__ import annotations

from typing import Any

import pytest

from orchardist.controller.authz import DEFAULT_PREFIX, answer, decide

A = DEFAULT_PREFIX + "mac-a"


def review(
    user: str,
    verb: str,
    resource: str,
    *,
    group: str = "orchardist.io",
    name: str = "",
    sub: str = "",
    selector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "group": group,
        "resource": resource,
        "verb": verb,
        "name": name,
        "subresource": sub,
    }
    if selector is not None:
        attrs["fieldSelector"] = selector
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": user, "resourceAttributes": attrs}}  # fmt: skip


def node_is(*values: str, op: str = "In") -> dict[str, Any]:
    return {"requirements": [{"key": "spec.nodeName", "operator": op, "values": list(values)}]}


OWN_ONLY = (
    "orchardist agent mac-a may {verb} only the ModelReplicas bound to its own node: "
    "use the field selector spec.nodeName=mac-a"
)
LIST, OTHER_NODE = (
    OWN_ONLY.format(verb="list"),
    "orchardist agent mac-a may read only its own MacNode, not MacNode mac-b",
)


@pytest.mark.parametrize(
    ("req", "denied", "reason"),
    [
        (review(A, "list", "modelreplicas", selector=node_is("mac-a")), False, ""),
        (review(A, "watch", "modelreplicas", selector=node_is("mac-a")), False, ""),
        (review(A, "list", "modelreplicas"), True, LIST),
        (review(A, "watch", "modelreplicas"), True, OWN_ONLY.format(verb="watch")),
        (review(A, "list", "modelreplicas", selector=node_is("mac-b")), True, LIST),
        (review(A, "list", "modelreplicas", selector=node_is("mac-a", "mac-b")), True, LIST),
        (review(A, "list", "modelreplicas", selector=node_is("mac-a", op="NotIn")), True, LIST),
        (review(A, "list", "modelreplicas", selector={"rawSelector": "spec.nodeName=mac-a"}), True,
         OWN_ONLY.format(verb="list")),
        (review(A, "list", "modelreplicas", selector={"requirements": [
            {"key": "metadata.namespace", "operator": "In", "values": ["x"]},
            {"key": "spec.nodeName", "operator": "In", "values": ["mac-a"]}]}), False, ""),
        (review(A, "get", "macnodes", name="mac-a"), False, ""),
        (review(A, "get", "macnodes", name="mac-b"), True, OTHER_NODE),
        (review(A, "get", "macnodes", name="mac-b", sub="status"), True,
         "orchardist agent mac-a may read only its own MacNode, not MacNode mac-b"),
        (review(A, "get", "leases", group="coordination.k8s.io", name="mac-b"), True,
         "orchardist agent mac-a may read only its own Lease, not Lease mac-b"),
        (review(A, "get", "leases", group="coordination.k8s.io", name="mac-a"), False, ""),
        (review(A, "get", "secrets", group=""), False, ""),  # RBAC decides (the projection's Role)
        (review("admin", "list", "modelreplicas"), False, ""),
        (review(DEFAULT_PREFIX.replace("agent", "operator") + "x", "list", "modelreplicas"), False, ""),
    ],
)  # fmt: skip
def test_decide(req: dict[str, Any], denied: bool, reason: str) -> None:
    verdict = decide(req)
    assert (verdict.denied, verdict.reason) == (denied, reason)


def test_a_non_resource_request_gets_no_opinion() -> None:
    assert not decide(
        {"spec": {"user": A, "nonResourceAttributes": {"path": "/healthz", "verb": "get"}}}
    ).denied


def test_answer_never_allows_only_denies_or_passes() -> None:
    """Every grant still comes from RBAC: the webhook's answer is never allowed=true."""
    refused = answer(review(A, "list", "modelreplicas"))
    assert refused["status"] == {"allowed": False, "denied": True, "reason": OWN_ONLY.format(verb="list")}
    assert refused["kind"] == "SubjectAccessReview" and refused["apiVersion"] == "authorization.k8s.io/v1"
    assert answer(review(A, "list", "modelreplicas", selector=node_is("mac-a")))["status"] == {
        "allowed": False
    }
