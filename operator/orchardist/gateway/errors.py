"""Errors in the OpenAI shape, so SDKs raise their own typed exceptions (AuthenticationError, ...)."""

from __future__ import annotations

from aiohttp import web

#: status -> (OpenAI error type, code)
KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "model_not_allowed"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    502: ("api_error", "upstream_error"),
    503: ("api_error", "no_replica_ready"),
}


def error(status: int, message: str, *, retry_after: int | None = None) -> web.Response:
    kind, code = KINDS.get(status, ("api_error", "error"))
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status=status,
        headers=headers,
    )
