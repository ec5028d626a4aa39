"""Async, idempotent calls over the blocking adapter, shared by the controller and the agent.

Each call runs in a thread (the official client blocks). The answers that mean "already done"
are success, not errors: a create that finds the object (409) returns False, a delete of what is
gone (404) returns quietly, a get of what is missing (404) returns None. Any process may die
between two calls and run them again (docs/architecture.md: idempotent by rule).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

if TYPE_CHECKING:
    from orchardist.kube import JSON, Api


APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON


class Kube:
    """``get``/``create``/``delete``/``merge_patch`` on raw JSON, tolerant of repeats."""

    def __init__(self, api: Api | ApiClient, timeout: float = 30.0) -> None:
        from orchardist.kube import RawApi

        self.raw: Api = RawApi(api, timeout) if isinstance(api, ApiClient) else api

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, str | int] | None = None,
    ) -> JSON:
        out: JSON = await asyncio.to_thread(
            self.raw.request, method, path, query=query, body=body, content_type=content_type
        )
        return out

    async def get(self, path: str, **query: str | int) -> JSON | None:
        """The object (or list) at ``path``; None when it does not exist."""
        try:
            return await self.call("GET", path, query=query)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: JSON) -> bool:
        """Create; False when an object of that name already exists."""
        try:
            await self.call("POST", path, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    async def delete(self, path: str) -> None:
        """Delete in the background (dependents by the garbage collector); gone already is fine."""
        try:
            await self.call("DELETE", path, {"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status != 404:
                raise

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        """A JSON merge patch (RFC 7386: ``None`` removes a field); returns the object as stored."""
        from orchardist.kube import MERGE_PATCH

        return await self.call("PATCH", path, body, content_type=MERGE_PATCH)

    async def apply(self, path: str, body: JSON, *, manager: str, force: bool = False) -> JSON:
        """Server-side apply under the field manager ``manager``: the fields in ``body`` become its
        own and those it applied before and leaves out now are removed. ``force`` takes fields
        another manager set, for fields only ``manager`` may own (docs/architecture.md)."""
        query = {"fieldManager": manager, **({"force": "true"} if force else {})}
        return await self.call("PATCH", path, body, content_type=APPLY_PATCH, query=query)

    async def apply_existing(
        self, path: str, body: JSON, *, manager: str, force: bool = False
    ) -> JSON | None:
        """:meth:`apply` to a subresource, or None when the object is gone."""
        return await _unless_gone(self.apply(path, body, manager=manager, force=force))

    async def patch_existing(self, path: str, body: JSON) -> JSON | None:
        """:meth:`merge_patch`, or None when the object is gone (a patch must not recreate it)."""
        return await _unless_gone(self.merge_patch(path, body))


async def _unless_gone(call: Awaitable[JSON]) -> JSON | None:
    """What ``call`` returns, or None when it answers 404 (the object is gone)."""
    try:
        return await call
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
