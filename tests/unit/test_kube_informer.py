"""The informer against a scripted API: list, watch, bookmarks, 410 Gone, errors and backoff.

``Informer.run`` is driven in the test's own thread: the fake API stops the informer when its
script runs out, and the waits between retries are recorded instead of slept.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from orchardist.kube import JSON
from orchardist.kube.informer import RELIST, Delivery, Informer, WatchError, to_queue
from orchardist.retry import WATCH

PATH = "/apis/orchardist.io/v1alpha1/modelreplicas"


def obj(name: str, rv: str) -> JSON:
    return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv}}


def listing(rv: str, *items: JSON) -> JSON:
    return {"metadata": {"resourceVersion": rv}, "items": list(items)}


def event(kind: str, o: JSON) -> JSON:
    return {"type": kind, "object": o}


def gone() -> JSON:
    return {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}


Step = JSON | BaseException


class ScriptedApi:
    """Answers lists and watches from scripts; stops the informer when the watch script is spent."""

    def __init__(self, lists: list[Step], watches: list[list[Step] | BaseException]) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.informer: Informer | None = None

    def request(self, method: str, path: str, **_: Any) -> Any:
        raise AssertionError(f"unexpected {method} {path}")

    def get(self, path: str, **query: str | int) -> JSON:
        assert path == PATH
        self.calls.append(("list", dict(query)))
        step = self.lists.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    def watch(self, path: str, **query: str | int) -> Iterator[JSON]:
        assert path == PATH
        self.calls.append(("watch", dict(query)))
        if not self.watches:
            assert self.informer is not None
            self.informer.stop()
            return iter(())
        script = self.watches.pop(0)
        if isinstance(script, BaseException):
            raise script
        return self._stream(script)

    @staticmethod
    def _stream(script: list[Step]) -> Iterator[JSON]:
        for step in script:
            if isinstance(step, BaseException):
                raise step
            yield step


def run(
    api: ScriptedApi, query: Mapping[str, str] | None = None, *, stop_on_wait: bool = False
) -> tuple[list[Delivery], list[float]]:
    delivered: list[Delivery] = []
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return stop_on_wait

    informer = Informer(api, PATH, delivered.append, query=query, rng=lambda: 0.0, wait=wait)
    api.informer = informer
    informer.run()
    return delivered, waits


def watched_from(api: ScriptedApi) -> list[str | int | None]:
    return [q.get("resourceVersion") for kind, q in api.calls if kind == "watch"]


def test_lists_then_watches_from_the_lists_version_and_delivers_in_order() -> None:
    api = ScriptedApi(
        [listing("10", obj("a", "9"))],
        [
            [
                event("ADDED", obj("b", "11")),
                event("MODIFIED", obj("a", "12")),
                event("DELETED", obj("b", "13")),
            ]
        ],
    )
    delivered, waits = run(api, {"fieldSelector": "spec.nodeName=mac-1"})
    assert delivered == [
        (RELIST, [obj("a", "9")]),
        ("ADDED", obj("b", "11")),
        ("MODIFIED", obj("a", "12")),
        ("DELETED", obj("b", "13")),
    ]
    assert api.calls[0] == ("list", {"fieldSelector": "spec.nodeName=mac-1"})
    assert api.calls[1] == (
        "watch",
        {
            "fieldSelector": "spec.nodeName=mac-1",
            "resourceVersion": "10",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": 240,
        },
    )
    assert watched_from(api) == ["10", "13"]  # the second watch resumes after the last event
    assert waits == []


def test_resource_versions_are_opaque_the_last_delivered_one_is_resumed_from() -> None:
    # Neither numeric nor ordered: the informer only stores and sends back what it was given.
    api = ScriptedApi(
        [listing("zz-list", obj("a", "zz-0"))],
        [[event("MODIFIED", obj("a", "b7")), event("MODIFIED", obj("a", "a3"))], []],
    )
    run(api)
    assert watched_from(api) == ["zz-list", "a3", "a3"]


def test_bookmarks_move_the_resume_point_and_are_not_delivered() -> None:
    bookmark = {"type": "BOOKMARK", "object": {"kind": "ModelReplica", "metadata": {"resourceVersion": "50"}}}
    api = ScriptedApi([listing("10")], [[bookmark]])
    delivered, _ = run(api)
    assert delivered == [(RELIST, [])]
    assert watched_from(api) == ["10", "50"]


@pytest.mark.parametrize(
    "expired", [[gone()], ApiException(status=410, reason="Gone")], ids=["error-event", "http-status"]
)
def test_410_gone_relists_at_once(expired: list[Step] | BaseException) -> None:
    api = ScriptedApi(
        [listing("10"), listing("20", obj("b", "19"))], [[event("ADDED", obj("b", "11"))], expired]
    )
    delivered, waits = run(api)
    assert delivered == [(RELIST, []), ("ADDED", obj("b", "11")), (RELIST, [obj("b", "19")])]
    assert [kind for kind, _ in api.calls] == ["list", "watch", "watch", "list", "watch"]
    assert watched_from(api) == ["10", "11", "20"]
    assert waits == []


@pytest.mark.parametrize(
    "expired", [[gone()], ApiException(status=410, reason="Gone")], ids=["error-event", "http-status"]
)
def test_gone_right_after_a_list_backs_off_instead_of_spinning(expired: list[Step] | BaseException) -> None:
    api = ScriptedApi([listing("10"), listing("20")], [expired])
    _, waits = run(api)
    assert waits == [WATCH.delay(1, lambda: 0.0)]
    assert [kind for kind, _ in api.calls] == ["list", "watch", "list", "watch"]


def test_other_failures_back_off_by_the_watch_policy_and_resume_without_a_relist() -> None:
    api = ScriptedApi(
        [listing("10")],
        [
            ApiException(status=500, reason="Internal Server Error"),
            ConnectionResetError("peer went away"),
            [{"type": "ERROR", "object": {"code": 500, "message": "etcd leader changed"}}],
            [event("ADDED", obj("b", "11"))],
            ApiException(status=503, reason="Service Unavailable"),
        ],
    )
    delivered, waits = run(api)
    rng0 = lambda: 0.0  # noqa: E731  (the nominal delays: no jitter drawn)
    # Three failures in a row double the wait; a watch that delivers resets the count.
    assert waits == [WATCH.delay(1, rng0), WATCH.delay(2, rng0), WATCH.delay(3, rng0), WATCH.delay(1, rng0)]
    assert waits[:3] == [0.5, 1.0, 2.0]
    assert [kind for kind, _ in api.calls].count("list") == 1
    assert watched_from(api) == ["10", "10", "10", "10", "11", "11"]
    assert delivered[-1] == ("ADDED", obj("b", "11"))


def test_a_failed_list_is_retried_with_backoff() -> None:
    api = ScriptedApi([ApiException(status=403, reason="Forbidden"), listing("10")], [])
    delivered, waits = run(api)
    assert waits == [0.5]
    assert delivered == [(RELIST, [])]


def test_stop_during_a_retry_wait_ends_the_run() -> None:
    api = ScriptedApi(
        [listing("10")], [ApiException(status=500, reason="boom"), [event("ADDED", obj("b", "11"))]]
    )
    delivered, waits = run(api, stop_on_wait=True)
    assert waits == [0.5]
    assert delivered == [(RELIST, [])]  # nothing after the stop
    assert len(api.watches) == 1


def test_watch_error_carries_the_servers_code() -> None:
    err = WatchError(500, "etcd leader changed")
    assert (err.code, str(err)) == (500, "500 etcd leader changed")


def test_jitter_spreads_the_waits_below_the_nominal_delay() -> None:
    draws = iter([0.25, 0.75])
    api = ScriptedApi(
        [listing("10")], [ApiException(status=500, reason="x"), ApiException(status=500, reason="y")]
    )
    waits: list[float] = []
    informer = Informer(
        api, PATH, lambda _: None, rng=lambda: next(draws), wait=lambda s: waits.append(s) or False
    )
    api.informer = informer
    informer.run()
    assert waits == [0.5 * 0.75, 1.0 * 0.25]  # full jitter: nominal x (1 - draw)


async def test_a_thread_delivers_onto_the_event_loops_queue() -> None:
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    deliver = to_queue(asyncio.get_running_loop(), queue)
    thread = threading.Thread(target=deliver, args=(("ADDED", obj("a", "1")),))
    thread.start()
    async with asyncio.timeout(10):
        assert await queue.get() == ("ADDED", obj("a", "1"))
    thread.join()


async def test_start_runs_in_a_daemon_thread_until_stopped() -> None:
    api = ScriptedApi([listing("10", obj("a", "9"))], [[event("ADDED", obj("b", "11"))]])
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    informer = Informer(api, PATH, to_queue(asyncio.get_running_loop(), queue), name="test-watch")
    api.informer = informer
    thread = informer.start()
    async with asyncio.timeout(10):
        assert await queue.get() == (RELIST, [obj("a", "9")])
        assert await queue.get() == ("ADDED", obj("b", "11"))
    await asyncio.to_thread(thread.join, 10)
    assert thread.daemon and not thread.is_alive() and informer.stopped
