"""Peer transfer's pure parts as tables: ranges, the claim rule, the hint, the server's checks."""

from __future__ import annotations

from typing import Any

import pytest

from orchardist.controller import peers as hints
from orchardist.controller.scheduler import Mac
from orchardist.oci.peering import (
    Choice,
    Claims,
    Peer,
    Probe,
    choose,
    content_range_ok,
    parse_fetching,
    split,
)
from orchardist_agent.peer_auth import bearer
from orchardist_agent.peer_server import ServeLimits, _Bucket, admit
from orchardist_agent.peers import hint_of, peers_from_hint

A, B, C = Peer("mac-a", "http://a"), Peer("mac-b", "http://b"), Peer("mac-c", "http://c")


@pytest.mark.parametrize(
    ("size", "chunk", "expected"),
    [
        (0, 4, []),
        (3, 4, [(0, 3)]),
        (8, 4, [(0, 4), (4, 8)]),
        (9, 4, [(0, 4), (4, 8), (8, 9)]),
    ],
)
def test_split_covers_the_blob_once(size: int, chunk: int, expected: list[tuple[int, int]]) -> None:
    """Ranges are contiguous, non-overlapping and end at the blob's size."""
    assert split(size, chunk) == expected


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("bytes 4-7/100", True),
        ("bytes 0-7/100", False),  # another range (a lying peer)
        ("bytes 4-7/101", False),  # another blob size
        ("bytes 4-8/100", False),
        (None, False),
    ],
)
def test_content_range_must_be_exactly_the_one_asked(header: str | None, ok: bool) -> None:
    assert content_range_ok(header, 4, 8, 100) is ok


@pytest.mark.parametrize(
    ("probes", "expected"),
    [
        ([], Choice.REGISTRY),  # nobody else wants it
        ([Probe(A, complete=True)], Choice.PEERS),
        ([Probe(A, since=5.0), Probe(B, complete=True)], Choice.PEERS),  # a holder beats any claim
        ([Probe(A, since=5.0)], Choice.WAIT),  # an older claim pulls; we wait
        ([Probe(A, since=20.0)], Choice.REGISTRY),  # ours is older
        ([Probe(A, since=10.0)], Choice.WAIT),  # same time: the smaller name (mac-a < mac-b)
        ([Probe(C, since=10.0)], Choice.REGISTRY),  # same time: mac-b < mac-c
        ([Probe(C)], Choice.REGISTRY),  # a peer without the blob and without a claim
    ],
)
def test_the_older_claim_pulls_from_the_registry(probes: list[Probe], expected: Choice) -> None:
    """Seen from mac-b, which claimed at t=10."""
    assert choose(10.0, "mac-b", probes) is expected


def test_two_macs_that_see_each_other_never_both_pull() -> None:
    """Whatever the claim times, exactly one of two Macs that see each other's claims pulls."""
    for ta, tb in [(1.0, 2.0), (2.0, 1.0), (3.0, 3.0)]:
        a = choose(ta, "mac-a", [Probe(B, since=tb)])
        b = choose(tb, "mac-b", [Probe(A, since=ta)])
        assert sorted([a.value, b.value]) == ["registry", "wait"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12.5 300", (12.5, 300)), ("12.5", (12.5, 0)), ("x 1", None), ("", None), (None, None)],
)
def test_the_fetching_header(value: str | None, expected: tuple[float, int] | None) -> None:
    assert parse_fetching(value) == expected


def test_claims_report_progress_until_released() -> None:
    claims = Claims()
    claims.claim("sha256:x", 7.25)
    claims.progress("sha256:x", 10)
    claims.progress("sha256:x", 5)
    claims.progress("sha256:other", 99)  # not claimed: ignored
    assert (claims.header("sha256:x"), claims.header("sha256:other")) == ("7.250000 15", None)
    claims.release("sha256:x")
    assert claims.header("sha256:x") is None


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer s3cret", "s3cret"),
        ("Bearer  s3cret ", "s3cret"),
        ("Basic s3cret", None),
        ("bearer s3cret", None),
        (None, None),
        ("Bearer ", None),
        ("Bearer " + "x" * (16 * 1024 + 1), None),  # oversized: not looked at
    ],
)
def test_the_bearer_token_is_read_from_the_header(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


def test_each_caller_has_a_token_bucket() -> None:
    """A burst of 2 at 1 request/s: the third at once is refused, one a second later admitted."""
    limits = ServeLimits(requests_per_second=1.0, burst=2.0)
    bucket: _Bucket | None = None
    seen = []
    for now in (0.0, 0.0, 0.0, 1.0):
        ok, bucket = admit(bucket, limits, now)
        seen.append(ok)
    assert seen == [True, True, False, True]


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        (
            "mac-a=10.0.0.2,mac-c=10.0.0.4",
            [("mac-a", "http://10.0.0.2:8479"), ("mac-c", "http://10.0.0.4:8479")],
        ),
        ("mac-b=10.0.0.9,mac-a=10.0.0.2", [("mac-a", "http://10.0.0.2:8479")]),  # never ourselves
        ("mac-a=fd00::2", [("mac-a", "http://[fd00::2]:8479")]),
        ("mac-a=mac-a.lan", [("mac-a", "http://mac-a.lan:8479")]),
        ("mac-a=evil/path@x,mac-c=", []),  # not a host: dropped
        ("mac-a", []),
        ("mac-a=10.0.0.3,mac-c=10.0.0.4", [("mac-c", "http://10.0.0.4:8479")]),  # at our own address
        ("", []),
    ],
)
def test_the_hint_names_the_peers(hint: str, expected: list[tuple[str, str]]) -> None:
    """Seen from mac-b at 10.0.0.3."""
    assert [(p.name, p.url) for p in peers_from_hint(hint, "mac-b", 8479, "10.0.0.3")] == expected


DIGEST = "sha256:" + "a" * 64


def _mac(name: str, *, cached: bool = False, ready: bool = True, address: str = "10.0.0.9") -> Mac:
    return Mac(name, 1 << 30, ready=ready, address=address, cached=frozenset({DIGEST} if cached else set()))


def _body(node: str) -> dict[str, Any]:
    return {"metadata": {"name": f"r-{node}"}, "spec": {"nodeName": node}}


def test_replicas_created_together_name_each_other_and_the_macs_that_hold_the_model() -> None:
    """Holders first; not the Mac itself; not NotReady Macs, Macs without an address or unrelated ones."""
    macs = {
        m.name: m
        for m in [
            _mac("a", address="10.0.0.1"),
            _mac("b", address="10.0.0.2"),
            _mac("holder", cached=True, address="10.0.0.7"),
            _mac("down", cached=True, ready=False),
            _mac("nowhere", cached=True, address=""),
            _mac("idle"),
            _mac("old", address="10.0.0.8"),
        ]
    }
    bodies = [_body("a"), _body("b")]
    hints.annotate(bodies, DIGEST, macs, existing_nodes=["old"])
    assert [hint_of(b["metadata"]) for b in bodies] == [
        "holder=10.0.0.7,b=10.0.0.2,old=10.0.0.8",
        "holder=10.0.0.7,a=10.0.0.1,old=10.0.0.8",
    ]


def test_macs_sharing_an_address_are_not_each_others_peers() -> None:
    """On loopback (development without namespaces) every Mac has the same address: no hint."""
    macs = {n: _mac(n, address="127.0.0.1") for n in ("a", "b")}
    bodies = [_body("a"), _body("b")]
    hints.annotate(bodies, DIGEST, macs, existing_nodes=[])
    assert [b["metadata"].get("annotations") for b in bodies] == [None, None]


def test_a_lone_replica_without_peers_gets_no_annotation() -> None:
    bodies = [_body("a")]
    hints.annotate(bodies, DIGEST, {"a": _mac("a"), "idle": _mac("idle")}, existing_nodes=[])
    assert "annotations" not in bodies[0]["metadata"]
