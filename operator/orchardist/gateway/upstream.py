"""Calls to a replica's engine (or the agent's proxy in front of it), streamed or not.

The request body is pinned before it leaves: ``model`` becomes what the engine serves (mlx-lm loads
whatever model a request names, so it gets its ``default_model``; the others serve the deployment's
name) and mlx-lm's adapter and draft-model switches are dropped. Streams always ask for the final
usage chunk so tokens are metered. The answer's ``model`` is rewritten back to what the client asked.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from orchardist.gateway.catalog import Served
from orchardist.gateway.metering import StreamMeter
from orchardist.usage import Usage, usage_of

#: The response header naming the replica that answered (for people and tests; not secret).
REPLICA_HEADER = "X-Orchardist-Replica"
#: Statuses of an agent's proxy whose engine is gone or starting: try another replica.
RETRYABLE = frozenset({502, 503, 504})
MLX_DEFAULT = "default_model"
#: The status counted for a stream whose client disconnected (nginx's convention; never sent).
CLIENT_LEFT = 499


class RetryableError(Exception):
    """The replica failed before anything reached the client: another replica may serve it."""


def served_model(served: Served) -> str:
    return MLX_DEFAULT if served.engine == "mlx-lm" else served.name


def pinned(body: dict[str, Any], served: Served) -> tuple[dict[str, Any], bool]:
    """(the body to send upstream, whether the client asked for the usage chunk itself)."""
    out = {k: v for k, v in body.items() if k not in ("adapters", "draft_model")}
    out["model"] = served_model(served)
    asked = False
    if out.get("stream"):
        options = dict(out.get("stream_options") or {})
        asked = bool(options.get("include_usage"))
        options["include_usage"] = True
        out["stream_options"] = options
    return out, asked


def headers(upstream_key: str | None) -> dict[str, str]:
    out = {"Content-Type": "application/json"}
    if upstream_key:
        out["Authorization"] = f"Bearer {upstream_key}"
    return out


@dataclass
class Outcome:
    """What the metering needs from an answered request."""

    status: int
    usage: Usage | None = None
    first_token_at: float | None = None


async def call_json(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    hdrs: dict[str, str],
    asked_model: str,
    replica: str,
) -> tuple[web.Response, Outcome]:
    """A non-streamed call; connection failures and proxy 5xx raise :class:`RetryableError`."""
    try:
        async with session.post(url, json=body, headers=hdrs) as resp:
            raw = await resp.read()
            status = resp.status
            ctype = resp.content_type
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
        raise RetryableError(repr(exc)) from exc
    if status in RETRYABLE:
        raise RetryableError(f"upstream answered {status}")
    usage = None
    if ctype == "application/json":
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if isinstance(answer, dict):
            usage = usage_of(answer)
            if "model" in answer:
                answer["model"] = asked_model
                raw = json.dumps(answer).encode()
    answer_headers = {REPLICA_HEADER: replica}
    out = web.Response(
        body=raw, status=status, content_type=ctype or "application/json", headers=answer_headers
    )
    return out, Outcome(status, usage)


async def call_stream(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    hdrs: dict[str, str],
    *,
    asked_usage: bool,
    served_as: str,
    asked_model: str,
    replica: str,
    clock: Any,
) -> tuple[web.StreamResponse, Outcome]:
    """A streamed call, passed through as it arrives (nothing is held back but a partial line)."""
    try:
        resp = await session.post(url, json=body, headers=hdrs)
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise RetryableError(repr(exc)) from exc
    try:
        if resp.status in RETRYABLE:
            raise RetryableError(f"upstream answered {resp.status}")
        if resp.status != 200 or resp.content_type != "text/event-stream":
            raw = await resp.read()
            return web.Response(body=raw, status=resp.status, content_type=resp.content_type), Outcome(
                resp.status
            )
        out = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                REPLICA_HEADER: replica,
            },
        )
        await out.prepare(request)
        meter = StreamMeter(
            drop_usage_chunk=not asked_usage,
            model_from=f'"model": "{served_as}"'.encode() if served_as != asked_model else None,
            model_to=f'"model": {json.dumps(asked_model)}'.encode(),
        )
        outcome = Outcome(200)
        try:
            # Whatever arrived is passed on at once, in one write: complete lines go through the
            # meter, a partial last line waits for the rest of itself.
            pending = b""
            async for data in resp.content.iter_any():
                fast = None if pending or not data.endswith(b"\n") else meter.passthrough(data)
                if fast is not None:
                    passed = fast
                else:
                    *lines, pending = (pending + data).split(b"\n")
                    passed = b"".join(p for p in (meter.line(x + b"\n") for x in lines) if p is not None)
                if meter.first_token and outcome.first_token_at is None:
                    outcome.first_token_at = clock()
                if passed and not await _write(out, passed):
                    # The client left (a reader that stops at its first token does): stop reading
                    # the engine; releasing an unfinished response closes it, ending the generation.
                    outcome.status, outcome.usage = CLIENT_LEFT, meter.usage
                    return out, outcome
            if pending and (last := meter.line(pending)) is not None:
                await _write(out, last)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # Tokens already reached the client: a retry would repeat them. End the stream as it is.
            outcome.status = 502
            await _write(out, f"data: {json.dumps({'error': {'message': repr(exc)}})}\n\n".encode())
        outcome.usage = meter.usage
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        return out, outcome
    finally:
        resp.release()


async def _write(out: web.StreamResponse, data: bytes) -> bool:
    """Send to the client at once; False when it has gone."""
    try:
        await out.write(data)
    except ConnectionError:
        return False
    return True
