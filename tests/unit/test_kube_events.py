"""The Event writer: the fields `kubectl describe` reads, counting repeats, and never failing a caller."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from orchardist.kube import JSON, MERGE_PATCH, Kube
from orchardist.kube.events import MAX_LINE, EventRecorder, involved, one_line

T0 = datetime(2026, 12, 2, 1, 0, 0, tzinfo=UTC)

REPLICA = {
    "apiVersion": "orchardist.io/v1alpha1",
    "kind": "ModelReplica",
    "metadata": {"name": "qwen-abc", "namespace": "team", "uid": "u-1", "resourceVersion": "77"},
}


class EventsApi:
    """Events in memory: POST creates (409 on a taken name), PATCH merges (404 when missing)."""

    def __init__(self) -> None:
        self.events: dict[str, JSON] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: ApiException | None = None

    def request(self, method: str, path: str, *, body: Any = None, content_type: str = "", **_: Any) -> JSON:
        self.calls.append((method, path))
        if self.fail is not None:
            raise self.fail
        if method == "POST":
            assert path.startswith("/api/v1/namespaces/") and path.endswith("/events")
            name = body["metadata"]["name"]
            full = f"{path}/{name}"
            if full in self.events:
                raise ApiException(status=409, reason="AlreadyExists")
            self.events[full] = copy.deepcopy(body)
            return body
        if method == "PATCH":
            assert content_type == MERGE_PATCH
            if path not in self.events:
                raise ApiException(status=404, reason="NotFound")
            self.events[path].update(body)
            return self.events[path]
        raise AssertionError(f"unexpected {method} {path}")

    def get(self, path: str, **query: str | int) -> JSON:
        raise AssertionError("the writer never reads")

    def watch(self, path: str, **query: str | int) -> Iterator[JSON]:
        raise AssertionError("the writer never watches")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def recorder(api: EventsApi, clock: Clock, **kw: Any) -> EventRecorder:
    return EventRecorder(
        Kube(api),
        "orchardist-agent",
        host="mac-1",
        reporting_controller="orchardist.io/agent",
        now=clock,
        **kw,
    )


def only(api: EventsApi) -> JSON:
    assert len(api.events) == 1, api.events
    return next(iter(api.events.values()))


async def test_an_event_has_what_kubectl_describe_shows() -> None:
    api, clock = EventsApi(), Clock()
    await recorder(api, clock).record(REPLICA, "Warning", "PullFailed", "registry said 401")
    path, ev = next(iter(api.events.items()))
    assert path.startswith("/api/v1/namespaces/team/events/qwen-abc.")
    assert ev == {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": path.rsplit("/", 1)[1], "namespace": "team"},
        "involvedObject": {
            "apiVersion": "orchardist.io/v1alpha1",
            "kind": "ModelReplica",
            "name": "qwen-abc",
            "namespace": "team",
            "uid": "u-1",
            "resourceVersion": "77",
        },
        "type": "Warning",
        "reason": "PullFailed",
        "message": "registry said 401",
        "source": {"component": "orchardist-agent", "host": "mac-1"},
        "reportingComponent": "orchardist.io/agent",
        "reportingInstance": "mac-1",
        "firstTimestamp": "2026-12-02T01:00:00Z",
        "lastTimestamp": "2026-12-02T01:00:00Z",
        "count": 1,
    }


async def test_a_repeat_bumps_the_count_and_last_timestamp_instead_of_adding_an_event() -> None:
    api, clock = EventsApi(), Clock()
    rec = recorder(api, clock)
    await rec.record(REPLICA, "Warning", "CrashLoop", "exit 1")
    clock.now = T0 + timedelta(seconds=30)
    await rec.record(REPLICA, "Warning", "CrashLoop", "exit 1")
    clock.now = T0 + timedelta(seconds=90)
    await rec.record(REPLICA, "Warning", "CrashLoop", "exit 1")
    ev = only(api)
    assert (ev["count"], ev["firstTimestamp"], ev["lastTimestamp"]) == (
        3,
        "2026-12-02T01:00:00Z",
        "2026-12-02T01:01:30Z",
    )
    assert [m for m, _ in api.calls] == ["POST", "PATCH", "PATCH"]


async def test_a_different_reason_or_message_is_a_new_event() -> None:
    api, clock = EventsApi(), Clock()
    rec = recorder(api, clock)
    await rec.record(REPLICA, "Warning", "CrashLoop", "exit 1")
    clock.now += timedelta(microseconds=1)
    await rec.record(REPLICA, "Warning", "CrashLoop", "exit 2")
    clock.now += timedelta(microseconds=1)
    await rec.record(REPLICA, "Normal", "Started", "exit 2")
    assert sorted(e["message"] + "/" + e["reason"] for e in api.events.values()) == [
        "exit 1/CrashLoop",
        "exit 2/CrashLoop",
        "exit 2/Started",
    ]
    assert all(e["count"] == 1 for e in api.events.values())


async def test_after_the_window_or_once_the_event_expired_a_new_one_is_written() -> None:
    api, clock = EventsApi(), Clock()
    rec = recorder(api, clock, window_s=60)
    await rec.record(REPLICA, "Normal", "Pulled", "done")
    clock.now = T0 + timedelta(seconds=61)
    await rec.record(REPLICA, "Normal", "Pulled", "done")
    assert len(api.events) == 2
    api.events.clear()  # the API server's event TTL removed them
    clock.now += timedelta(seconds=10)
    await rec.record(REPLICA, "Normal", "Pulled", "done")
    assert only(api)["count"] == 1
    assert [m for m, _ in api.calls] == ["POST", "POST", "PATCH", "POST"]


async def test_events_of_a_cluster_scoped_object_go_to_the_default_namespace() -> None:
    api, clock = EventsApi(), Clock()
    node = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "MacNode",
        "metadata": {"name": "mac-1", "uid": "n"},
    }
    await recorder(api, clock).record(node, "Normal", "Registered", "hello")
    ev = only(api)
    assert ev["metadata"]["namespace"] == "default"
    assert ev["involvedObject"] == {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "MacNode",
        "name": "mac-1",
        "uid": "n",
    }


async def test_long_messages_are_cut_and_failures_never_reach_the_caller() -> None:
    api, clock = EventsApi(), Clock()
    rec = recorder(api, clock)
    await rec.record(REPLICA, "Warning", "CrashLoop", "x" * 5000)
    assert len(only(api)["message"]) == MAX_LINE
    api.fail = ApiException(status=403, reason="Forbidden")
    await rec.record(REPLICA, "Normal", "Started", "ok")  # logged, not raised
    assert len(api.events) == 1


def test_involved_object_is_taken_from_the_object_as_returned() -> None:
    ref: Mapping[str, Any] = involved(REPLICA)
    assert ref["uid"] == "u-1" and ref["resourceVersion"] == "77" and ref["kind"] == "ModelReplica"


ONE_LINE = [
    ("a single line is kept", "registry said 401", "registry said 401"),
    ("whitespace is collapsed", "  pull   failed\tat 42% ", "pull failed at 42%"),
    (
        "a log tail is left to status",
        "engine exited with code 1\n--- last log lines ---\nTraceback (most recent call last):\n  boom",
        "engine exited with code 1 (more in status)",
    ),
    ("blank lines before the first are skipped", "\n\n  no Mac fits\n", "no Mac fits"),
    ("nothing stays nothing", "", ""),
    ("a long line is cut with an ellipsis", "x" * 600, "x" * 511 + "\u2026"),
]


@pytest.mark.parametrize(("case", "message", "expected"), ONE_LINE, ids=[t[0] for t in ONE_LINE])
def test_one_line(case: str, message: str, expected: str) -> None:
    """An Event's message is one bounded line: the first, with a mark when lines were left out."""
    assert one_line(message) == expected


async def test_the_writer_posts_one_line_for_every_caller() -> None:
    """A multi-line message (an engine's log tail) becomes one line in the Event itself."""
    api, clock = EventsApi(), Clock()
    tail = "engine exited with code 1\n--- last log lines ---\nline 1\nline 2"
    await recorder(api, clock).record(REPLICA, "Warning", "CrashLoop", tail)
    assert only(api)["message"] == "engine exited with code 1 (more in status)"
