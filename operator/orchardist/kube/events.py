"""One writer of core/v1 Events: what `kubectl describe` shows under "Events:".

Events use the fields kubectl reads for its table (type, reason, "3x over 5m" from ``count`` and
``firstTimestamp``/``lastTimestamp``, the source component and host, the message). The same
(object, type, reason, message) seen again within ``window_s`` bumps the existing Event's count
instead of adding one more object, as the kubelet's event correlator does. Events are best effort:
the object's status is the record, so a failed write is logged and dropped.

A message is one line (kubectl's table and most log pipelines break on more): the writer keeps the
first non-blank line of what it is given, bounded; a log tail belongs in the object's status.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchardist import log
from orchardist.kube import JSON, paths
from orchardist.kube.aio import Kube

LOG = log.get(__name__)

#: An Event's message is one line of at most this many characters.
MAX_LINE = 512
#: Events of cluster-scoped objects (a MacNode) live here, as kubectl looks for them.
CLUSTER_SCOPED_NAMESPACE = "default"


def one_line(message: str, limit: int = MAX_LINE) -> str:
    """The first non-blank line of ``message``, whitespace collapsed, at most ``limit`` characters;
    `` (more in status)`` marks lines left out."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    line = " ".join(lines[0].split()) if lines else ""
    if len(lines) > 1:
        line = line.rstrip(":") + " (more in status)"
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def timestamp(now: datetime) -> str:
    """The whole-second RFC 3339 form ``firstTimestamp``/``lastTimestamp`` use."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def involved(obj: Mapping[str, Any]) -> JSON:
    """The ``involvedObject`` reference for an object as the API server returned it."""
    meta = obj.get("metadata") or {}
    ref = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
    }
    return {k: v for k, v in ref.items() if v}


@dataclass
class _Seen:
    namespace: str
    name: str
    count: int
    last: datetime


class EventRecorder:
    """Writes Events about objects for one component (``source.component``) on one host."""

    def __init__(
        self,
        kube: Kube,
        component: str,
        *,
        host: str = "",
        reporting_controller: str = "",
        window_s: float = 600.0,
        capacity: int = 1024,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.component = component
        self.host = host
        self.reporting_controller = reporting_controller or component
        self.window_s = window_s
        self.capacity = capacity
        self.now = now
        self._seen: OrderedDict[tuple[str, ...], _Seen] = OrderedDict()

    async def record(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """An Event about ``obj`` (``type_`` is Normal or Warning); never raises."""
        try:
            await self._record(obj, type_, reason, one_line(message))
        except Exception as exc:
            LOG.debug("event not recorded", reason=reason, error=str(exc))

    async def _record(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        ref = involved(obj)
        namespace = str(ref.get("namespace") or CLUSTER_SCOPED_NAMESPACE)
        key = (str(ref.get("uid") or ref.get("name")), type_, reason, message)
        now = self.now()
        seen = self._seen.get(key)
        if seen is not None and (now - seen.last).total_seconds() <= self.window_s:
            patch = {"count": seen.count + 1, "lastTimestamp": timestamp(now)}
            if await self.kube.patch_existing(paths.event(seen.namespace, seen.name), patch) is not None:
                seen.count, seen.last = seen.count + 1, now
                self._seen.move_to_end(key)
                return
        name = f"{ref.get('name')}.{int(now.timestamp() * 1e9):x}"
        stamp = timestamp(now)
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": ref,
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": self.component, **({"host": self.host} if self.host else {})},
            "reportingComponent": self.reporting_controller,
            "reportingInstance": self.host,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self.kube.create(paths.event(namespace), body)
        self._seen[key] = _Seen(namespace, name, 1, now)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
