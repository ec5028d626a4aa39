"""Model pulls of the replica loop: one task per replica, its progress, and when to try again.

A pull runs as an asyncio task; its progress callback comes from the store's worker threads and is
let through at most about once a second (:class:`reconcile.ProgressThrottle`) as a ``("progress",
key)`` item on the loop's queue. A failed pull waits by :data:`PULL_RETRY`, doubling per failure.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchardist import log
from orchardist.oci.auth import Credentials
from orchardist.oci.peers import PeerSource
from orchardist.oci.progress import PullProgress
from orchardist.oci.store import ContentStore
from orchardist.retry import Backoff

from .reconcile import ProgressThrottle, PullView, ReplicaView

LOG = log.get(__name__)

Key = tuple[str, str]

#: A failed pull is tried again after 10 s, doubling up to 5 min (a registry that is down for a
#: while is not hammered by every Mac at once: the jitter spreads them).
PULL_RETRY = Backoff(base=10.0, cap=300.0, jitter=0.2)


def default_budget(store: Path) -> int:
    """Without --store-budget: 80 % of the store's file system, leaving room for the OS and swap."""
    store.mkdir(parents=True, exist_ok=True)
    return int(shutil.disk_usage(store).total * 0.8)


@dataclass
class PullState:
    task: asyncio.Task[Any] | None = None
    digest: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    started: float = field(default_factory=time.monotonic)
    rate: float = 0.0
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    throttle: ProgressThrottle = field(default_factory=ProgressThrottle)
    progress_due: bool = False

    def view(self, now: float) -> PullView:
        return PullView(
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            bytes_per_second=self.rate,
            error=self.error,
            retry_due=self.error is not None and now >= self.retry_at,
        )


class Pulls:
    """The running and failed pulls, by replica."""

    def __init__(
        self,
        store: ContentStore,
        notify: Callable[[Key], None],
        pin: Callable[[Key, str], None],
        pulled: Callable[[], None],
        peers: Callable[[Key], PeerSource | None] | None = None,
    ) -> None:
        self.store = store
        self.peers = peers  # the peers a replica's pull may ask (None: registry only)
        self.notify = notify  # called on the event loop: converge this replica again
        self.pin = pin
        self.pulled = pulled
        self.states: dict[Key, PullState] = {}

    def get(self, key: Key) -> PullState | None:
        return self.states.get(key)

    def view(self, key: Key, now: float) -> PullView | None:
        """What the decision sees: a running or failed pull (a finished one shows as cached)."""
        state = self.states.get(key)
        if state is None or (state.task is None and state.error is None):
            return None
        return state.view(now)

    def take_progress_due(self, key: Key) -> bool:
        """Whether a progress update is due in the next status patch (and clear the flag)."""
        state = self.states.get(key)
        if state is None:
            return False
        due, state.progress_due = state.progress_due, False
        return due

    def start(self, view: ReplicaView, auth: Callable[[], Awaitable[Credentials | None]]) -> None:
        key = view.key
        state = self.states.get(key) or PullState()
        state.error = None
        state.digest = view.digest
        state.started = time.monotonic()
        self.states[key] = state
        loop = asyncio.get_running_loop()

        def progress(p: PullProgress) -> None:  # from the store's threads
            now = time.monotonic()
            state.bytes_done, state.bytes_total, state.rate = p.bytes_done, p.bytes_total, p.bytes_per_second
            if state.throttle.due(now, p.bytes_done, p.bytes_total):
                state.progress_due = True
                loop.call_soon_threadsafe(self.notify, key)

        async def pull() -> None:
            try:
                credentials = await auth()
                self.pin(key, view.digest)
                peers = self.peers(key) if self.peers is not None else None
                model = await self.store.pull(view.model, auth=credentials, progress=progress, peers=peers)
                if view.digest and model.digest != view.digest:
                    raise ValueError(
                        f"{view.model} resolved to {model.digest}, not spec.digest {view.digest}"
                    )
                state.failures = 0
                LOG.info("pulled", replica=f"{key[0]}/{key[1]}", digest=view.digest, bytes=state.bytes_total)
                self.pulled()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                state.failures += 1
                state.error = f"{type(exc).__name__}: {exc}"
                state.retry_at = time.monotonic() + PULL_RETRY.delay(state.failures)
                LOG.warning("pull failed", replica=f"{key[0]}/{key[1]}", error=state.error)
            finally:
                state.task = None
                self.notify(key)

        state.task = asyncio.create_task(pull(), name=f"pull {key[0]}/{key[1]}")

    def forget(self, key: Key) -> None:
        """Drop the replica's pull, cancelling it if it runs."""
        state = self.states.pop(key, None)
        if state is not None and state.task is not None:
            state.task.cancel()

    def cancel_all(self) -> None:
        for state in self.states.values():
            if state.task is not None:
                state.task.cancel()
