"""Per-Mac Secret projection: each agent reads only the Secrets its own replicas reference.

RBAC can name Secrets (``resourceNames``) only inside one namespace, and a replica's Secrets live in
the deployment's namespace next to everyone else's. So the controller copies every Secret that a
replica bound to Mac N references (``pullSecretRef``, ``apiKeySecretRef``) into Mac N's namespace
(:func:`orchardist.api.projection.node_namespace`), and a Role there grants N's agent identity
``get`` on exactly those copies. :func:`desired_projections` decides purely; :func:`changes`
compares with what exists; :class:`Projector` reads and writes, level-based: every pass converges
from scratch, so a missed event or a restart costs one pass, and a pass with nothing to do writes
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from orchardist import log
from orchardist.api.modelreplica import ModelReplica
from orchardist.api.projection import (
    ANNOTATION_PROJECTED_FROM,
    ANNOTATION_PROJECTION_NODE,
    LABEL_PROJECTION,
    node_namespace,
    projected_secret,
)
from orchardist.kube import JSON, Kube, paths

LOG = log.get(__name__)

#: Name of the Role and RoleBinding in every projection namespace.
READER = "orchardist-agent-secrets"
#: The agents' ServiceAccounts are ``orchardist-agent-<node>`` (the chart's ``agents.nodes``).
AGENT_ACCOUNT_PREFIX = "orchardist-agent-"
MANAGED_BY = {"app.kubernetes.io/managed-by": "orchardist"}

Source = tuple[str, str]  # (namespace, name) of a Secret a replica references


@dataclass(frozen=True)
class NodeProjection:
    """What Mac ``node``'s namespace should hold: the copies and the Role naming exactly them."""

    node: str
    namespace: str
    secrets: dict[str, JSON] = field(default_factory=dict)  # projected name -> full Secret body

    def role(self) -> JSON:
        # No copies, no rule: a rule with an empty resourceNames list would grant every Secret.
        rules = (
            [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "verbs": ["get"],
                    "resourceNames": sorted(self.secrets),
                }
            ]
            if self.secrets
            else []
        )
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(READER),
            "rules": rules,
        }

    def binding(self, agent_namespace: str) -> JSON:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(READER),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": READER},
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": AGENT_ACCOUNT_PREFIX + self.node,
                    "namespace": agent_namespace,
                }
            ],
        }

    def namespace_body(self) -> JSON:
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": self.namespace,
                "labels": {**MANAGED_BY, LABEL_PROJECTION: "secrets"},
                "annotations": {ANNOTATION_PROJECTION_NODE: self.node},
            },
        }


def _meta(name: str, annotations: Mapping[str, str] | None = None) -> JSON:
    meta: JSON = {"name": name, "labels": dict(MANAGED_BY)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def references(replicas: Iterable[ModelReplica]) -> dict[str, set[Source]]:
    """Per node, the Secrets its replicas reference (any phase: a replica needs them while it exists)."""
    out: dict[str, set[Source]] = {}
    for r in replicas:
        ns = str(r.metadata.get("namespace") or "")
        wanted = out.setdefault(r.spec.node_name, set())
        if r.spec.pull_secret_ref is not None:
            wanted.add((ns, r.spec.pull_secret_ref.name))
        if r.spec.api_key_secret_ref is not None:
            wanted.add((ns, r.spec.api_key_secret_ref.name))
    return out


def copy_of(source: Source, secret: JSON) -> JSON:
    """The projected copy of ``secret``: same type and data, a name and annotation naming its source."""
    ns, name = source
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(projected_secret(ns, name), {ANNOTATION_PROJECTED_FROM: f"{ns}/{name}"}),
        "type": secret.get("type") or "Opaque",
        "data": dict(secret.get("data") or {}),
    }


def desired_projections(
    replicas: Iterable[ModelReplica], secrets: Mapping[Source, JSON], nodes: Iterable[str] = ()
) -> dict[str, NodeProjection]:
    """Per node (those with replicas, plus ``nodes`` already projected), the copies it should hold.

    A referenced Secret missing from ``secrets`` is not projected: the agent reports it not found,
    the same as it would for the source.
    """
    wanted = references(replicas)
    out: dict[str, NodeProjection] = {}
    for node in sorted({*wanted, *nodes}):
        copies = {
            projected_secret(*src): copy_of(src, secrets[src])
            for src in sorted(wanted.get(node, ()))
            if src in secrets
        }
        out[node] = NodeProjection(node, node_namespace(node), copies)
    return out


@dataclass(frozen=True)
class Observed:
    """One projection namespace as it is: its copies and its Role's rules (None: no Role yet)."""

    secrets: dict[str, JSON]
    rules: list[JSON] | None
    binding: JSON | None


@dataclass
class Changes:
    """Writes that take the cluster from observed to desired; empty when converged."""

    namespaces: list[JSON] = field(default_factory=list)
    put_secrets: list[tuple[str, JSON]] = field(default_factory=list)  # (namespace, body)
    delete_secrets: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)
    put_roles: list[tuple[str, JSON]] = field(default_factory=list)
    put_bindings: list[tuple[str, JSON]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(
            (self.namespaces, self.put_secrets, self.delete_secrets, self.put_roles, self.put_bindings)
        )


def _same_copy(have: JSON, want: JSON) -> bool:
    meta, wmeta = have.get("metadata") or {}, want["metadata"]
    source = (meta.get("annotations") or {}).get(ANNOTATION_PROJECTED_FROM)
    return bool(
        have.get("type") == want["type"]
        and dict(have.get("data") or {}) == want["data"]
        and source == wmeta["annotations"][ANNOTATION_PROJECTED_FROM]
    )


def changes(
    desired: Mapping[str, NodeProjection], observed: Mapping[str, Observed], agent_namespace: str
) -> Changes:
    """The writes, namespace by namespace (each list in the order :class:`Projector` applies it)."""
    out = Changes()
    for proj in desired.values():
        have = observed.get(proj.namespace)
        if have is None:
            out.namespaces.append(proj.namespace_body())
            have = Observed({}, None, None)
        for name, body in proj.secrets.items():
            if name not in have.secrets or not _same_copy(have.secrets[name], body):
                out.put_secrets.append((proj.namespace, body))
        out.delete_secrets += [(proj.namespace, n) for n in sorted(set(have.secrets) - set(proj.secrets))]
        role = proj.role()
        if have.rules != role["rules"]:
            out.put_roles.append((proj.namespace, role))
        binding = proj.binding(agent_namespace)
        if have.binding is None or (have.binding.get("subjects"), have.binding.get("roleRef")) != (
            binding["subjects"],
            binding["roleRef"],
        ):
            out.put_bindings.append((proj.namespace, binding))
    return out


class Projector:
    """Reads the sources and the projection namespaces, applies :func:`changes`; one pass at a time."""

    def __init__(self, kube: Kube, replicas: Callable[[], list[ModelReplica]], agent_namespace: str) -> None:
        self.kube = kube
        self.replicas = replicas
        self.agent_namespace = agent_namespace
        self._poke = asyncio.Event()

    def poke(self) -> None:
        """Ask for a pass soon (a replica came, went or changed). The first poke also says the
        replica index is filled: kopf calls handlers only after its indexes are."""
        self._poke.set()

    async def run(self, interval: float) -> None:
        """After the first poke, converge every ``interval`` seconds and whenever poked (source
        Secrets change unannounced). Before it, an empty index is "not listed yet", and a pass
        would take every copy away."""
        await self._poke.wait()
        while True:
            self._poke.clear()
            try:
                await self.sync()
            except Exception as exc:  # the next pass retries from scratch
                LOG.warning("secret projection failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout=interval)

    async def sync(self) -> Changes:
        replicas = self.replicas()
        observed = await self._observed()
        nodes = [
            str((ns["metadata"].get("annotations") or {}).get(ANNOTATION_PROJECTION_NODE))
            for ns in observed[1].values()
            if (ns["metadata"].get("annotations") or {}).get(ANNOTATION_PROJECTION_NODE)
        ]
        sources: dict[Source, JSON] = {}
        for src in sorted(set().union(*references(replicas).values())):
            found = await self.kube.get(paths.secret(*src))
            if found is not None:
                sources[src] = found
        desired = desired_projections(replicas, sources, nodes)
        todo = changes(desired, observed[0], self.agent_namespace)
        if todo:
            await self._apply(todo)
        return todo

    async def _observed(self) -> tuple[dict[str, Observed], dict[str, JSON]]:
        listed = await self.kube.get(paths.namespace(), labelSelector=f"{LABEL_PROJECTION}=secrets")
        namespaces = {str(n["metadata"]["name"]): n for n in (listed or {}).get("items") or ()}
        out: dict[str, Observed] = {}
        for ns in namespaces:
            copies = await self.kube.get(
                paths.secret(ns), labelSelector="app.kubernetes.io/managed-by=orchardist"
            )
            role = await self.kube.get(paths.role(ns, READER))
            binding = await self.kube.get(paths.rolebinding(ns, READER))
            out[ns] = Observed(
                {str(s["metadata"]["name"]): s for s in (copies or {}).get("items") or ()},
                None if role is None else list(role.get("rules") or []),
                binding,
            )
        return out, namespaces

    async def _apply(self, todo: Changes) -> None:
        for body in todo.namespaces:
            await self.kube.create(paths.namespace(), body)
        # Copies before the Role that names them, the Role before its binding (granting a Role
        # needs it to exist), and copies no longer wanted removed only after the Role let go.
        for ns, body in todo.put_secrets:
            await self._put(paths.secret(ns), paths.secret(ns, body["metadata"]["name"]), body)
        for ns, body in todo.put_roles:
            await self._put(paths.role(ns), paths.role(ns, READER), body)
        for ns, body in todo.put_bindings:
            await self._put(paths.rolebinding(ns), paths.rolebinding(ns, READER), body)
        for ns, name in todo.delete_secrets:
            await self.kube.delete(paths.secret(ns, name))
        LOG.info(
            "secrets projected",
            written=[f"{ns}/{b['metadata']['name']}" for ns, b in todo.put_secrets],
            removed=[f"{ns}/{n}" for ns, n in todo.delete_secrets],
        )

    async def _put(self, collection: str, path: str, body: JSON) -> None:
        """Create, or replace what is there (an unconditional update: the controller owns these)."""
        if not await self.kube.create(collection, body):
            await self.kube.call("PUT", path, body)
