"""HTTP checks of an engine (the engine's own API is the adapter): health route and a tiny completion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp


def _url(host: str, port: int, path: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}{path}"


async def health(session: aiohttp.ClientSession, host: str, port: int, path: str, *, within: float) -> bool:
    try:
        async with session.get(_url(host, port, path), timeout=aiohttp.ClientTimeout(total=within)) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def completion(
    session: aiohttp.ClientSession,
    host: str,
    port: int,
    path: str,
    body: Mapping[str, Any],
    *,
    api_key: str | None,
    within: float,
) -> str | None:
    """None when the engine generated a token; otherwise why not (for the condition message)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.post(
            _url(host, port, path),
            json=dict(body),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=within),
        ) as r:
            text = await r.text()
            if r.status != 200:
                return f"{path} answered {r.status}: {text[:300]}"
            try:
                doc = await r.json(content_type=None)
            except ValueError:
                return f"{path} answered a non-JSON body: {text[:300]}"
            if not isinstance(doc, dict) or not doc.get("choices"):
                return f"{path} answered without choices: {text[:300]}"
            return None
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return f"{path} failed: {e.__class__.__name__}: {e}"
