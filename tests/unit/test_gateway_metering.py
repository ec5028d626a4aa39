"""Usage from answers and streams, the demand board and its Lease body."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from orchardist.api.modeldeployment import demand_lease_name
from orchardist.gateway.catalog import Served
from orchardist.gateway.demand import DemandBoard, lease_body
from orchardist.gateway.metering import StreamMeter
from orchardist.gateway.upstream import pinned
from orchardist.usage import Usage, usage_of


def sse(obj: object) -> bytes:
    return f"data: {json.dumps(obj)}\n".encode()


def test_usage_of() -> None:
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}) == Usage(3, 4)
    assert usage_of({"choices": []}) is None
    assert usage_of([1]) is None


def test_stream_meter_drops_the_usage_chunk_nobody_asked_for() -> None:
    meter = StreamMeter(
        drop_usage_chunk=True, model_from=b'"model": "default_model"', model_to=b'"model": "chat"'
    )
    first = sse({"model": "default_model", "choices": [{"delta": {"content": "hi"}}]})
    assert meter.line(b": keep-alive\n") == b": keep-alive\n"
    assert not meter.first_token
    assert meter.line(first) == first.replace(b"default_model", b"chat")
    assert meter.first_token
    assert meter.line(sse({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})) is None
    assert meter.line(b"data: [DONE]\n") == b"data: [DONE]\n"
    assert meter.usage == Usage(5, 2)


def test_stream_meter_keeps_the_usage_chunk_when_asked() -> None:
    meter = StreamMeter(drop_usage_chunk=False)
    chunk = sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert meter.line(chunk) == chunk and meter.usage == Usage(1, 1)


def test_pinned_body() -> None:
    mlx = Served("ns", "chat", "mlx-lm")
    body, asked = pinned({"model": "llama", "stream": True, "adapters": "/x", "messages": []}, mlx)
    assert body == {
        "model": "default_model",  # mlx-lm would load any other name it is given
        "stream": True,
        "messages": [],
        "stream_options": {"include_usage": True},
    }
    assert not asked
    body, asked = pinned({"model": "x", "stream": True, "stream_options": {"include_usage": True}}, mlx)
    assert asked
    body, _ = pinned({"model": "x"}, Served("ns", "chat", "vllm"))
    assert body == {"model": "chat"}


GW1 = hashlib.sha256(b"gw-1").hexdigest()[:8]  # each instance's Lease is named by its id's hash


def test_demand_board_asks_for_one_urgent_write_per_wave() -> None:
    board = DemandBoard()
    board.now = lambda: datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    key = ("ns", "chat")
    for _ in range(32):
        board.arrive(key)
        board.hold(key)
    assert board.urgent.is_set()
    board.urgent.clear()
    board.hold(key)  # the 33rd: the Lease is due, but not urgent
    assert not board.urgent.is_set()
    assert board.due()[key].in_flight == 32 and board.due()[key].held == 33
    board.written[key] = board.demand[key]
    assert board.due() == {}
    body = lease_body(key, board.demand[key], "gw-1")
    assert body["metadata"] == {
        "name": f"chat-demand-{GW1}",
        "namespace": "ns",
        "labels": {"orchardist.io/demand-for": "chat", "orchardist.io/gateway-instance": GW1},
        "annotations": {"orchardist.io/in-flight": "32", "orchardist.io/held": "33"},
    }
    assert body["spec"] == {"holderIdentity": "gw-1", "renewTime": "2026-01-02T03:04:05.600000Z"}
    owned = lease_body(key, board.demand[key], "gw-1", "6f1c-uid")["metadata"]["ownerReferences"]
    assert owned == [
        {"apiVersion": "orchardist.io/v1alpha1", "kind": "ModelDeployment", "name": "chat", "uid": "6f1c-uid"}
    ]
    for _ in range(33):
        board.release(key)
    board.hold(key)  # a new wave after the last one drained
    assert board.urgent.is_set()


def test_stream_meter_skips_parsing_token_chunks_but_not_usage_or_renames() -> None:
    """After the first token, a chunk with `"usage": null` passes unparsed; real usage is still read."""
    meter = StreamMeter(drop_usage_chunk=False, model_from=b'"model": "tiny"', model_to=b'"model": "chat"')
    token = b'data: {"model": "tiny", "choices": [{"delta": {"content": "a"}}], "usage": null}\n'
    assert meter.line(token) == token.replace(b'"tiny"', b'"chat"') and meter.first_token
    garbled = b'data: {"model": "tiny", "choices": [oops], "usage":null}\n'  # not parsed on the hot path
    assert meter.line(garbled) == garbled.replace(b'"tiny"', b'"chat"')
    final = b'data: {"model": "tiny", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n'
    assert meter.line(final) is not None and meter.usage == Usage(3, 2)


_TOKEN = b'data: {"model": "tiny", "choices": [{"delta": {"content": "a"}}], "usage": null}\n\n'
_USAGE = b'data: {"model": "tiny", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'


@pytest.mark.parametrize(
    ("first_token", "data", "expected"),
    [
        (False, _TOKEN, None),  # before the first token every line is read
        (True, _TOKEN, _TOKEN.replace(b'"tiny"', b'"chat"')),
        (True, _TOKEN * 3, (_TOKEN * 3).replace(b'"tiny"', b'"chat"')),  # every event renamed
        (True, _TOKEN + _USAGE, None),  # a real usage among null ones is read line by line
        (True, _USAGE, None),
        (
            True,
            _TOKEN.replace(b'"usage": null', b'"usage":null'),
            _TOKEN.replace(b'"usage": null', b'"usage":null').replace(b'"tiny"', b'"chat"'),
        ),
        (True, b"data: [DONE]\n\n", b"data: [DONE]\n\n"),
    ],
)
def test_stream_meter_passthrough_only_when_no_line_needs_reading(
    first_token: bool, data: bytes, expected: bytes | None
) -> None:
    meter = StreamMeter(drop_usage_chunk=True, model_from=b'"model": "tiny"', model_to=b'"model": "chat"')
    meter.first_token = first_token
    assert meter.passthrough(data) == expected
    assert meter.usage is None  # passing through never meters: usage is read on the line path


@pytest.mark.parametrize(
    ("deployment", "instance", "expected"),
    [
        ("chat", None, "chat-demand"),  # the older single-Lease form
        ("chat", "gw-1", f"chat-demand-{GW1}"),
        ("a" * 237, "gw-1", f"{'a' * 237}-demand-{GW1}"),  # exactly 253
    ],
)
def test_demand_lease_name(deployment: str, instance: str | None, expected: str) -> None:
    assert demand_lease_name(deployment, instance) == expected


def test_long_demand_lease_names_stay_valid_and_distinct() -> None:
    """Past 253 characters a prefix plus a hash of the whole name: two long names never share one."""
    one, two = demand_lease_name("a" * 250 + "x", "gw-1"), demand_lease_name("a" * 250 + "y", "gw-1")
    assert len(one) <= 253 and len(two) <= 253 and one != two
    assert one.endswith(f"-demand-{GW1}") and one[0] == "a"
    assert demand_lease_name("a" * 250 + "x", "gw-2") != one  # and per instance
