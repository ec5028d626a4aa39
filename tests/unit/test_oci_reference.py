"""Reference parsing follows `docker pull`; plain HTTP only for loopback or listed registries."""

from __future__ import annotations

import pytest

from orchardist.oci.errors import InvalidReferenceError
from orchardist.oci.reference import Reference, is_loopback, parse, scheme_for

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest"),
    [
        ("ai/smollm2:360M", "registry-1.docker.io", "ai/smollm2", "360M", None),
        ("ubuntu", "registry-1.docker.io", "library/ubuntu", "latest", None),
        ("docker.io/ubuntu:24.04", "registry-1.docker.io", "library/ubuntu", "24.04", None),
        ("index.docker.io/ai/qwen3", "registry-1.docker.io", "ai/qwen3", "latest", None),
        ("oci://127.0.0.1:5000/models/tiny:v1", "127.0.0.1:5000", "models/tiny", "v1", None),
        ("localhost/models/tiny", "localhost", "models/tiny", "latest", None),
        ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", "t", None),
        (f"ghcr.io/org/model@{D}", "ghcr.io", "org/model", None, D),
        (f"ghcr.io/org/model:v2@{D}", "ghcr.io", "org/model", "v2", D),
        ("oci://[::1]:5000/m:x", "[::1]:5000", "m", "x", None),
        (
            "registry.example.com:443/my_org/my-model.v2:Q4_K_M",
            "registry.example.com:443",
            "my_org/my-model.v2",
            "Q4_K_M",
            None,
        ),
    ],
)
def test_parse(text: str, registry: str, repo: str, tag: str | None, digest: str | None) -> None:
    assert parse(text) == Reference(registry, repo, tag, digest)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "oci://",
        "https://r.io/m:1",
        "r.io/Models/Q:1",
        "r.io/m@sha256:abc",
        "r.io/m:bad tag",
        "r.io/m:-x",
        "r.io//m",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        parse(text)


def test_round_trip_and_pinned() -> None:
    r = parse("oci://127.0.0.1:5000/models/tiny:v1")
    assert str(r) == "oci://127.0.0.1:5000/models/tiny:v1"
    assert r.pinned(D) == f"oci://127.0.0.1:5000/models/tiny@{D}"
    assert r.with_digest(D).target == D
    assert r.target == "v1"


@pytest.mark.parametrize(
    ("host", "loop"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("10.0.0.1", False),
        ("example.com", False),
        ("128.0.0.1", False),
    ],
)
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


@pytest.mark.parametrize(
    ("text", "insecure", "scheme"),
    [
        ("oci://127.0.0.1:5000/m", (), "http"),
        ("oci://localhost:5000/m", (), "http"),
        ("oci://10.0.0.5:5000/m", (), "https"),
        ("oci://10.0.0.5:5000/m", ("10.0.0.5:5000",), "http"),
        ("oci://10.0.0.5:5000/m", ("10.0.0.5",), "http"),
        ("oci://10.0.0.5:5000/m", ("10.0.0.6",), "https"),
        ("ai/smollm2", (), "https"),
    ],
)
def test_scheme(text: str, insecure: tuple[str, ...], scheme: str) -> None:
    assert scheme_for(parse(text), insecure) == scheme
