"""Registry credentials (dockerconfigjson) and ``WWW-Authenticate`` challenges: pure functions.

A ``kubernetes.io/dockerconfigjson`` Secret and ``~/.docker/config.json`` share one shape:
``{"auths": {"<host or URL>": {"auth": base64("user:pass")} | {"username", "password"}}}``.
Credential helpers (``credsStore``) are not run: the agent has no desktop keychain.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchardist.oci.reference import DOCKER_HUB_ALIASES, Reference

_HUB_KEYS = ("https://index.docker.io/v1/", *DOCKER_HUB_ALIASES)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    def __repr__(self) -> str:  # never print a password into a log
        return f"Credentials(username={self.username!r}, password=***)"


def _host_of(key: str) -> str:
    key = key.strip().lower()
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def from_dockerconfig(config: Mapping[str, Any], ref: Reference) -> Credentials | None:
    """The credentials a dockerconfigjson holds for the reference's registry, if any."""
    auths = config.get("auths") or {}
    if not isinstance(auths, Mapping):
        return None
    wanted = {ref.registry.lower()}
    if ref.registry.lower() in DOCKER_HUB_ALIASES:
        wanted |= {_host_of(k) for k in _HUB_KEYS}
    for key, entry in auths.items():
        if _host_of(str(key)) not in wanted or not isinstance(entry, Mapping):
            continue
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(str(entry["username"]), str(entry["password"]))
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            if user:
                return Credentials(user, password)
    return None


def from_secret_data(data: Mapping[str, str], ref: Reference) -> Credentials | None:
    """Credentials from a Kubernetes Secret's ``data`` (base64 ``.dockerconfigjson``)."""
    raw = data.get(".dockerconfigjson")
    if raw is None:
        return None
    return from_dockerconfig(json.loads(base64.b64decode(raw)), ref)


def from_user_config(ref: Reference, path: Path | None = None) -> Credentials | None:
    """Credentials from the user's docker config (``$DOCKER_CONFIG/config.json`` or ``~/.docker``)."""
    if path is None:
        base = os.environ.get("DOCKER_CONFIG")
        path = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return from_dockerconfig(config, ref) if isinstance(config, dict) else None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" | "basic"
    params: dict[str, str]


_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), {k: v.replace('\\"', '"') for k, v in params.items()})


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in."""
    u = urllib.parse.urlsplit(url)
    scheme = u.scheme.lower()
    try:
        port = u.port
    except ValueError:
        port = -1  # an unparsable port matches no origin
    return (scheme, (u.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme))


def credential_refusal(base: str, realm: str) -> str | None:
    """Why Basic credentials must not go to ``realm``, or None when they may.

    A registry names its token realm, so a hostile or spoofed one could name any host: credentials
    go only back to the registry's own origin, or to an HTTPS realm (authenticated by TLS).
    """
    scheme = urllib.parse.urlsplit(realm).scheme.lower()
    if scheme not in ("http", "https"):
        return f"token realm {realm!r} is not an http(s) URL; credentials not sent"
    if scheme == "https" or origin(realm) == origin(base):
        return None
    return (
        f"token realm {realm!r} is another origin over plain HTTP; credentials are sent only to "
        "the registry itself or to an HTTPS realm"
    )
