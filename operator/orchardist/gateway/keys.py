"""API keys held in Secrets: what each may use and how fast.

A key Secret carries the label ``orchardist.io/gateway-key=true`` and, in ``data``:

- ``key``: the bearer token clients send (required);
- ``namespaces``: namespaces whose every ModelDeployment the key may use (comma or newline separated);
- ``models``: single deployments as ``namespace/name`` (a bare ``name`` is one in the Secret's own
  namespace);
- ``requestsPerMinute``, ``tokensPerMinute``: optional limits (absent: unlimited).

A Secret without a usable ``key`` is skipped with a warning. A key's name in metrics and logs is its
Secret's ``namespace/name``, never the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchardist import log

LOG = log.get(__name__)

LABEL = "orchardist.io/gateway-key"
SELECTOR = f"{LABEL}=true"


@dataclass(frozen=True)
class ApiKey:
    """One key's grants and limits."""

    name: str
    namespaces: frozenset[str] = frozenset()
    #: (namespace, deployment name)
    models: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def allows(self, namespace: str, name: str) -> bool:
        """Whether this key may use ModelDeployment ``namespace/name``."""
        return namespace in self.namespaces or (namespace, name) in self.models

    @property
    def home(self) -> str | None:
        """The namespace a bare model name means: the key's one namespace, if it has exactly one."""
        spaces = self.namespaces | {ns for ns, _ in self.models}
        return next(iter(spaces)) if len(spaces) == 1 else None


def digest(token: str) -> str:
    """Keys are looked up by digest, so no token is kept as a dictionary key or compared by prefix."""
    return hashlib.sha256(token.encode()).hexdigest()


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text) if w]


def _rate(value: str | None, what: str, secret: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        rate = float(value)
    except ValueError:
        LOG.warning("key Secret has a limit that is not a number; ignored", secret=secret, field=what)
        return None
    return rate if rate > 0 else None


def decode(data: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data`` as text (entries that are not base64 UTF-8 are dropped)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        try:
            out[k] = base64.b64decode(str(v), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            continue
    return out


def parse(secret: Mapping[str, Any]) -> tuple[str, ApiKey] | None:
    """(token digest, key) from a key Secret, or None when it holds no usable key."""
    meta = secret.get("metadata") or {}
    name = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    data = decode(secret.get("data") or {})
    token = data.get("key", "").strip()
    if not token:
        LOG.warning("key Secret has no data.key; skipped", secret=name)
        return None
    models: set[tuple[str, str]] = set()
    for word in _words(data.get("models", "")):
        ns, _, md = word.rpartition("/")
        models.add((ns or str(meta.get("namespace", "")), md))
    key = ApiKey(
        name=name,
        namespaces=frozenset(_words(data.get("namespaces", ""))),
        models=frozenset(models),
        requests_per_minute=_rate(data.get("requestsPerMinute"), "requestsPerMinute", name),
        tokens_per_minute=_rate(data.get("tokensPerMinute"), "tokensPerMinute", name),
    )
    return digest(token), key


class KeyRing:
    """The keys of the watched Secrets, fed by an informer's deliveries."""

    def __init__(self) -> None:
        self._by_secret: dict[str, tuple[str, ApiKey]] = {}
        self._by_digest: dict[str, ApiKey] = {}

    def replace(self, secrets: list[Mapping[str, Any]]) -> None:
        self._by_secret = {}
        for secret in secrets:
            self._put(secret)
        self._index()

    def upsert(self, secret: Mapping[str, Any]) -> None:
        self._put(secret)
        self._index()

    def remove(self, secret: Mapping[str, Any]) -> None:
        self._by_secret.pop(_secret_id(secret), None)
        self._index()

    def lookup(self, token: str) -> ApiKey | None:
        return self._by_digest.get(digest(token))

    def __len__(self) -> int:
        return len(self._by_digest)

    def _put(self, secret: Mapping[str, Any]) -> None:
        parsed = parse(secret)
        if parsed is None:
            self._by_secret.pop(_secret_id(secret), None)
        else:
            self._by_secret[_secret_id(secret)] = parsed

    def _index(self) -> None:
        self._by_digest = {d: key for d, key in self._by_secret.values()}


def _secret_id(secret: Mapping[str, Any]) -> str:
    meta = secret.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
