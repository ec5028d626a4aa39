"""Bearer-token auth and rate limits, through a loopback token gateway in front of the real registry.

The gateway plays the part a hosted registry's auth server plays: it answers ``/v2`` with a
``WWW-Authenticate: Bearer`` challenge, issues tokens at ``/token`` for basic credentials, can answer
429 or 503 (with or without ``Retry-After``), and forwards authorized requests to the real
``docker-registry``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from orchardist.oci.auth import Credentials
from orchardist.oci.errors import AuthRequiredError, RateLimitedError
from orchardist.oci.push import push
from orchardist.oci.store import ContentStore
from tests.fixtures.registry import make_safetensors_model

pytestmark = pytest.mark.registry
GiB = 1 << 30
_HOP = {"host", "authorization", "content-length", "transfer-encoding", "connection"}


class Gateway:
    def __init__(self, upstream: str, username: str, password: str) -> None:
        self.upstream = upstream
        self.expected = Credentials(username, password).basic_header()
        self.tokens: dict[str, str] = {}
        self.token_requests: list[dict[str, str]] = []
        self.rate_limit_next = 0
        self.retry_after = "1"  # "" sends no Retry-After header
        self.rate_limit_status = 429
        self.served_busy = 0
        self.host = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> Gateway:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_route("*", "/v2/{tail:.*}", self.v2)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.host = f"127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def close(self) -> None:
        if self._session:
            await self._session.close()
        if self._runner:
            await self._runner.cleanup()

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(dict(request.query))
        given = request.headers.get("Authorization", "")
        if given != self.expected:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        token = secrets.token_hex(8)
        self.tokens[token] = request.query.get("scope", "")
        return web.json_response({"token": token, "expires_in": 300})

    async def v2(self, request: web.Request) -> web.StreamResponse:
        if self.rate_limit_next > 0:
            self.rate_limit_next -= 1
            self.served_busy += 1
            return web.json_response(
                {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
                status=self.rate_limit_status,
                headers={"Retry-After": self.retry_after} if self.retry_after else {},
            )
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or given[7:] not in self.tokens:
            parts = request.path.split("/")
            marker = next(
                i for i, p in enumerate(parts) if p in ("manifests", "blobs", "tags") or i == len(parts) - 1
            )
            repo = "/".join(parts[2:marker])
            action = "pull" if request.method in ("GET", "HEAD") else "pull,push"
            challenge = f'Bearer realm="http://{self.host}/token",service="gateway",scope="repository:{repo}:{action}"'
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]}, status=401, headers={"WWW-Authenticate": challenge}
            )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method,
            f"http://{self.upstream}{request.path_qs}",
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            if "Location" in out:
                out["Location"] = out["Location"].replace(self.upstream, self.host)
            return web.Response(
                status=up.status, body=body if request.method != "HEAD" else None, headers=out
            )


@pytest.fixture
async def gateway(registry: str) -> AsyncIterator[Gateway]:
    gw = await Gateway(registry, "robot", "s3cret").start()
    yield gw
    await gw.close()


async def test_bearer_token_flow_push_and_pull(gateway: Gateway, tmp_path: Path) -> None:
    model = make_safetensors_model(tmp_path / "m")
    repo = f"test/bearer-{secrets.token_hex(3)}"
    ref = f"oci://{gateway.host}/{repo}:v1"
    creds = Credentials("robot", "s3cret")

    await push(model, ref, auth=creds)
    got = await ContentStore(tmp_path / "store", GiB).pull(ref, auth=creds)

    assert (got.path / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    scopes = {r.get("scope") for r in gateway.token_requests}
    assert f"repository:{repo}:pull" in scopes
    assert f"repository:{repo}:pull,push" in scopes
    assert all(r.get("service") == "gateway" for r in gateway.token_requests)


async def test_bearer_without_or_with_wrong_credentials(gateway: Gateway, tmp_path: Path) -> None:
    ref = f"oci://{gateway.host}/test/bearer-none:v1"
    store = ContentStore(tmp_path / "store", GiB)
    with pytest.raises(AuthRequiredError, match="no credentials"):
        await store.pull(ref)
    with pytest.raises(AuthRequiredError, match="rejected the credentials"):
        await store.pull(ref, auth=Credentials("robot", "wrong"))


async def test_rate_limit_honours_retry_after(gateway: Gateway, tmp_path: Path) -> None:
    model = make_safetensors_model(tmp_path / "m")
    ref = f"oci://{gateway.host}/test/ratelimit-{secrets.token_hex(3)}:v1"
    creds = Credentials("robot", "s3cret")
    await push(model, ref, auth=creds)

    gateway.rate_limit_next, gateway.retry_after = 2, "1"
    t0 = time.monotonic()
    got = await ContentStore(tmp_path / "a", GiB).pull(ref, auth=creds)
    waited = time.monotonic() - t0
    assert gateway.served_busy == 2
    assert waited >= 1.9  # two answers of Retry-After: 1 were waited out, not retried at once
    assert (got.path / "config.json").is_file()

    gateway.rate_limit_next, gateway.retry_after = 1, "3600"
    with pytest.raises(RateLimitedError, match="retry after 3600 s"):
        await ContentStore(tmp_path / "b", GiB).pull(ref, auth=creds)


async def test_busy_without_retry_after_backs_off_by_the_shared_policy(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 with no Retry-After: each retry waits what orchardist.retry says for that many failures."""
    import orchardist.retry

    model = make_safetensors_model(tmp_path / "m")
    ref = f"oci://{gateway.host}/test/busy-{secrets.token_hex(3)}:v1"
    creds = Credentials("robot", "s3cret")
    await push(model, ref, auth=creds)
    asked: list[int] = []
    real_delay = orchardist.retry.delay

    def watched(failures: int, *args: Any, **kwargs: Any) -> float:
        asked.append(failures)
        return real_delay(failures, *args, **kwargs)

    monkeypatch.setattr(orchardist.retry, "delay", watched)
    gateway.rate_limit_next, gateway.retry_after, gateway.rate_limit_status = 3, "", 503
    got = await ContentStore(tmp_path / "a", GiB).pull(ref, auth=creds)

    assert gateway.served_busy == 3 and asked == [1, 2, 3]
    assert (got.path / "config.json").is_file()
