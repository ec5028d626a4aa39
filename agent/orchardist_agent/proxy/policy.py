"""What the proxy lets through to an engine: pure decisions over a request's parts, tested as tables.

An engine on a shared Mac must answer only its deployment's clients and only as its own model:
the key is checked on every path (constant-time), a JSON body's ``model`` is pinned to the name
the engine knows, fields that make an engine load other weights (mlx-lm's ``adapters`` and
``draft_model``) are refused, and a body that is not a JSON object is refused before it reaches
the engine. Errors are shaped like OpenAI's (``{"error": {"message", "type", "code"}}``) so the
clients teams already use report them as such.
"""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchardist.usage import may_carry_usage, usage_of

#: Request fields that make an engine load weights other than the replica's (mlx-lm reads both).
LOADING_FIELDS = ("adapters", "draft_model")

#: Per RFC 9110 7.6.1; plus any header the Connection header names (see `forwarded_headers`).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True)
class Route:
    """One replica as its proxy serves it.

    ``served_model`` is the name clients use (the deployment's); ``upstream_model`` is the name the
    engine answers to (vLLM's ``--served-model-name``; mlx-lm's ``default_model``, the weights it
    was started with). ``api_key`` None means the deployment set no key: anyone who reaches the
    Mac's address may call the replica, and the model is still pinned.
    """

    served_model: str
    upstream_model: str
    upstream_port: int
    api_key: str | None = None
    upstream_host: str = "127.0.0.1"
    max_body_bytes: int = 4 << 20


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    type: str
    code: str

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


@dataclass(frozen=True)
class Forward:
    """Send the request on with this body (None: the body is unchanged or absent)."""

    body: bytes | None = None


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def authorized(header: str | None, api_key: str | None) -> bool:
    """True when no key is set, or the header is ``Bearer <key>`` (compared in constant time)."""
    if api_key is None:
        return True
    if header is None:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


UNAUTHORIZED = Refusal(
    401,
    "Missing or invalid API key: send 'Authorization: Bearer <key>' with the deployment's key.",
    "invalid_request_error",
    "invalid_api_key",
)


def too_large(limit: int) -> Refusal:
    return Refusal(413, f"Request body exceeds {limit} bytes.", "invalid_request_error", "request_too_large")


def admit(body: bytes, content_type: str, route: Route) -> Forward | Refusal:
    """Pin a request body to the replica's model, or say why it is refused.

    An empty body passes as is (GET /v1/models, /health). Any other body must be a JSON object:
    the engines' APIs take nothing else, and an unparsed body could not be pinned.
    """
    if not body:
        return Forward()
    if content_type and "json" not in content_type.lower():
        return Refusal(
            415,
            f"Unsupported content type {content_type!r}: send application/json.",
            "invalid_request_error",
            "unsupported_media_type",
        )
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return Refusal(400, f"Request body is not valid JSON: {exc}", "invalid_request_error", "invalid_json")
    if not isinstance(doc, dict):
        return Refusal(400, "Request body must be a JSON object.", "invalid_request_error", "invalid_json")
    for name in LOADING_FIELDS:
        if name in doc:
            return Refusal(
                400,
                f"Field {name!r} is not allowed: this endpoint serves only {route.served_model!r}.",
                "invalid_request_error",
                "unsupported_parameter",
            )
    asked = doc.get("model")
    if asked is not None and asked not in (route.served_model, route.upstream_model):
        return Refusal(
            404,
            f"The model {asked!r} does not exist here; this endpoint serves {route.served_model!r}.",
            "invalid_request_error",
            "model_not_found",
        )
    if asked == route.upstream_model:
        return Forward()
    doc["model"] = route.upstream_model
    return Forward(json.dumps(doc).encode())


def forwarded_headers(headers: Mapping[str, str], connection: str | None) -> dict[str, str]:
    """Headers for the next hop: hop-by-hop ones, those the Connection header names, Host and
    Content-Length dropped (the client session sets them for the new connection and body)."""
    named = {h.strip().lower() for h in (connection or "").split(",") if h.strip()}
    drop = HOP_BY_HOP | named | {"host", "content-length"}
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def _counts(doc: object) -> tuple[int, int] | None:
    usage = usage_of(doc)
    return None if usage is None else (usage.prompt_tokens, usage.completion_tokens)


class UsageScanner:
    """Finds ``usage`` in a response as it streams by: a JSON body, or SSE ``data:`` lines.

    Only lines that mention usage are parsed, and a partial line is kept at most ``max_line``
    bytes, so scanning costs little and a hostile engine cannot grow the proxy's memory.
    """

    def __init__(self, *, sse: bool, max_line: int = 1 << 20) -> None:
        self.sse = sse
        self.max_line = max_line
        self.found: tuple[int, int] | None = None
        self._buf = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        if self._overflow:
            return
        self._buf += chunk
        if not self.sse:
            if len(self._buf) > self.max_line:
                self._overflow, self._buf = True, bytearray()
            return
        *lines, rest = bytes(self._buf).split(b"\n")
        self._buf = bytearray(rest if len(rest) <= self.max_line else b"")
        for line in lines:
            self._line(line)

    def close(self) -> tuple[int, int] | None:
        if self._overflow:
            return self.found
        if self.sse:
            self._line(bytes(self._buf))
        elif self._buf and b'"usage"' in self._buf:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                self.found = _counts(json.loads(bytes(self._buf))) or self.found
        self._buf = bytearray()
        return self.found

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:") or not may_carry_usage(line):
            return
        try:
            found = _counts(json.loads(line[5:]))
        except (ValueError, UnicodeDecodeError):
            return
        if found is not None:
            self.found = found
