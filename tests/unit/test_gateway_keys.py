"""Key Secrets, model resolution and the models list, as tables."""

from __future__ import annotations

import base64

import pytest

from orchardist.gateway.catalog import Served
from orchardist.gateway.keys import ApiKey, KeyRing, bearer, digest, parse
from orchardist.gateway.resolve import listed, resolve


def secret(name: str, ns: str = "gw", **data: str) -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def test_parse_a_key_secret() -> None:
    parsed = parse(
        secret(
            "team-a",
            key=" sk-a \n",
            namespaces="alpha, beta\ngamma",
            models="delta/m1,m2",
            requestsPerMinute="30",
            tokensPerMinute="nope",
        )
    )
    assert parsed is not None
    token_digest, key = parsed
    assert token_digest == digest("sk-a")
    assert key == ApiKey(
        name="gw/team-a",
        namespaces=frozenset({"alpha", "beta", "gamma"}),
        models=frozenset({("delta", "m1"), ("gw", "m2")}),  # a bare name is in the Secret's namespace
        requests_per_minute=30.0,
        tokens_per_minute=None,  # not a number: ignored (with a warning)
    )


@pytest.mark.parametrize("data", [{}, {"key": "  "}, {"namespaces": "a"}])
def test_a_secret_without_a_key_is_skipped(data: dict[str, str]) -> None:
    assert parse(secret("x", **data)) is None


def test_ring_follows_the_watch() -> None:
    ring = KeyRing()
    ring.replace([secret("a", key="ka", namespaces="n1"), secret("b", key="kb", namespaces="n2")])
    assert ring.lookup("ka").name == "gw/a"  # type: ignore[union-attr]
    ring.upsert(secret("a", key="ka2", namespaces="n1"))  # rotated
    assert ring.lookup("ka") is None and ring.lookup("ka2") is not None
    ring.remove(secret("b"))
    assert ring.lookup("kb") is None and len(ring) == 1
    ring.upsert(secret("a", namespaces="n1"))  # its key removed: no longer a key
    assert len(ring) == 0


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), (None, None)],
)
def test_bearer(header: str | None, token: str | None) -> None:
    assert bearer(header) == token


DEPLOYMENTS = {
    s.key: s
    for s in [
        Served("alpha", "chat", "mlx-lm", aliases=("llama",)),
        Served("alpha", "embed", "mlx-lm"),
        Served("beta", "chat", "mlx-lm"),
        Served("beta", "coder", "mlx-lm", aliases=("llama",)),
    ]
}
ALPHA = ApiKey("gw/a", namespaces=frozenset({"alpha"}))
BETA_CODER = ApiKey("gw/c", models=frozenset({("beta", "coder")}))
BOTH = ApiKey("gw/b", namespaces=frozenset({"alpha", "beta"}))


@pytest.mark.parametrize(
    ("model", "key", "status", "found"),
    [
        ("chat", ALPHA, 200, ("alpha", "chat")),
        ("alpha/chat", ALPHA, 200, ("alpha", "chat")),
        ("llama", ALPHA, 200, ("alpha", "chat")),  # an alias, in the key's namespace
        ("beta/chat", ALPHA, 403, None),  # another namespace
        ("coder", ALPHA, 403, None),
        ("nothing", ALPHA, 404, None),
        ("gamma/chat", ALPHA, 404, None),
        ("", ALPHA, 400, None),
        (None, ALPHA, 400, None),
        ("coder", BETA_CODER, 200, ("beta", "coder")),  # its one model's namespace is its home
        ("llama", BETA_CODER, 200, ("beta", "coder")),
        ("beta/chat", BETA_CODER, 403, None),
        ("chat", BOTH, 400, None),  # two namespaces, no home: ambiguous
        ("beta/chat", BOTH, 200, ("beta", "chat")),
        ("embed", BOTH, 200, ("alpha", "embed")),
    ],
)
def test_resolve(model: object, key: ApiKey, status: int, found: tuple[str, str] | None) -> None:
    got = resolve(model, key, DEPLOYMENTS)
    assert got.status == status, got.message
    assert (got.served.key if got.served else None) == found


def test_listed() -> None:
    assert listed(ALPHA, DEPLOYMENTS) == ["chat", "embed"]
    assert listed(BETA_CODER, DEPLOYMENTS) == ["coder"]
    assert listed(BOTH, DEPLOYMENTS) == ["alpha/chat", "alpha/embed", "beta/chat", "beta/coder"]
