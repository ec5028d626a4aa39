"""One informer: list, then watch from the list's resourceVersion, and relist when history is gone.

The shape of client-go's reflector, without its cache (the consumer keeps what it needs):

- deliveries are ``("relist", items)`` after every list, then ``(type, object)`` per watch event
  (``ADDED``, ``MODIFIED``, ``DELETED``), in the order the server sent them;
- a resourceVersion is opaque (API conventions): it is only stored and sent back, never compared,
  and the one to resume from is the newest the watch delivered (bookmarks included: they keep it
  fresh on a quiet watch, so a reconnect rarely needs a relist);
- 410 Gone, whether as the watch request's HTTP status or as an ``ERROR`` event, means the server
  no longer holds that history: relist at once;
- any other failure waits by :data:`orchardist.retry.WATCH` (jitter: a fleet that lost the API server
  together does not come back in lockstep) and resumes from the last resourceVersion.

The official client blocks, so :meth:`Informer.run` is a blocking loop, normally in a daemon thread
(:meth:`Informer.start`); :func:`to_queue` carries deliveries onto an asyncio queue. A stop takes
effect at the next event, the next retry wait or at the latest when the server ends the watch
(``timeout_s``).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from orchardist import log
from orchardist.kube import Api
from orchardist.retry import WATCH, Backoff

LOG = log.get(__name__)

#: ("relist", [objects]) or (event type, object).
Delivery = tuple[str, Any]
RELIST = "relist"

#: Server-side watch timeout: a quiet watch is re-opened this often (a proxy may cut idle streams).
WATCH_TIMEOUT_S = 240


class WatchError(Exception):
    """The watch ended with an ``ERROR`` event other than 410 Gone."""

    def __init__(self, code: int | None, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code


class Informer:
    """Lists and watches one collection (``path``, narrowed by ``query`` selectors)."""

    def __init__(
        self,
        api: Api,
        path: str,
        deliver: Callable[[Delivery], None],
        *,
        query: Mapping[str, str] | None = None,
        timeout_s: int = WATCH_TIMEOUT_S,
        policy: Backoff = WATCH,
        rng: Callable[[], float] = random.random,
        wait: Callable[[float], bool] | None = None,
        name: str = "informer",
    ) -> None:
        self.api = api
        self.path = path
        self.deliver = deliver
        self.query = dict(query or {})
        self.timeout_s = timeout_s
        self.policy = policy
        self.rng = rng
        self.name = name
        self._stopped = threading.Event()
        # Waits between retries; returns True when stopped meanwhile (tests pass a recorder).
        self._wait = wait or self._stopped.wait
        #: The resourceVersion the next watch resumes from; None: list first.
        self.resource_version: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        self._stopped.set()

    def start(self, resource_version: str | None = None) -> threading.Thread:
        """Run in a daemon thread (it ends by itself on :meth:`stop`); optionally resume a watch."""
        self.resource_version = resource_version
        thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        """List and watch until :meth:`stop`; never raises."""
        failures = 0
        while not self.stopped:
            listed = False
            try:
                if self.resource_version is None:
                    self._list()
                    listed = True
                    failures = 0
                if self._watch():
                    failures = 0
                elif listed and self.resource_version is None:
                    # Gone straight after a list: the server is not keeping up; do not spin.
                    failures += 1
                    if self._retry(failures, "410 Gone right after a list"):
                        return
            except ApiException as exc:
                if exc.status == 410 and not listed:
                    LOG.info("watch history expired; relisting", watch=self.name)
                    self.resource_version = None
                    continue
                if exc.status == 410:
                    self.resource_version = None
                failures += 1
                if self._retry(failures, f"{exc.status} {exc.reason}"):
                    return
            except Exception as exc:  # a dropped connection, a server restarting: resume
                failures += 1
                if self._retry(failures, repr(exc)):
                    return

    def _retry(self, failures: int, error: str) -> bool:
        delay = self.policy.delay(failures, self.rng)
        LOG.warning("watch failed; retrying", watch=self.name, error=error, retry_in=round(delay, 2))
        return self._wait(delay)

    def _list(self) -> None:
        listed = self.api.get(self.path, **self.query)
        self.resource_version = str(listed["metadata"]["resourceVersion"])
        self.deliver((RELIST, list(listed.get("items") or [])))

    def _watch(self) -> bool:
        """One watch request, until the server ends it; True when it delivered anything."""
        delivered = False
        for event in self.api.watch(
            self.path,
            **self.query,
            resourceVersion=self.resource_version or "",
            allowWatchBookmarks="true",
            timeoutSeconds=self.timeout_s,
        ):
            if self.stopped:
                break
            kind, obj = str(event.get("type")), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    LOG.info("watch history expired; relisting", watch=self.name)
                    self.resource_version = None
                    break
                raise WatchError(obj.get("code"), str(obj.get("message", "")))
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self.resource_version = str(version)
            if kind != "BOOKMARK":
                self.deliver((kind, obj))
            delivered = True
        return delivered


def to_queue(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Delivery]) -> Callable[[Delivery], None]:
    """A ``deliver`` for an informer thread: puts each delivery on ``queue`` in ``loop``."""

    def deliver(item: Delivery) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    return deliver
