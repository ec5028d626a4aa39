"""Peer transfer against real parts: a real registry (behind the counting proxy), real stores, the
agent's real peer server, and peers made to misbehave on purpose (wrong bytes, truncated, slow,
the wrong range). Whatever a peer does, the store ends with the model's exact files, and a pull
that peers cannot serve completes from the registry."""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from orchardist.oci.peering import BLOB_PATH, FETCHING, Claims, Peer
from orchardist.oci.peers import PeerLimits, PeerSource
from orchardist.oci.push import push
from orchardist.oci.store import ContentStore
from orchardist_agent.peer_auth import Verdict
from orchardist_agent.peer_server import PeerServer, ServeLimits
from tests.fixtures.registry import CuttingProxy, make_safetensors_model

pytestmark = pytest.mark.registry
GiB = 1 << 30
MiB = 1 << 20
TOKEN = "peer-" + secrets.token_hex(8)
WEIGHTS = 8 * MiB
FAST = PeerLimits(min_rate=1 * MiB, window=1.0, per_peer=2)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def one_token(token: str) -> Verdict:
    """A verifier that knows one token (transfer is under test here; the API server's TokenReview
    verifier is tested against the real apiserver in tests/e2e/test_peer_auth.py)."""
    if hmac.compare_digest(token.encode(), TOKEN.encode()):
        return Verdict(200, node="mac-test")
    return Verdict(401, reason="unknown token")


async def _served(store: ContentStore, claims: Claims | None = None, **kw: object) -> PeerServer:
    server = PeerServer(
        one_token,
        store.blob_path,
        store.index.blobs.get,
        claims or Claims(),
        **kw,  # type: ignore[arg-type]
    )
    await server.start("127.0.0.1", 0)
    return server


@pytest.fixture
async def model(registry: str, tmp_path: Path) -> tuple[Path, str]:
    """A model pushed to the real registry: its directory and its repository."""
    src = make_safetensors_model(tmp_path / "src", weight_bytes=WEIGHTS, seed=7)
    repo = f"test/peers-{secrets.token_hex(3)}"
    await push(src, f"oci://{registry}/{repo}:v1")
    return src, repo


SEED_BLOBS: list[str] = []


@pytest.fixture
async def seed(model: tuple[Path, str], registry: str, tmp_path: Path) -> AsyncIterator[PeerServer]:
    """A Mac that already holds the model, serving its store."""
    _, repo = model
    store = ContentStore(tmp_path / "seed", GiB)
    await store.pull(f"oci://{registry}/{repo}:v1")
    SEED_BLOBS[:] = list(store.index.blobs)
    server = await _served(store)
    yield server
    await server.close()
    store.close()


def _weights_digest(store: ContentStore) -> str:
    return next(d for d, n in store.index.blobs.items() if n > WEIGHTS)


Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@pytest.fixture
async def liar(seed: PeerServer) -> AsyncIterator[Callable[[Handler], Awaitable[Peer]]]:
    """Starts peers that answer HEAD truthfully (the seed's blob sizes) and GET as told."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Peer:
        async def route(request: web.Request) -> web.StreamResponse:
            digest = request.match_info["digest"]
            size = seed.blob_size(digest)
            if size is None:
                return web.Response(status=404)
            if request.method == "HEAD":
                return web.Response(headers={"Content-Length": str(size)})
            return await handler(request, seed.blob_path(digest).read_bytes())

        app = web.Application()
        app.router.add_route("GET", BLOB_PATH + "{digest}", route)
        app.router.add_route("HEAD", BLOB_PATH + "{digest}", route)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return Peer(f"liar-{len(runners)}", f"http://127.0.0.1:{port}")

    yield start
    for runner in runners:
        await runner.cleanup()


def _span(request: web.Request, size: int) -> tuple[int, int]:
    first, _, last = request.headers["Range"].removeprefix("bytes=").partition("-")
    return int(first), min(int(last), size - 1) + 1


async def wrong_bytes(request: web.Request, blob: bytes) -> web.StreamResponse:
    start, end = _span(request, len(blob))
    body = bytes(b ^ 0xFF for b in blob[start:end])
    return web.Response(
        status=206, body=body, headers={"Content-Range": f"bytes {start}-{end - 1}/{len(blob)}"}
    )


async def truncated(request: web.Request, blob: bytes) -> web.StreamResponse:
    start, end = _span(request, len(blob))
    resp = web.StreamResponse(
        status=206,
        headers={"Content-Range": f"bytes {start}-{end - 1}/{len(blob)}", "Content-Length": str(end - start)},
    )
    await resp.prepare(request)
    await resp.write(blob[start : start + (end - start) // 2])
    request.transport.close()  # type: ignore[union-attr]
    return resp


async def slow(request: web.Request, blob: bytes) -> web.StreamResponse:
    start, end = _span(request, len(blob))
    resp = web.StreamResponse(
        status=206,
        headers={"Content-Range": f"bytes {start}-{end - 1}/{len(blob)}", "Content-Length": str(end - start)},
    )
    await resp.prepare(request)
    try:
        for offset in range(start, end, 1024):
            await resp.write(blob[offset : min(offset + 1024, end)])
            await asyncio.sleep(0.05)  # 20 KiB/s: far below the 1 MiB/s floor
    except ConnectionResetError:
        pass  # the client cut us, as it should
    return resp


async def other_range(request: web.Request, blob: bytes) -> web.StreamResponse:
    _, end = _span(request, len(blob))
    return web.Response(
        status=206, body=blob[0 : end - 0], headers={"Content-Range": f"bytes 0-{end - 1}/{len(blob)}"}
    )


async def test_a_pull_takes_the_weights_from_a_peer_not_the_registry(
    model: tuple[Path, str], seed: PeerServer, registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    """Every layer comes from the peer; the registry serves the manifest and config only."""
    src, repo = model
    store = ContentStore(tmp_path / "mac-b", GiB)
    peers = PeerSource(
        [Peer("seed", f"http://127.0.0.1:{seed.port}")], TOKEN, limits=FAST, range_size=1 * MiB
    )
    got = await store.pull(f"oci://{registry_proxy.host}/{repo}:v1", peers=peers)
    assert _files(got.path) == _files(src)
    weights = _weights_digest(store)
    assert weights not in registry_proxy.blob_gets
    assert peers.bytes_from["seed"] >= WEIGHTS
    # One holder: each layer as one body (the registry's fast path); the config came from the registry.
    assert seed.stats.bodies == len(store.index.blobs) - 1
    assert not list(store.tmp_dir.iterdir())  # no partial file left behind


@pytest.mark.parametrize("misbehave", [wrong_bytes, truncated, slow, other_range])
async def test_a_bad_peer_alone_never_gets_its_bytes_in_the_store(
    model: tuple[Path, str],
    liar: Callable[[Handler], Awaitable[Peer]],
    registry_proxy: CuttingProxy,
    tmp_path: Path,
    misbehave: Handler,
) -> None:
    """The only peer misbehaves: the pull completes from the registry with the exact files."""
    src, repo = model
    store = ContentStore(tmp_path / "mac-b", GiB)
    peers = PeerSource([await liar(misbehave)], TOKEN, limits=FAST, range_size=1 * MiB)
    got = await asyncio.wait_for(store.pull(f"oci://{registry_proxy.host}/{repo}:v1", peers=peers), 60)
    assert _files(got.path) == _files(src)
    assert _weights_digest(store) in registry_proxy.blob_gets


@pytest.mark.parametrize("misbehave", [truncated, slow, other_range])
async def test_a_bad_peer_beside_a_good_one_loses_its_ranges_to_it(
    model: tuple[Path, str],
    seed: PeerServer,
    liar: Callable[[Handler], Awaitable[Peer]],
    registry_proxy: CuttingProxy,
    tmp_path: Path,
    misbehave: Handler,
) -> None:
    """A peer that cuts, drips or sends another range is dropped; the good peer finishes the blob."""
    src, repo = model
    store = ContentStore(tmp_path / "mac-b", GiB)
    bad = await liar(misbehave)
    peers = PeerSource(
        [bad, Peer("seed", f"http://127.0.0.1:{seed.port}")], TOKEN, limits=FAST, range_size=1 * MiB
    )
    got = await asyncio.wait_for(store.pull(f"oci://{registry_proxy.host}/{repo}:v1", peers=peers), 60)
    assert _files(got.path) == _files(src)
    assert _weights_digest(store) not in registry_proxy.blob_gets
    assert peers.dropped == {bad.name}
    assert sum(peers.bytes_from.values()) >= WEIGHTS  # the weights came from peers only


async def test_a_lying_peer_beside_a_good_one_still_ends_with_the_exact_blob(
    model: tuple[Path, str],
    seed: PeerServer,
    liar: Callable[[Handler], Awaitable[Peer]],
    registry_proxy: CuttingProxy,
    tmp_path: Path,
) -> None:
    """Wrong bytes in the right shape are only seen by the digest: the blob is discarded and
    pulled from the registry, never stored."""
    src, repo = model
    store = ContentStore(tmp_path / "mac-b", GiB)
    peers = PeerSource(
        [await liar(wrong_bytes), Peer("seed", f"http://127.0.0.1:{seed.port}")],
        TOKEN,
        limits=FAST,
        range_size=1 * MiB,
    )
    got = await asyncio.wait_for(store.pull(f"oci://{registry_proxy.host}/{repo}:v1", peers=peers), 60)
    assert _files(got.path) == _files(src)
    assert _weights_digest(store) in registry_proxy.blob_gets


async def test_two_macs_pulling_at_once_cost_one_registry_pull(
    model: tuple[Path, str], registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    """Both claim the blob; the older claim pulls from the registry, the other waits and takes
    it from the first over the peer path."""
    src, repo = model
    stores = [ContentStore(tmp_path / f"mac-{i}", GiB) for i in range(2)]
    claims = [Claims(), Claims()]
    servers = [await _served(s, c) for s, c in zip(stores, claims, strict=True)]
    try:
        urls = [Peer(f"mac-{i}", f"http://127.0.0.1:{s.port}") for i, s in enumerate(servers)]
        sources = [
            PeerSource([urls[1 - i]], TOKEN, name=f"mac-{i}", claims=claims[i], limits=FAST, range_size=MiB)
            for i in range(2)
        ]
        ref = f"oci://{registry_proxy.host}/{repo}:v1"
        got = await asyncio.wait_for(
            asyncio.gather(*(s.pull(ref, peers=p) for s, p in zip(stores, sources, strict=True))), 60
        )
        assert all(_files(g.path) == _files(src) for g in got)
        weights = _weights_digest(stores[0])
        assert registry_proxy.blob_gets.count(weights) == 1
        assert sum(1 for p in sources if p.bytes_from) == 1  # exactly one took it from the other
    finally:
        for server in servers:
            await server.close()
        for s in stores:
            s.close()


async def test_the_peer_server_serves_only_verified_blobs_to_the_fleet(seed: PeerServer) -> None:
    """No token: 401; a partial or unknown blob: 404 (with the claim while it is being pulled);
    ranges: 206 with the exact Content-Range; not a digest: 400."""
    base = f"http://127.0.0.1:{seed.port}{BLOB_PATH}"
    digest = next(d for d in SEED_BLOBS if seed.blob_size(d))
    size = seed.blob_size(digest)
    assert size is not None
    auth = {"Authorization": f"Bearer {TOKEN}"}
    unknown = "sha256:" + "0" * 64
    seed.claims.claim(unknown, 1234.5)
    seed.claims.progress(unknown, 42)
    async with aiohttp.ClientSession() as s:
        async with s.get(base + digest) as r:
            assert r.status == 401
        async with s.get(base + digest, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.head(base + digest, headers=auth) as r:
            assert (r.status, r.headers["Content-Length"]) == (200, str(size))
        async with s.get(base + digest, headers={**auth, "Range": "bytes=1-3"}) as r:
            assert (r.status, r.headers["Content-Range"]) == (206, f"bytes 1-3/{size}")
            assert await r.read() == seed.blob_path(digest).read_bytes()[1:4]
        async with s.head(base + unknown, headers=auth) as r:
            assert (r.status, r.headers[FETCHING]) == (404, "1234.500000 42")
        async with s.get(base + "sha256:../../etc", headers=auth) as r:
            assert r.status in (400, 404)


async def test_the_peer_server_limits_each_caller(tmp_path: Path, seed: PeerServer) -> None:
    """Past its burst a caller gets 429 with Retry-After; the server answers others meanwhile."""
    store_dir = tmp_path / "limited"
    store = ContentStore(store_dir, GiB)
    server = await _served(store, limits=ServeLimits(requests_per_second=0.001, burst=3))
    try:
        url = f"http://127.0.0.1:{server.port}{BLOB_PATH}sha256:{'1' * 64}"
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.head(url, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    statuses.append(r.status)
        assert statuses == [404, 404, 404, 429, 429]
        assert server.stats.refused[429] == 2
    finally:
        await server.close()
        store.close()


async def test_a_claimant_that_stops_is_passed_over(
    model: tuple[Path, str], registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    """A peer claims every blob since long ago and never gets further: we wait one window of no
    progress, then pull from the registry ourselves."""

    async def claims_forever(request: web.Request) -> web.Response:
        return web.Response(status=404, headers={FETCHING: "1.0 4096"})

    app = web.Application()
    app.router.add_route("HEAD", BLOB_PATH + "{digest}", claims_forever)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    src, repo = model
    store = ContentStore(tmp_path / "mac-b", GiB)
    try:
        peers = PeerSource([Peer("stuck", f"http://127.0.0.1:{port}")], TOKEN, name="mac-b", limits=FAST)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await asyncio.wait_for(store.pull(f"oci://{registry_proxy.host}/{repo}:v1", peers=peers), 60)
        assert _files(got.path) == _files(src)
        assert _weights_digest(store) in registry_proxy.blob_gets
        assert loop.time() - t0 >= FAST.window  # it did wait for the claimant first
    finally:
        await runner.cleanup()
        store.close()
