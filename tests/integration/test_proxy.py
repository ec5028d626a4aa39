"""The replica proxy in front of a real engine (mlx_lm.server on the tiny Llama) and of a scripted one.

Without the key nothing reaches the engine on any path; with it the openai SDK chats through the
proxy; a request naming another model is refused before the engine sees it (so it never loads
it); oversized bodies get 413; streamed chunks pass one by one; hop-by-hop headers stop here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from orchardist.api.modelreplica import ModelReplicaSpec
from orchardist_agent.config import AgentConfig
from orchardist_agent.engine_adapter import NO_KEY_WARNING, EngineAdapter
from orchardist_agent.engines import EngineSpec, Plan, Runtime
from orchardist_agent.proxy import ProxyServer, Route, server
from orchardist_agent.supervisor import Supervisor, SupervisorConfig
from tests.fixtures.wait import async_wait_for

KEY = "k3y-for-team-a"
SERVED = "team-llm"
PLAN = Plan(kv_budget_bytes=64 << 20, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512)
FAST = SupervisorConfig(ready_timeout=120, probe_interval=1.0, stop_timeout=10, tick=0.2)
ROUTES = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/default_model"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("DELETE", "/v1/chat/completions"),
]


@dataclass
class Served:
    proxy: ProxyServer
    base: str  # the proxy's http://host:port
    engine_log: Path
    route: Route

    def engine_requests(self) -> list[str]:
        """The request lines the engine logged (BaseHTTPRequestHandler's access log)."""
        return [
            ln
            for ln in self.engine_log.read_text(errors="replace").splitlines()
            if '"' in ln and "HTTP/1." in ln
        ]


@pytest.fixture(scope="module")
async def served(
    mlx_runtime: Runtime, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Served]:
    tmp = tmp_path_factory.mktemp("proxy")
    sup = Supervisor(tmp / "state", tmp / "logs", config=FAST)
    spec = EngineSpec(
        engine="mlx-lm", runtime=mlx_runtime, model_dir=tiny_model, plan=PLAN, served_model_name=SERVED
    )
    st = await sup.ensure("team/llm-0", spec)
    ready = await sup.wait("team/llm-0", {"Ready"}, within=120)
    assert ready.endpoint is not None and ready.endpoint.startswith("127.0.0.1:")
    port = int(ready.endpoint.rsplit(":", 1)[1])
    route = Route(
        served_model=SERVED,
        upstream_model="default_model",
        upstream_port=port,
        api_key=KEY,
        max_body_bytes=64 * 1024,
    )
    proxy = ProxyServer("127.0.0.1")
    public = await proxy.serve("team/llm-0", route)
    try:
        yield Served(proxy, f"http://127.0.0.1:{public}", tmp / "logs" / "team%2Fllm-0.log", route)
    finally:
        await proxy.close_all()
        await sup.shutdown()
    assert st.key == "team/llm-0"


@pytest.mark.engine
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY[:-1]}", KEY])
async def test_every_route_refuses_without_the_key(served: Served, auth: str | None) -> None:
    before = served.engine_requests()
    headers = {"Authorization": auth} if auth else {}
    async with aiohttp.ClientSession() as http:
        for method, path in ROUTES:
            body = (
                {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]}
                if method == "POST"
                else None
            )
            async with http.request(method, served.base + path, json=body, headers=headers) as r:
                doc = await r.json()
                assert r.status == 401, (method, path)
                assert r.headers["WWW-Authenticate"] == "Bearer"
                assert (
                    doc["error"]["code"] == "invalid_api_key"
                    and doc["error"]["type"] == "invalid_request_error"
                )
    assert served.engine_requests() == before  # nothing reached the engine


@pytest.mark.engine
async def test_with_the_key_the_openai_sdk_chats_through_the_proxy(served: Served) -> None:
    stats = served.proxy.stats("team/llm-0")
    assert stats is not None
    done, prompt = stats.completed, stats.prompt_tokens
    client = openai.AsyncOpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        models = await client.models.list()
    finally:
        await client.close()
    assert chat.choices and chat.usage is not None and chat.usage.completion_tokens >= 1
    assert models.data  # GET routes pass too, with the key
    assert stats.completed == done + 2
    assert stats.prompt_tokens == prompt + chat.usage.prompt_tokens
    assert (stats.in_flight, stats.waiting) == (0, 0)
    assert any("POST /v1/chat/completions" in ln for ln in served.engine_requests())


@pytest.mark.engine
@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        ({"model": "mlx-community/Qwen3-0.6B-4bit"}, 404, "model_not_found"),
        ({"model": "/etc"}, 404, "model_not_found"),
        ({"model": SERVED, "adapters": "/tmp"}, 400, "unsupported_parameter"),
        ({"model": SERVED, "draft_model": "mlx-community/Qwen3-0.6B-4bit"}, 400, "unsupported_parameter"),
    ],
)
async def test_another_model_is_refused_before_the_engine_sees_it(
    served: Served, extra: dict[str, str], status: int, code: str
) -> None:
    before = served.engine_requests()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | extra
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            served.base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r,
    ):
        doc = await r.json()
    assert (r.status, doc["error"]["code"]) == (status, code)
    assert served.engine_requests() == before
    log = served.engine_log.read_text(errors="replace")
    assert "Qwen3" not in log and "Fetching" not in log  # the engine never tried to load it


@pytest.mark.engine
async def test_the_served_name_and_a_missing_model_reach_the_pinned_model(served: Served) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for model in (SERVED, None):
            body: dict[str, object] = {"prompt": "Hi", "max_tokens": 2}
            if model is not None:
                body["model"] = model
            async with http.post(served.base + "/v1/completions", json=body) as r:
                doc = await r.json()
                assert r.status == 200, doc
                assert doc["model"] == "default_model"  # the weights the engine was started with


@pytest.mark.engine
async def test_an_oversized_body_is_413_declared_or_chunked(served: Served) -> None:
    before = served.engine_requests()
    big = json.dumps({"model": SERVED, "prompt": "x" * (served.route.max_body_bytes + 1)}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for data in (big, chunked()):
            async with http.post(served.base + "/v1/completions", data=data) as r:
                doc = await r.json()
                assert (r.status, doc["error"]["code"]) == (413, "request_too_large")
    assert served.engine_requests() == before


@pytest.mark.engine
async def test_a_real_stream_passes_through_with_its_usage_counted(served: Served) -> None:
    stats = served.proxy.stats("team/llm-0")
    assert stats is not None
    completion = stats.completion_tokens
    client = openai.AsyncOpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": "Count to ten"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    finally:
        await client.close()
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(chunks) >= 3 and len(usage) == 1
    assert stats.completion_tokens == completion + usage[0].completion_tokens


# ---- a scripted engine: what a real one cannot be made to do on cue --------------------------------


@dataclass
class Scripted:
    base: str
    proxy: ProxyServer
    release: asyncio.Event
    seen_headers: list[dict[str, str]]


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    release = asyncio.Event()
    seen: list[dict[str, str]] = []

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(dict(request.headers))
        if request.path == "/stream":
            reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await reply.prepare(request)
            await reply.write(b'data: {"n": 1}\n\n')
            await release.wait()  # the second chunk only once the client holds the first
            await reply.write(b'data: {"n": 2, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n')
            await reply.write_eof()
            return reply
        return web.json_response(
            {"ok": True},
            headers={
                "Connection": "X-Engine-Hop",
                "X-Engine-Hop": "1",
                "Keep-Alive": "timeout=9",
                "X-Kept": "1",
            },
        )

    runner = web.ServerRunner(web.Server(handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = runner.addresses[0][1]
    proxy = ProxyServer("127.0.0.1")
    port = await proxy.serve(
        "t/s", Route(served_model="m", upstream_model="m", upstream_port=upstream, api_key=KEY)
    )
    try:
        yield Scripted(f"http://127.0.0.1:{port}", proxy, release, seen)
    finally:
        release.set()
        await proxy.close_all()
        await runner.cleanup()


async def test_a_stream_is_passed_on_chunk_by_chunk(scripted: Scripted) -> None:
    """The first event arrives while the engine still holds back the second: nothing is buffered."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.get(scripted.base + "/stream") as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), timeout=10)
        assert first == b'data: {"n": 1}\n\n'
        stats = scripted.proxy.stats("t/s")
        assert stats is not None and (stats.in_flight, stats.waiting) == (1, 0)
        scripted.release.set()
        rest = await asyncio.wait_for(r.content.read(), timeout=10)
    assert b'"n": 2' in rest
    await async_wait_for(lambda: stats.completed == 1, timeout=5, message="the relay finished")
    assert (stats.prompt_tokens, stats.completion_tokens, stats.in_flight) == (3, 2, 0)


async def test_hop_by_hop_headers_stop_at_the_proxy(scripted: Scripted) -> None:
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "secret",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eDp5",
        "X-Request-Id": "abc",
    }
    async with aiohttp.ClientSession() as http, http.get(scripted.base + "/plain", headers=headers) as r:
        assert r.status == 200 and await r.json() == {"ok": True}
        assert r.headers.get("X-Kept") == "1"
        assert "X-Engine-Hop" not in r.headers and "Keep-Alive" not in r.headers
    [got] = scripted.seen_headers
    lowered = {k.lower(): v for k, v in got.items()}
    assert {"x-client-hop", "te", "proxy-authorization"}.isdisjoint(lowered)
    assert lowered["authorization"] == f"Bearer {KEY}" and lowered["x-request-id"] == "abc"


async def test_a_body_that_never_arrives_is_cut_off_with_408(
    scripted: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 0.5)
    port = int(scripted.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    writer.write(f'{head}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"prompt":'.encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"}}"), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer
    assert b'"request_timeout"' in answer and b"within 0.5 s" in answer
    assert scripted.seen_headers == []  # nothing reached the engine


async def test_an_engine_that_is_down_is_a_502_in_openai_shape(scripted: Scripted) -> None:
    route = scripted.proxy.route("t/s")
    assert route is not None
    with_dead = replace(route, upstream_port=1)  # nothing listens on port 1
    scripted.proxy.reroute("t/s", with_dead)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        http.get(scripted.base + "/v1/models") as r,
    ):
        doc = await r.json()
    assert (r.status, doc["error"]["code"], doc["error"]["type"]) == (
        502,
        "engine_unavailable",
        "server_error",
    )
    stats = scripted.proxy.stats("t/s")
    assert stats is not None and stats.failed == 1 and stats.waiting == 0


# ---- the agent's engine adapter: engine, proxy and endpoint together --------------------------------


def replica_spec() -> ModelReplicaSpec:
    mib, digest = 2**20, "sha256:" + "a" * 64
    plan = {
        "weightBytes": 4 * mib,
        "overheadBytes": 64 * mib,
        "kvBudgetBytes": 64 * mib,
        "kvBytesPerToken": 512,
        "blockSize": 16,
        "numBlocks": 8192,
        "maxModelLen": 512,
        "maxNumSeqs": 2,
        "maxNumBatchedTokens": 512,
        "gpuMemoryUtilization": 0.92,
        "reservedBytes": 256 * mib,
    }
    return ModelReplicaSpec.model_validate(
        {
            "nodeName": "mac",
            "deployment": "tiny",
            "model": f"oci://registry.test/tiny@{digest}",
            "digest": digest,
            "engine": "mlx-lm",
            "servedModelName": "tiny",
            "memoryPlan": plan,
        }
    )


@pytest.mark.engine
async def test_the_proxy_follows_an_engine_the_supervisor_moved(
    mlx_runtime: Runtime, tiny_model: Path, tmp_path: Path
) -> None:
    """The view's port is the proxy's and stays put; when a restarted engine finds its port taken
    and moves, the proxy sends the next requests to the new port."""
    cfg = AgentConfig(
        node_name="mac",
        store=tmp_path / "store",
        state_dir=tmp_path / "state",
        runtimes={"mlx-lm": mlx_runtime.prefix},
    )
    sup = Supervisor(tmp_path / "state" / "engines", tmp_path / "logs", config=FAST)
    engines = EngineAdapter(cfg, sup, listen="127.0.0.1")
    await engines.start(lambda key: None)
    key = ("team", "tiny-0")
    blocker: socket.socket | None = None
    try:
        await engines.ensure(key, replica_spec(), tiny_model, None)
        first = await sup.wait("team/tiny-0", {"Ready"}, within=120)
        view = engines.view(key)
        assert view is not None and view.port is not None and first.endpoint is not None
        engine_port = int(first.endpoint.rsplit(":", 1)[1])
        assert view.port != engine_port and view.warnings == (NO_KEY_WARNING,)
        base = f"http://127.0.0.1:{view.port}"
        async with (
            aiohttp.ClientSession() as http,
            http.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}) as r,
        ):
            assert r.status == 200

        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        await sup.wait("team/tiny-0", {"CrashLoop"}, within=10)
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the proxy's TIME_WAITs
        blocker.bind(("127.0.0.1", engine_port))  # taken while the engine waits to restart
        blocker.listen()
        again = await sup.wait("team/tiny-0", {"Ready"}, within=120)
        assert again.endpoint is not None and int(again.endpoint.rsplit(":", 1)[1]) != engine_port
        moved = engines.view(key)
        assert moved is not None and moved.port == view.port  # the replica's endpoint did not change
        route = engines.proxy.route("team/tiny-0")
        assert route is not None and route.upstream_port == int(again.endpoint.rsplit(":", 1)[1])
        async with (
            aiohttp.ClientSession() as http,
            http.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}) as r,
        ):
            assert r.status == 200
    finally:
        if blocker is not None:
            blocker.close()
        await engines.close(stop_engines=True)
