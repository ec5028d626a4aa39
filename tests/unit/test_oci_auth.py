"""dockerconfigjson lookup, WWW-Authenticate parsing, Retry-After, index platform choice."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from orchardist.oci.auth import Credentials, from_dockerconfig, from_secret_data, parse_challenge
from orchardist.oci.client import retry_after_seconds
from orchardist.oci.errors import NotFoundError
from orchardist.oci.platforms import pick_platform
from orchardist.oci.reference import parse


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


CONFIG = {
    "auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpass")},
        "registry.example.com:5000": {"username": "u", "password": "p:with:colons"},
        "https://ghcr.io": {"auth": _b64("gh:tok")},
        "broken.example.com": {"auth": "%%%not-base64"},
    }
}


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("ai/smollm2:360M", Credentials("hubuser", "hubpass")),
        ("docker.io/library/ubuntu", Credentials("hubuser", "hubpass")),
        ("registry.example.com:5000/m:1", Credentials("u", "p:with:colons")),
        ("registry.example.com/m:1", None),  # the port is part of the key
        ("ghcr.io/org/m:1", Credentials("gh", "tok")),
        ("broken.example.com/m", None),
        ("quay.io/m", None),
    ],
)
def test_from_dockerconfig(ref: str, expected: Credentials | None) -> None:
    assert from_dockerconfig(CONFIG, parse(ref)) == expected


def test_from_secret_data() -> None:
    data = {".dockerconfigjson": _b64(json.dumps(CONFIG))}
    assert from_secret_data(data, parse("ghcr.io/org/m")) == Credentials("gh", "tok")
    assert from_secret_data({}, parse("ghcr.io/org/m")) is None


def test_credentials_never_print_the_password() -> None:
    c = Credentials("u", "hunter2")
    assert "hunter2" not in repr(c)
    assert c.basic_header() == "Basic " + _b64("u:hunter2")


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        (
            'Bearer realm="https://auth.example.io/token",service="registry.example.io",scope="repository:ai/x:pull"',
            "bearer",
            {
                "realm": "https://auth.example.io/token",
                "service": "registry.example.io",
                "scope": "repository:ai/x:pull",
            },
        ),
        ('Basic realm="orchardist"', "basic", {"realm": "orchardist"}),
        ("Bearer realm=http://h/t,service=s", "bearer", {"realm": "http://h/t", "service": "s"}),
        (
            'Bearer realm="r",scope="repository:a:pull,push"',
            "bearer",
            {"realm": "r", "scope": "repository:a:pull,push"},
        ),
    ],
)
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    ch = parse_challenge(header)
    assert ch is not None and ch.scheme == scheme and ch.params == params


def test_parse_challenge_empty() -> None:
    assert parse_challenge("") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7", 7.0), (None, None), ("", None), ("soon", None), ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0)],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    now = 1767225600.0  # 2026-01-01T00:00:00Z
    assert retry_after_seconds(value, now=now) == expected


def _entry(os_: str, arch: str, d: str) -> dict[str, Any]:
    return {"digest": d, "platform": {"os": os_, "architecture": arch}}


@pytest.mark.parametrize(
    ("entries", "picked"),
    [
        ([_entry("linux", "amd64", "a"), _entry("darwin", "arm64", "b")], "b"),
        ([_entry("linux", "arm64", "a")], "a"),
        ([{"digest": "x"}], "x"),
        ([_entry("linux", "arm64", "a"), _entry("unknown", "unknown", "att")], "a"),
    ],
)
def test_pick_platform(entries: list[dict[str, Any]], picked: str) -> None:
    assert pick_platform({"manifests": entries}, parse("r.io/m"))["digest"] == picked


def test_pick_platform_ambiguous() -> None:
    with pytest.raises(NotFoundError, match="linux/amd64, linux/arm64"):
        pick_platform(
            {"manifests": [_entry("linux", "amd64", "a"), _entry("linux", "arm64", "b")]}, parse("r.io/m")
        )
