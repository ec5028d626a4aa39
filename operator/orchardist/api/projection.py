"""Names of the per-Mac Secret projection, shared by the controller (writer) and the agent (reader).

An agent may read only the Secrets its own replicas reference. RBAC can grant ``get`` on named
Secrets in one namespace, so the controller copies each referenced Secret into a namespace per Mac
(:func:`node_namespace`) under a name derived from its source (:func:`projected_secret`), and a Role
there names exactly those copies for that Mac's identity.
"""

from __future__ import annotations

import hashlib
import re

#: Prefix of every per-Mac projection namespace; the rest is derived from the node's name.
NODE_NAMESPACE_PREFIX = "orchardist-node-"
#: Label on every projection namespace (its value: ``secrets``), to list them.
LABEL_PROJECTION = "orchardist.io/projection"
#: Annotation on a projection namespace: the MacNode it serves (a node name may be too long for a label).
ANNOTATION_PROJECTION_NODE = "orchardist.io/projection-node"
#: Annotation on a projected Secret: ``<namespace>/<name>`` of its source.
ANNOTATION_PROJECTED_FROM = "orchardist.io/projected-from"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAMESPACE_MAX = 63  # a namespace name is a DNS label
_SECRET_MAX = 253  # a Secret name is a DNS subdomain


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def node_namespace(node: str) -> str:
    """``orchardist-node-<node>``; a node name that is no DNS label there (dots, length) gets a
    readable prefix plus a digest of the whole name, so two nodes never share a namespace."""
    plain = NODE_NAMESPACE_PREFIX + node
    if len(plain) <= _NAMESPACE_MAX and _LABEL.match(plain) and "." not in node:
        return plain
    head = re.sub(r"[^a-z0-9-]", "-", node.lower())[: _NAMESPACE_MAX - len(NODE_NAMESPACE_PREFIX) - 9]
    return f"{NODE_NAMESPACE_PREFIX}{head.strip('-') or 'x'}-{_digest(node, 8)}"


def projected_secret(namespace: str, name: str) -> str:
    """``<namespace>.<name>``: a namespace holds no dot, so the first dot splits it back and two
    sources never share a copy. Past a Secret name's length, the name's tail is a digest."""
    plain = f"{namespace}.{name}"
    if len(plain) <= _SECRET_MAX:
        return plain
    keep = _SECRET_MAX - len(namespace) - 1 - 17
    return f"{namespace}.{name[:keep].rstrip('.-')}-{_digest(name, 16)}"
