"""Registry credentials (dockerconfigjson) and ``WWW-Authenticate`` challenges.

A ``kubernetes.io/dockerconfigjson`` Secret and ``~/.docker/config.json`` share one shape:
``{"auths": {"<host or URL>": {"auth": base64("user:pass")} | {"username", "password"} |
{"identitytoken"}}}``. The user's own config may also name credential helpers the way Docker
reads them: ``credHelpers`` (per registry) before ``credsStore`` (all registries), and with a
helper named, the helper alone answers (as ``docker`` does). Helpers run only for the user's own
config (:func:`from_user_config`), never for a Secret; everything else here is pure.
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

from orchardist.oci import credhelpers
from orchardist.oci.reference import DOCKER_HUB_ALIASES, Reference

_HUB_KEYS = ("https://index.docker.io/v1/", *DOCKER_HUB_ALIASES)


@dataclass(frozen=True)
class Credentials:
    """``identity_token``: ``password`` is an OAuth2 refresh token (Docker's ``identitytoken``),
    exchanged at the token realm instead of sent as Basic."""

    username: str
    password: str
    identity_token: bool = False

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    def __repr__(self) -> str:  # never print a password into a log
        kind = ", identity_token=True" if self.identity_token else ""
        return f"Credentials(username={self.username!r}, password=***{kind})"


def _host_of(key: str) -> str:
    key = key.strip().lower()
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def _wanted(ref: Reference) -> set[str]:
    wanted = {ref.registry.lower()}
    if ref.registry.lower() in DOCKER_HUB_ALIASES:
        wanted |= {_host_of(k) for k in _HUB_KEYS}
    return wanted


def helper_for(config: Mapping[str, Any], ref: Reference) -> str | None:
    """The credential helper Docker would ask for this registry: ``credHelpers``, else ``credsStore``."""
    helpers = config.get("credHelpers")
    if isinstance(helpers, Mapping):
        wanted = _wanted(ref)
        for key, name in helpers.items():
            if _host_of(str(key)) in wanted and isinstance(name, str) and name:
                return name
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def helper_server(ref: Reference) -> str:
    """The server URL a helper is asked for (Docker's key: Docker Hub's v1 URL, else the host)."""
    return _HUB_KEYS[0] if ref.registry.lower() in DOCKER_HUB_ALIASES else ref.registry


def from_dockerconfig(config: Mapping[str, Any], ref: Reference) -> Credentials | None:
    """The credentials a dockerconfigjson's ``auths`` hold for the reference's registry, if any."""
    auths = config.get("auths") or {}
    if not isinstance(auths, Mapping):
        return None
    wanted = _wanted(ref)
    for key, entry in auths.items():
        if _host_of(str(key)) not in wanted or not isinstance(entry, Mapping):
            continue
        if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
            return Credentials(str(entry.get("username") or ""), entry["identitytoken"], identity_token=True)
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
    """Credentials from the user's docker config (``$DOCKER_CONFIG/config.json`` or ``~/.docker``),
    through its credential helper when it names one (blocking: the helper is a program)."""
    if path is None:
        base = os.environ.get("DOCKER_CONFIG")
        path = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    helper = helper_for(config, ref)
    if helper is None:
        return from_dockerconfig(config, ref)
    reply = credhelpers.get(helper, helper_server(ref))
    if reply is None:
        return None
    return Credentials(reply.username, reply.secret, identity_token=reply.identity_token)


def token_form(credentials: Credentials, params: list[tuple[str, str]]) -> dict[str, str]:
    """The OAuth2 form that trades an identity token for a registry token (Docker's distribution
    token spec: ``grant_type=refresh_token``, scopes space-separated)."""
    form = {
        "grant_type": "refresh_token",
        "refresh_token": credentials.password,
        "client_id": "orchardist",
    }
    service = next((v for k, v in params if k == "service"), None)
    if service:
        form["service"] = service
    scopes = [v for k, v in params if k == "scope"]
    if scopes:
        form["scope"] = " ".join(scopes)
    return form


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
