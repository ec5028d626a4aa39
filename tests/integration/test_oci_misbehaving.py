"""Misbehaving registries on loopback (aiohttp servers): drips, stalls, lies, endless tokens, realms.

Each server is a real HTTP server the store talks to over a socket; the test picks how it
misbehaves. Every case checks the refusal, its message, what the server was asked for (nothing
sent where it must not go, nothing retried that must not be), and that no model was materialized.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from orchardist.oci import mediatypes as mt
from orchardist.oci.auth import Credentials
from orchardist.oci.client import sha256_digest
from orchardist.oci.errors import (
    AuthRequiredError,
    DeadlineError,
    DigestMismatchError,
    RegistryError,
    RegistryUnreachableError,
    TooLargeError,
)
from orchardist.oci.store import ContentStore
from orchardist.oci.transfer import TransferLimits
from tests.fixtures.registry import push_artifact
from tests.fixtures.wait import async_wait_for

MiB = 1 << 20
CONFIG = b'{"config":{},"modelfs":{"type":"layers","diffIds":[]}}'
Sender = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


class FakeRegistry:
    """Serves one repository's manifests and blobs; ``send_blob`` and ``token`` are the test's to set."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.seen: list[tuple[str, str]] = []  # (path, Authorization header) of every request
        self.send_blob: Sender = _whole
        self.challenge: str | None = None  # answer 401 with this WWW-Authenticate until a token comes
        self.token: Callable[[web.Request], Awaitable[web.StreamResponse]] = _good_token
        self.closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        app.router.add_route("*", "/v2/{tail:.*}", self._v2)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        self.host = ""

    async def start(self) -> FakeRegistry:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.host = f"127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        self.closing.set()
        await self.runner.cleanup()

    def add_model(self, weights: bytes, *, declared: int | None = None) -> str:
        """A ModelPack manifest under tag ``v1`` with one raw weight layer; returns its digest."""
        self.blobs[sha256_digest(CONFIG)] = CONFIG
        self.blobs[sha256_digest(weights)] = weights
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": mt.MODELPACK_MANIFEST,
            "config": {
                "mediaType": mt.MODELPACK_CONFIG,
                "digest": sha256_digest(CONFIG),
                "size": len(CONFIG),
            },
            "layers": [
                {
                    "mediaType": mt.MODELPACK_WEIGHT_RAW,
                    "digest": sha256_digest(weights),
                    "size": len(weights) if declared is None else declared,
                    "annotations": {mt.FILEPATH: "model.safetensors"},
                }
            ],
        }
        raw = json.dumps(manifest).encode()
        self.manifests["v1"] = self.manifests[sha256_digest(raw)] = raw
        return sha256_digest(raw)

    def gets(self, part: str) -> int:
        return sum(1 for path, _ in self.seen if part in path)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path_qs, request.headers.get("Authorization", "")))
        return await self.token(request)

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Authorization", "")))
        if self.challenge and request.headers.get("Authorization") != "Bearer good":
            return web.Response(status=401, headers={"WWW-Authenticate": self.challenge})
        tail = request.match_info["tail"]
        if "/manifests/" in tail:
            raw = self.manifests.get(tail.rsplit("/", 1)[1])
            if raw is None:
                return web.Response(status=404)
            ctype = json.loads(raw).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
            return web.Response(body=raw, content_type=ctype)
        if "/blobs/" in tail:
            data = self.blobs.get(tail.rsplit("/", 1)[1])
            if data is None:
                return web.Response(status=404)
            return await (self.send_blob(request, data) if len(data) > len(CONFIG) else _whole(request, data))
        return web.json_response({})


async def _whole(request: web.Request, data: bytes) -> web.StreamResponse:
    return web.Response(body=data, content_type="application/octet-stream")


async def _good_token(request: web.Request) -> web.StreamResponse:
    return web.json_response({"token": "good"})


def drip(closing: asyncio.Event, chunk: int, every: float, *, stall_after: int | None = None) -> Sender:
    """A body of the full length, sent ``chunk`` bytes every ``every`` s (optionally then nothing)."""

    async def send(request: web.Request, data: bytes) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(data)
        await resp.prepare(request)
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < len(data) and not closing.is_set():
                if stall_after is not None and sent >= stall_after:
                    await closing.wait()  # until the test ends: the client must give up first
                    break
                await resp.write(data[sent : sent + chunk])
                sent += chunk
                await asyncio.sleep(every)  # deliberate: the drip rate of a misbehaving registry
        return resp

    return send


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    reg = FakeRegistry()
    await reg.start()
    yield reg
    await reg.close()


def _store(
    tmp_path: Path, min_rate: int = 1024, window: float = 60.0, deadline: float = 600.0
) -> ContentStore:
    """A store that retries once, with the test's transfer limits."""
    limits = TransferLimits(min_rate=min_rate, window=window, deadline=deadline)
    return ContentStore(tmp_path / "store", 1 << 30, retries=1, limits=limits)


def _nothing_materialized(store: ContentStore) -> None:
    assert list(store.model_dir.iterdir()) == []
    assert list(store.manifest_dir.iterdir()) == []
    assert store.cached() == []


async def test_drip_is_cut_below_the_minimum_rate(fake: FakeRegistry, tmp_path: Path) -> None:
    weights = secrets.token_bytes(4 * MiB)
    fake.add_model(weights)
    fake.send_blob = drip(fake.closing, 1024, 0.02)  # ~50 KiB/s against a 1 MiB/s minimum
    store = _store(tmp_path, min_rate=MiB, window=0.3, deadline=60)
    with pytest.raises(RegistryUnreachableError) as caught:
        await store.pull(f"oci://{fake.host}/m:v1")
    assert "download interrupted 2 times" in str(caught.value)
    assert "in the last 0.3 s, below the minimum 1048576 bytes/s; connection cut" in str(caught.value)
    assert fake.gets(sha256_digest(weights)) == 2  # one request and one resumed retry, both cut
    assert not store.blob_path(sha256_digest(weights)).exists()
    _nothing_materialized(store)
    store.close()


async def test_stalled_body_is_cut(fake: FakeRegistry, tmp_path: Path) -> None:
    weights = secrets.token_bytes(2 * MiB)
    fake.add_model(weights)
    fake.send_blob = drip(fake.closing, 64 << 10, 0.0, stall_after=256 << 10)
    store = _store(tmp_path, min_rate=1024, window=0.3, deadline=60)
    with pytest.raises(RegistryUnreachableError, match=r"no byte in 0\.3 s, below the minimum 1024 bytes/s"):
        await store.pull(f"oci://{fake.host}/m:v1")
    assert fake.gets(sha256_digest(weights)) == 2
    _nothing_materialized(store)
    store.close()


async def test_overall_deadline_gives_up_without_retrying(fake: FakeRegistry, tmp_path: Path) -> None:
    weights = secrets.token_bytes(16 * MiB)
    fake.add_model(weights)
    # Steady and well above the minimum rate, but 16 MiB takes about 3 s.
    fake.send_blob = drip(fake.closing, 64 << 10, 0.01)
    store = _store(tmp_path, min_rate=1024, window=5, deadline=0.5)
    with pytest.raises(DeadlineError, match=r"not complete within its 0\.5 s deadline; given up"):
        await store.pull(f"oci://{fake.host}/m:v1")
    assert fake.gets(sha256_digest(weights)) == 1
    _nothing_materialized(store)
    store.close()


async def test_more_bytes_than_declared_is_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    weights = secrets.token_bytes(MiB)
    fake.add_model(weights, declared=MiB - 10)
    store = _store(tmp_path)
    with pytest.raises(DigestMismatchError, match=r"sent more than the 1048566 bytes the manifest declares"):
        await store.pull(f"oci://{fake.host}/m:v1")
    assert fake.gets(sha256_digest(weights)) == 1
    assert list(store.tmp_dir.iterdir()) == []  # the lying body is discarded, not kept to resume
    _nothing_materialized(store)
    store.close()


async def test_endless_token_body_is_cut_at_the_limit(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.add_model(secrets.token_bytes(1024))
    fake.challenge = f'Bearer realm="http://{fake.host}/token",service="fake"'
    streamed: list[int] = []

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(b'{"token": "')
            for _ in range(4096):  # 256 MiB at most; the client must stop long before
                await resp.write(b"a" * (64 << 10))
                streamed.append(1)
        return resp

    fake.token = endless
    store = _store(tmp_path)
    with pytest.raises(TooLargeError, match=r"token response: more than the 65536-byte limit"):
        await store.pull(f"oci://{fake.host}/m:v1")
    assert len(streamed) < 4096
    assert fake.gets("/blobs/") == 0
    _nothing_materialized(store)
    store.close()


async def test_credentials_never_go_to_a_plain_http_realm_elsewhere(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    fake.add_model(secrets.token_bytes(1024))
    other = await FakeRegistry().start()  # another origin (another port) playing the token realm
    try:
        fake.challenge = f'Bearer realm="http://{other.host}/token",service="fake"'
        store = _store(tmp_path)
        with pytest.raises(
            AuthRequiredError, match=r"is another origin over plain HTTP; credentials are sent only"
        ):
            await store.pull(f"oci://{fake.host}/m:v1", auth=Credentials("alice", "s3cret"))
        assert other.seen == []  # not even a request: the password never left
        assert all(auth == "" for _, auth in fake.seen)
        _nothing_materialized(store)
        store.close()
    finally:
        await other.close()


async def test_same_origin_realm_gets_credentials(fake: FakeRegistry, tmp_path: Path) -> None:
    """The control case: the registry's own token endpoint is sent Basic credentials and works."""
    weights = secrets.token_bytes(1024)
    fake.add_model(weights)
    fake.challenge = f'Bearer realm="http://{fake.host}/token",service="fake"'
    store = _store(tmp_path)
    got = await store.pull(f"oci://{fake.host}/m:v1", auth=Credentials("alice", "s3cret"))
    assert (got.path / "model.safetensors").read_bytes() == weights
    tokens = [auth for path, auth in fake.seen if path.startswith("/token")]
    assert tokens and all(auth == Credentials("alice", "s3cret").basic_header() for auth in tokens)
    store.close()


async def test_anonymous_token_from_elsewhere_carries_no_credentials(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    weights = secrets.token_bytes(1024)
    fake.add_model(weights)
    other = await FakeRegistry().start()
    try:
        fake.challenge = f'Bearer realm="http://{other.host}/token",service="fake"'
        store = _store(tmp_path)
        got = await store.pull(f"oci://{fake.host}/m:v1")
        assert (got.path / "model.safetensors").read_bytes() == weights
        assert [auth for _, auth in other.seen] == [""]
        store.close()
    finally:
        await other.close()


async def test_index_entry_with_a_path_for_a_digest_is_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    bad = "sha256:../../../../etc/passwd"
    index = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": bad,
                "size": 100,
                "platform": {"os": "darwin", "architecture": "arm64"},
            }
        ],
    }
    fake.manifests["v1"] = json.dumps(index).encode()
    store = _store(tmp_path)
    with pytest.raises(
        RegistryError, match=r"the index entry's digest 'sha256:\.\./.*' is not sha256:<64 hex>"
    ):
        await store.pull(f"oci://{fake.host}/m:v1")
    assert [path for path, _ in fake.seen] == ["/v2/m/manifests/v1"]
    _nothing_materialized(store)
    store.close()


@pytest.mark.registry
async def test_slow_registry_does_not_hold_up_the_same_blob_from_another(
    fake: FakeRegistry, registry: str, tmp_path: Path
) -> None:
    """Downloads are keyed by source: a verified blob is shared, a stalled download is not waited on."""
    weights = secrets.token_bytes(2 * MiB)
    fake.add_model(weights)
    # About 20 KiB/s: above this store's minimum rate, about 100 s for the whole blob.
    fake.send_blob = drip(fake.closing, 1024, 0.05)
    repo = f"test/shared-{secrets.token_hex(3)}"
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.MODELPACK_CONFIG, CONFIG),
        [(mt.MODELPACK_WEIGHT_RAW, weights, {mt.FILEPATH: "model.safetensors"})],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    store = _store(tmp_path, min_rate=1, window=60, deadline=600)
    slow = asyncio.create_task(store.pull(f"oci://{fake.host}/m:v1"))
    try:
        await async_wait_for(
            lambda: fake.gets(sha256_digest(weights)) or None,
            timeout=30,
            message="the slow registry was never asked for the blob",
        )
        fast = await asyncio.wait_for(store.pull(f"oci://{registry}/{repo}:v1"), timeout=60)
        assert (fast.path / "model.safetensors").read_bytes() == weights
        assert not slow.done()  # still dripping: the fast pull did not wait for it
        partials = sorted(p.name for p in store.tmp_dir.iterdir())
        assert len(partials) == 1 and partials[0].startswith(sha256_digest(weights)[7:] + ".")
    finally:
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        store.close()


async def test_cli_blob_deadline(fake: FakeRegistry, tmp_path: Path) -> None:
    """``orchardist pull --blob-deadline`` reaches the store: the CLI gives up and says why."""
    fake.add_model(secrets.token_bytes(4 * MiB))
    fake.send_blob = drip(fake.closing, 1024, 0.02)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchardist",
        "pull",
        f"oci://{fake.host}/m:v1",
        "--dest",
        str(tmp_path / "out"),
        "--store",
        str(tmp_path / "store"),
        "--blob-deadline",
        "0.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 1
    assert "not complete within its 0.5 s deadline; given up" in err.decode()
    assert not (tmp_path / "out").exists()
