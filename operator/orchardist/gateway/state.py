"""The gateway's watched state: informers feed the catalog and the key ring on the event loop.

Four informers (ModelDeployments, ModelReplicas, MacNodes in every namespace; key Secrets by label
in the keys' namespace) run in their threads and hand each delivery to the loop, where it is
applied and everyone waiting for a change is woken. Nothing here polls the API server.
The deployments' upstream keys (``spec.apiKeySecretRef``) are read on first use and kept briefly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from orchardist import log
from orchardist.gateway import keys
from orchardist.gateway.catalog import Catalog, Key, Served
from orchardist.kube import Api, Kube, paths
from orchardist.kube.informer import Delivery, Informer

LOG = log.get(__name__)

#: How long an upstream key read from its Secret is reused (a rotated key is picked up after this).
UPSTREAM_KEY_TTL_S = 30.0


class State:
    def __init__(self, api: Api, kube: Kube, key_namespace: str | None) -> None:
        self.api = api
        self.kube = kube
        self.key_namespace = key_namespace
        self.catalog = Catalog()
        self.keyring = keys.KeyRing()
        self._changed = asyncio.Event()
        self._synced: set[str] = set()
        self._informers: list[Informer] = []
        self._upstream_keys: dict[Key, tuple[float, str | None]] = {}

    @property
    def ready(self) -> bool:
        """Every informer has delivered its first list."""
        return len(self._synced) == 4

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        secrets = paths.secret(self.key_namespace)  # None: every namespace
        feeds: list[tuple[str, str, dict[str, str]]] = [
            ("md", paths.modeldeployment(), {}),
            ("mr", paths.modelreplica(), {}),
            ("node", paths.macnode(), {}),
            ("keys", secrets, {"labelSelector": keys.SELECTOR}),
        ]
        for kind, path, query in feeds:
            informer = Informer(
                self.api, path, self._deliverer(loop, kind), query=query, name=f"gateway-{kind}"
            )
            informer.start()
            self._informers.append(informer)

    def stop(self) -> None:
        for informer in self._informers:
            informer.stop()

    def _deliverer(self, loop: asyncio.AbstractEventLoop, kind: str) -> Callable[[Delivery], None]:
        def deliver(item: Delivery) -> None:
            loop.call_soon_threadsafe(self.apply, kind, item)

        return deliver

    def apply(self, kind: str, item: Delivery) -> None:
        """One delivery, on the loop: update, then wake the waiters."""
        event, obj = item
        if kind == "keys":
            if event == "relist":
                self.keyring.replace(list(obj))
            elif event == "DELETED":
                self.keyring.remove(obj)
            else:
                self.keyring.upsert(obj)
        else:
            self.catalog.apply(kind, event, obj)
        if event == "relist":
            self._synced.add(kind)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self, within: float) -> bool:
        """Wait for the next change (False: ``within`` seconds passed first)."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), within)
        except TimeoutError:
            return False
        return True

    async def upstream_key(self, served: Served) -> str | None:
        """The key the deployment's replicas expect (None: they expect none)."""
        if served.api_key_ref is None:
            return None
        now = time.monotonic()
        cached = self._upstream_keys.get(served.key)
        if cached is not None and now - cached[0] < UPSTREAM_KEY_TTL_S:
            return cached[1]
        name, field = served.api_key_ref
        secret: dict[str, Any] | None = await self.kube.get(paths.secret(served.namespace, name))
        value = keys.decode((secret or {}).get("data") or {}).get(field)
        if value is None:
            LOG.warning(
                "the deployment's API key Secret is missing", deployment="/".join(served.key), secret=name
            )
        value = value.strip() if value else None
        self._upstream_keys[served.key] = (now, value)
        return value
