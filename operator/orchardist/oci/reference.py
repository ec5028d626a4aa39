"""Model references: ``oci://host[:port]/repo[:tag|@sha256:...]`` and Docker Hub short names.

Parsing follows ``docker pull``: the first path component is a registry host only when it holds a
``.`` or ``:`` or is ``localhost``; otherwise the reference is on Docker Hub, and a single name gets
``library/``. Plain HTTP is used only for loopback registries and hosts the user lists as insecure.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from orchardist.oci.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``registry`` is the API host (``host[:port]``), never ``docker.io``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def host(self) -> str:
        """The host without the port (IPv6 without brackets)."""
        h = self.registry
        if h.startswith("["):
            return h[1 : h.index("]")]
        return h.rsplit(":", 1)[0] if ":" in h else h

    @property
    def target(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def pinned(self, digest: str) -> str:
        """The pinned form written into specs: ``oci://registry/repo@sha256:...``."""
        return f"oci://{self.registry}/{self.repository}@{digest}"

    def __str__(self) -> str:
        s = f"oci://{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (where docker also allows plain HTTP)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def scheme_for(ref: Reference, insecure: Iterable[str] = ()) -> str:
    """``http`` for loopback and listed insecure registries (``host`` or ``host:port``), else ``https``."""
    listed = {h.strip().lower() for h in insecure}
    if is_loopback(ref.host) or ref.registry.lower() in listed or ref.host.lower() in listed:
        return "http"
    return "https"


def parse(text: str) -> Reference:
    """Parse a reference the way ``docker pull`` does; ``oci://`` is optional."""
    raw = text.strip()
    s = raw.removeprefix("oci://")
    if not s or "://" in s:
        raise InvalidReferenceError(
            f"invalid model reference {raw!r}: expected oci://host[:port]/repo[:tag|@sha256:...]"
        )
    digest: str | None = None
    if "@" in s:
        s, digest = s.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise InvalidReferenceError(f"invalid digest in {raw!r}: expected sha256:<64 lowercase hex>")
    first, _, rest = s.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _HOST.fullmatch(registry):
            raise InvalidReferenceError(f"invalid registry host {registry!r} in {raw!r}")
    else:
        registry, path = DOCKER_HUB, s
    tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r} in {raw!r}")
    if registry.lower() in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB_API
        if "/" not in path:
            path = f"library/{path}"
    if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise InvalidReferenceError(
            f"invalid repository {path!r} in {raw!r}: lowercase letters, digits and . _ - separators only"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)
