"""Peer identity and its check, as tables and on a fake clock: who is an agent, when a token is
refused without asking, how long the API server's answers are kept, and what happens when it
cannot be asked. The real apiserver's answers are in tests/e2e/test_peer_auth.py."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from typing import Any

import pytest
from urllib3.exceptions import MaxRetryError

from orchardist.kube import Kube, paths
from orchardist_agent.peer_auth import ReviewCache, TokenReviewer, Verdict, judge, precheck, unverified_claims
from orchardist_agent.peer_identity import (
    AUDIENCE,
    AgentIdentity,
    PeerToken,
    granted_life,
    own_identity,
    parse_username,
)

NS = "orchardist-system"
NOW = 1_800_000_000.0


def jwt(**claims: Any) -> str:
    """A JWT-shaped token with these claims (unsigned: only the API server's answer counts)."""

    def part(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_the_authentication_paths() -> None:
    assert paths.serviceaccount_token(NS, "orchardist-agent-a") == (
        "/api/v1/namespaces/orchardist-system/serviceaccounts/orchardist-agent-a/token"
    )
    assert paths.tokenreview() == "/apis/authentication.k8s.io/v1/tokenreviews"
    assert paths.selfsubjectreview() == "/apis/authentication.k8s.io/v1/selfsubjectreviews"


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        (f"system:serviceaccount:{NS}:orchardist-agent-mac-a", AgentIdentity(NS, "mac-a")),
        ("system:serviceaccount:other:orchardist-agent-mac-a", AgentIdentity("other", "mac-a")),
        (f"system:serviceaccount:{NS}:orchardist-agent-", None),  # no node
        (f"system:serviceaccount:{NS}:orchardist-operator", None),
        (f"system:serviceaccount:{NS}:default", None),
        ("system:serviceaccount::orchardist-agent-mac-a", None),
        ("admin", None),
        ("orchardist-agent-mac-a", None),
        ("", None),
    ],
)
def test_who_is_an_agent(username: str, expected: AgentIdentity | None) -> None:
    assert parse_username(username) == expected


def test_the_agents_own_identity_must_be_its_nodes() -> None:
    me = own_identity(f"system:serviceaccount:{NS}:orchardist-agent-mac-a", "mac-a")
    assert me == AgentIdentity(NS, "mac-a")
    assert (
        isinstance(me, AgentIdentity) and me.username == f"system:serviceaccount:{NS}:orchardist-agent-mac-a"
    )
    assert "not this node's" in str(
        own_identity(f"system:serviceaccount:{NS}:orchardist-agent-mac-b", "mac-a")
    )
    assert "'admin', not a ServiceAccount" in str(own_identity("admin", "mac-a"))


@pytest.mark.parametrize(
    ("status", "created", "life"),
    [
        ({"expirationTimestamp": "2026-01-01T01:00:00Z"}, "2026-01-01T00:00:00Z", 3600.0),
        ({"expirationTimestamp": "2026-01-01T00:20:00Z"}, "2026-01-01T00:00:00Z", 1200.0),  # shortened
        ({"expirationTimestamp": "2027-01-01T00:00:00Z"}, "2026-01-01T00:00:00Z", 3600.0),  # never longer
        ({}, "2026-01-01T00:00:00Z", 3600.0),
        ({"expirationTimestamp": "soon"}, None, 3600.0),
    ],
)
def test_a_minted_tokens_life_is_read_on_the_servers_clock(
    status: dict[str, Any], created: Any, life: float
) -> None:
    assert granted_life(status, created, 3600) == life


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "not a ServiceAccount token"),
        ("a.b", "not a ServiceAccount token"),
        ("a.!!!.c", "not a ServiceAccount token"),
        (jwt(aud=["https://kubernetes.default.svc"], exp=NOW + 600), f"not a token for {AUDIENCE}"),
        (jwt(exp=NOW + 600), f"not a token for {AUDIENCE}"),
        (jwt(aud=[AUDIENCE], exp=NOW - 1), "expired"),
        (jwt(aud=[AUDIENCE], exp=NOW + 600), None),
        (jwt(aud=AUDIENCE, exp=NOW + 600), None),  # a single audience may be a string
    ],
)
def test_tokens_that_cannot_pass_are_refused_without_asking(token: str, reason: str | None) -> None:
    assert precheck(token, NOW) == reason


def review(username: str, *, authenticated: bool = True, audiences: Any = (AUDIENCE,)) -> dict[str, Any]:
    return {"authenticated": authenticated, "user": {"username": username}, "audiences": list(audiences)}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (review(f"system:serviceaccount:{NS}:orchardist-agent-mac-b"), (200, "mac-b")),
        (review(f"system:serviceaccount:{NS}:intruder"), (403, "")),
        (review("system:serviceaccount:elsewhere:orchardist-agent-mac-b"), (403, "")),  # another release
        (review("admin"), (403, "")),
        (review(f"system:serviceaccount:{NS}:orchardist-agent-mac-b", authenticated=False), (401, "")),
        (review(f"system:serviceaccount:{NS}:orchardist-agent-mac-b", audiences=["api"]), (401, "")),
        ({"error": "invalid bearer token"}, (401, "")),
        ({}, (401, "")),
    ],
)
def test_the_api_servers_answer_as_a_verdict(status: dict[str, Any], expected: tuple[int, str]) -> None:
    verdict = judge(status, NS)
    assert (verdict.status, verdict.node) == expected


def test_the_cache_keeps_an_accepted_token_until_its_exp_or_the_cap() -> None:
    cache = ReviewCache(fresh=600.0, refused_for=10.0)
    ok = Verdict(200, node="mac-b")
    cache.put("short", ok, NOW, exp=NOW + 120)
    cache.put("long", ok, NOW, exp=NOW + 3600)
    cache.put("bad", Verdict(401), NOW)
    assert [cache.get(k, NOW + 119) for k in ("short", "long", "bad")] == [ok, ok, None]
    assert cache.get("bad", NOW + 9) == Verdict(401)
    assert cache.get("short", NOW + 120) is None  # expired with its token
    assert (cache.get("long", NOW + 599), cache.get("long", NOW + 600)) == (ok, None)  # asked again
    assert (cache.stale("long", NOW + 3599), cache.stale("long", NOW + 3600)) == (ok, None)
    assert cache.stale("short", NOW + 121) is None


def test_the_cache_is_bounded_and_refusals_never_push_out_accepted_tokens() -> None:
    cache = ReviewCache(max_entries=3)
    for i in range(3):
        cache.put(f"ok{i}", Verdict(200, node=f"mac-{i}"), NOW, exp=NOW + 600)
    for i in range(100):
        cache.put(f"bad{i}", Verdict(401), NOW)
    assert len(cache) == 6
    assert [cache.get(f"ok{i}", NOW + 1) is not None for i in range(3)] == [True] * 3
    cache.put("ok3", Verdict(200, node="mac-3"), NOW, exp=NOW + 600)  # the oldest accepted goes
    assert [cache.get(f"ok{i}", NOW + 1) is not None for i in range(4)] == [False, True, True, True]


class ReviewApi:
    """The API server's TokenReview, scripted: accepts the tokens in ``users``, or is unreachable."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.reviews = 0
        self.reachable = True
        self.answer = threading.Event()  # cleared: reviews wait (a slow API server)
        self.answer.set()

    def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> dict[str, Any]:
        assert (method, path) == ("POST", paths.tokenreview())
        assert body["spec"]["audiences"] == [AUDIENCE]
        self.reviews += 1
        assert self.answer.wait(10)
        if not self.reachable:
            raise MaxRetryError(None, path, "connection refused")  # type: ignore[arg-type]
        user = self.users.get(body["spec"]["token"])
        return {"status": review(user) if user else {"error": "invalid bearer token"}}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def reviewer(api: ReviewApi, clock: Clock) -> TokenReviewer:
    return TokenReviewer(Kube(api), NS, clock=clock)  # type: ignore[arg-type]


async def test_a_token_is_reviewed_once_until_it_expires_then_refused_without_asking() -> None:
    token = jwt(aud=[AUDIENCE], exp=NOW + 900, sub="b")
    api = ReviewApi({token: f"system:serviceaccount:{NS}:orchardist-agent-mac-b"})
    clock = Clock()
    verify = reviewer(api, clock)
    verdicts = await asyncio.gather(*(verify(token) for _ in range(20)))  # at once: one review
    assert {v.node for v in verdicts} == {"mac-b"} and api.reviews == 1
    clock.now = NOW + 599
    assert (await verify(token)).ok and api.reviews == 1
    clock.now = NOW + 600  # the cap: asked again, still good
    assert (await verify(token)).ok and api.reviews == 2
    clock.now = NOW + 900  # past its exp: refused, the API server not asked
    assert (await verify(token)).status == 401 and api.reviews == 2


async def test_refusals_are_kept_briefly() -> None:
    api = ReviewApi({})
    clock = Clock()
    verify = reviewer(api, clock)
    stranger = jwt(aud=[AUDIENCE], exp=NOW + 900, sub="x")
    assert [(await verify(stranger)).status for _ in range(5)] == [401] * 5
    assert api.reviews == 1
    clock.now = NOW + 10
    assert (await verify(stranger)).status == 401 and api.reviews == 2
    assert (await verify("not-a-jwt")).status == 401 and api.reviews == 2


async def test_while_the_api_server_is_unreachable_known_tokens_work_and_new_ones_wait() -> None:
    known, new = (jwt(aud=[AUDIENCE], exp=NOW + 3000, sub=s) for s in ("b", "c"))
    agent = f"system:serviceaccount:{NS}:orchardist-agent-mac-"
    api = ReviewApi({known: agent + "b", new: agent + "c"})
    clock = Clock()
    verify = reviewer(api, clock)
    assert (await verify(known)).ok
    api.reachable = False
    clock.now = NOW + 1200  # past the cap, before its exp
    assert (await verify(known)).node == "mac-b"
    assert (await verify(new)).status == 503
    api.reachable = True
    assert (await verify(new)).node == "mac-c"  # 503 is not kept


async def test_reviews_at_once_are_bounded() -> None:
    """A slow API server and many new tokens: past ``max_pending`` reviews the caller gets 503 at
    once instead of another thread waiting."""
    tokens = [jwt(aud=[AUDIENCE], exp=NOW + 900, sub=str(i)) for i in range(3)]
    api = ReviewApi(dict.fromkeys(tokens, f"system:serviceaccount:{NS}:orchardist-agent-mac-b"))
    api.answer.clear()
    verify = TokenReviewer(Kube(api), NS, clock=Clock(), max_pending=2)  # type: ignore[arg-type]
    slow = [asyncio.ensure_future(verify(t)) for t in tokens[:2]]
    await asyncio.sleep(0)  # one turn of the loop (no time passes): both reviews begin
    assert (await verify(tokens[2])).status == 503
    api.answer.set()
    assert [v.node for v in await asyncio.gather(*slow)] == ["mac-b", "mac-b"]
    assert (await verify(tokens[2])).ok


def test_claims_are_read_only_from_jwt_shaped_tokens() -> None:
    assert unverified_claims(jwt(exp=5)) == {"exp": 5}
    assert unverified_claims("x.e30.y") == {}
    assert unverified_claims("x.W10.y") is None  # a list, not claims
    assert unverified_claims("..") is None


class TokenRequestApi:
    """The TokenRequest subresource, scripted: a 20-minute token per call (the server shortened it)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> dict[str, Any]:
        self.asked.append((path, body["spec"]))
        return {
            "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"token": f"t{len(self.asked)}", "expirationTimestamp": "2026-01-01T00:20:00Z"},
        }


async def test_the_peer_token_is_minted_for_the_agents_own_account_and_expires_on_its_clock() -> None:
    api, clock = TokenRequestApi(), Clock()
    token = PeerToken(Kube(api), AgentIdentity(NS, "mac-a"), clock=clock)  # type: ignore[arg-type]
    assert token.current() is None
    await token.mint()
    assert api.asked == [
        (
            paths.serviceaccount_token(NS, "orchardist-agent-mac-a"),
            {"audiences": [AUDIENCE], "expirationSeconds": 3600},
        )
    ]
    clock.now = NOW + 1199
    assert token.current() == "t1"
    clock.now = NOW + 1200  # the granted 20 minutes, not the hour asked
    assert token.current() is None
