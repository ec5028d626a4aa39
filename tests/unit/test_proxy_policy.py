"""The proxy's decisions as tables: who may call a replica, and what reaches its engine."""

from __future__ import annotations

import json

import pytest

from orchardist_agent.proxy import ProxyStats, Route
from orchardist_agent.proxy.policy import Forward, Refusal, UsageScanner, admit, authorized, forwarded_headers

ROUTE = Route(served_model="team-llm", upstream_model="default_model", upstream_port=9, api_key="k3y")


@pytest.mark.parametrize(
    ("header", "key", "ok"),
    [
        (None, None, True),  # no key configured: open (the model is still pinned)
        ("Bearer anything", None, True),
        (None, "k3y", False),
        ("Bearer k3y", "k3y", True),
        ("bearer k3y", "k3y", True),  # the scheme is case-insensitive (RFC 9110)
        ("Bearer  k3y ", "k3y", True),
        ("Bearer k3", "k3y", False),  # a prefix of the key
        ("Bearer k3yy", "k3y", False),
        ("Basic k3y", "k3y", False),
        ("k3y", "k3y", False),
        ("Bearer ", "k3y", False),
        ("Bearer kéy", "k3y", False),  # non-ASCII compares as bytes, never raises
    ],
)
def test_authorized(header: str | None, key: str | None, ok: bool) -> None:
    assert authorized(header, key) is ok


def body(**doc: object) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "content_type", "expected"),
    [
        (b"", "", Forward()),
        (body(model="default_model", prompt="x"), "application/json", Forward()),
        (
            body(model="team-llm", prompt="x"),
            "application/json",
            Forward(body(model="default_model", prompt="x")),
        ),
        (body(prompt="x"), "application/json", Forward(body(prompt="x", model="default_model"))),
        (body(model="other/model"), "application/json", 404),
        (body(model="team-llm", adapters="/tmp/evil"), "application/json", 400),
        (body(model="team-llm", draft_model="mlx-community/x"), "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"{nope", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (body(model="team-llm"), "text/plain", 415),
        (body(model="team-llm"), "", Forward(body(model="default_model"))),  # curl -d without a type
    ],
)
def test_admit_pins_the_model(raw: bytes, content_type: str, expected: Forward | int) -> None:
    got = admit(raw, content_type, ROUTE)
    if isinstance(expected, Forward):
        assert got == expected
        return
    assert isinstance(got, Refusal) and got.status == expected
    doc = json.loads(got.body())
    assert set(doc["error"]) == {"message", "type", "code"} and doc["error"]["message"]


def test_a_refused_model_is_named_in_the_message() -> None:
    got = admit(body(model="mlx-community/Llama-3-70B"), "application/json", ROUTE)
    assert isinstance(got, Refusal)
    assert (got.status, got.code) == (404, "model_not_found")
    assert "mlx-community/Llama-3-70B" in got.message and "team-llm" in got.message


def test_forwarded_headers_drop_hop_by_hop_and_what_connection_names() -> None:
    headers = {
        "Host": "mac:8000",
        "Content-Length": "10",
        "Connection": "keep-alive, X-Secret-Hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Transfer-Encoding": "chunked",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic eA==",
        "X-Secret-Hop": "1",
        "Authorization": "Bearer k3y",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
    }
    assert forwarded_headers(headers, headers["Connection"]) == {
        "Authorization": "Bearer k3y",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
    }


def sse(*docs: object) -> bytes:
    return b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in docs) + b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("sse_mode", "payload", "split_at", "expected"),
    [
        (False, body(usage={"prompt_tokens": 7, "completion_tokens": 3}), 5, (7, 3)),
        (False, body(choices=[]), 3, None),
        (
            True,
            sse({"choices": []}, {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}),
            30,
            (4, 2),
        ),
        (True, sse({"choices": []}), 10, None),  # no include_usage: nothing counted
        (True, sse({"usage": {"prompt_tokens": "4", "completion_tokens": 2}}), 7, None),  # not numbers
        (False, b'not json but mentions "usage"', 4, None),
    ],
)
def test_usage_scanner(
    sse_mode: bool, payload: bytes, split_at: int, expected: tuple[int, int] | None
) -> None:
    """Usage is found wherever the engine's chunks split the answer."""
    scanner = UsageScanner(sse=sse_mode)
    scanner.feed(payload[:split_at])
    scanner.feed(payload[split_at:])
    assert scanner.close() == expected


def test_usage_scanner_bounds_a_line_that_never_ends() -> None:
    scanner = UsageScanner(sse=True, max_line=64)
    for _ in range(100):
        scanner.feed(b"x" * 50)
    assert len(scanner._buf) <= 64
    assert scanner.close() is None


def test_stats_count_usage_and_refusals() -> None:
    stats = ProxyStats()
    stats.add_usage((5, 2))
    stats.add_usage(None)
    stats.add_usage((1, 1))
    stats.refuse("invalid_api_key")
    stats.refuse("invalid_api_key")
    assert (stats.prompt_tokens, stats.completion_tokens, stats.refused) == (6, 3, {"invalid_api_key": 2})
