"""The ModelReplicas bound to this Mac, as the watch and this agent's own status writes show them.

Objects are parsed at the edge into :class:`ModelReplica` (an object this version cannot read is
logged and left as it was). A resourceVersion is opaque, so "which copy is newer" is never asked
of two versions. Instead: the watch delivers in order, and the object a status patch returns is
newer than every event the watch has not yet delivered before that write's own echo. So after a
write the cache keeps the returned object and skips watch updates until the one carrying the
write's resourceVersion arrives; a relist starts over from the list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from orchardist import log
from orchardist.api.modelreplica import ModelReplica
from orchardist.kube import JSON

from .reconcile import ReplicaView

LOG = log.get(__name__)

Key = tuple[str, str]


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def version_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def parse(obj: Mapping[str, Any]) -> ModelReplica | None:
    """The replica, or None (logged) when this agent cannot read it."""
    try:
        return ModelReplica.model_validate(obj)
    except ValidationError as exc:
        LOG.warning(
            "replica not understood; left alone",
            replica="/".join(key_of(obj)),
            errors=exc.error_count(),
            error=str(exc.errors()[0]["msg"]) if exc.errors() else "",
        )
        return None


def view_of(replica: ModelReplica, *, deleting: bool = False) -> ReplicaView:
    """What the pure decision reads of a replica."""
    meta = replica.metadata
    spec = replica.spec
    api_key = spec.api_key_secret_ref
    return ReplicaView(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
        node_name=spec.node_name,
        model=spec.model,
        digest=spec.digest,
        engine=spec.engine,
        engine_version=spec.engine_version or None,
        reserved_bytes=spec.memory_plan.reserved_bytes,
        deleting=deleting or bool(meta.get("deletionTimestamp")),
        pull_secret=spec.pull_secret_ref.name if spec.pull_secret_ref else None,
        api_key_secret=(api_key.name, api_key.key) if api_key else None,
        created=str(meta.get("creationTimestamp", "")),
    )


def gone_view(key: Key) -> ReplicaView:
    """A replica known only by name (deleted before this agent could read it): tear down only."""
    return ReplicaView(
        namespace=key[0],
        name=key[1],
        uid="",
        generation=0,
        node_name="",
        model="",
        digest="",
        engine="",
        reserved_bytes=0,
        deleting=True,
    )


def status_json(replica: ModelReplica) -> JSON:
    """The status as it is on the wire (the base a status merge patch is computed against)."""
    out: JSON = replica.status.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return out


@dataclass
class ReplicaCache:
    """Parsed replicas by (namespace, name), plus the resourceVersions of writes not yet echoed."""

    objects: dict[Key, ModelReplica] = field(default_factory=dict)
    #: key -> resourceVersion of this agent's last write, until the watch delivers it.
    pending: dict[Key, str] = field(default_factory=dict)
    versions: dict[Key, str] = field(default_factory=dict)

    def relist(self, items: Iterable[Mapping[str, Any]]) -> list[Key]:
        """Replace everything with a fresh list; returns the keys that are gone."""
        fresh: dict[Key, ModelReplica] = {}
        versions: dict[Key, str] = {}
        for obj in items:
            k = key_of(obj)
            parsed = parse(obj)
            if parsed is None:
                if k in self.objects:  # unreadable now: keep the copy this agent acts on
                    fresh[k], versions[k] = self.objects[k], self.versions.get(k, "")
                continue
            fresh[k], versions[k] = parsed, version_of(obj)
        gone = [k for k in self.objects if k not in fresh]
        self.objects, self.versions, self.pending = fresh, versions, {}
        return gone

    def update(self, obj: Mapping[str, Any]) -> Key:
        """An ADDED or MODIFIED event, in watch order."""
        k = key_of(obj)
        version = version_of(obj)
        if k in self.pending:
            if self.pending[k] != version:
                return k  # older than this agent's own write, which the cache already holds
            del self.pending[k]
        parsed = parse(obj)
        if parsed is not None:
            self.objects[k], self.versions[k] = parsed, version
        return k

    def delete(self, obj: Mapping[str, Any]) -> tuple[Key, ModelReplica | None]:
        """A DELETED event; returns the last readable copy, for tearing down."""
        k = key_of(obj)
        self.pending.pop(k, None)
        self.versions.pop(k, None)
        last = self.objects.pop(k, None)
        return k, parse(obj) or last

    def wrote(self, obj: Mapping[str, Any]) -> None:
        """The object a write of this agent returned (newer than anything the watch has not sent)."""
        k = key_of(obj)
        if k not in self.objects:
            return  # deleted meanwhile
        parsed = parse(obj)
        if parsed is None:
            return
        version = version_of(obj)
        if version != self.versions.get(k):
            self.pending[k] = version
        self.objects[k], self.versions[k] = parsed, version
