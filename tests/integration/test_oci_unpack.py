"""Tar layers unpacked while they download, from registries on loopback that lie, cut or hold.

Each case serves ModelPack models with tar layers from a real HTTP server (the misbehaving
registry's server, told what to send) and checks the outcome, what was asked for, and that nothing
of a refused layer is left: no model, no staging or unpacked directory, no partial file.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from orchardist.oci import mediatypes as mt
from orchardist.oci.client import sha256_digest
from orchardist.oci.errors import DigestMismatchError, RegistryUnreachableError, UnsafePathError
from orchardist.oci.store import ContentStore
from tests.fixtures.registry import tar_bytes
from tests.fixtures.wait import async_wait_for
from tests.integration.test_oci_misbehaving import CONFIG, FakeRegistry, Sender

MiB = 1 << 20
TAR_GZIP = "application/vnd.cncf.model.weight.v1.tar+gzip"
TAR = "application/vnd.cncf.model.weight.v1.tar"


@pytest.fixture
async def fake() -> AsyncIterator[FakeRegistry]:
    reg = FakeRegistry()
    await reg.start()
    yield reg
    await reg.close()


def _add(
    fake: FakeRegistry, tag: str, layers: list[tuple[str, bytes]], *, sizes: dict[int, int] | None = None
) -> list[str]:
    """A ModelPack manifest under ``tag`` with these (media type, bytes) layers; their digests.
    ``sizes`` overrides a layer's declared size (by position)."""
    fake.blobs[sha256_digest(CONFIG)] = CONFIG
    descriptors = []
    for n, (media_type, data) in enumerate(layers):
        fake.blobs[sha256_digest(data)] = data
        size = (sizes or {}).get(n, len(data))
        descriptors.append({"mediaType": media_type, "digest": sha256_digest(data), "size": size})
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": mt.MODELPACK_MANIFEST,
        "config": {"mediaType": mt.MODELPACK_CONFIG, "digest": sha256_digest(CONFIG), "size": len(CONFIG)},
        "layers": descriptors,
    }
    raw = json.dumps(manifest).encode()
    fake.manifests[tag] = fake.manifests[sha256_digest(raw)] = raw
    return [d["digest"] for d in descriptors]


def _store(tmp_path: Path, retries: int = 1) -> ContentStore:
    return ContentStore(tmp_path / "store", 1 << 30, retries=retries)


def _nothing_left(store: ContentStore) -> None:
    assert list(store.model_dir.iterdir()) == []
    assert list(store.manifest_dir.iterdir()) == []
    assert list(store.index.layers_dir.iterdir()) == []
    assert list(store.tmp_dir.iterdir()) == []
    assert store.cached() == [] and store.usage().used_bytes == len(CONFIG)


async def test_a_forged_layer_is_unpacked_then_thrown_away(fake: FakeRegistry, tmp_path: Path) -> None:
    """A well-formed tar of the declared size but other bytes: extracted as it arrives, then
    refused on its digest (not retried), and none of its files is used."""
    good = tar_bytes({"model.safetensors": secrets.token_bytes(MiB)})
    forged = tar_bytes({"model.safetensors": secrets.token_bytes(MiB)})
    assert len(forged) == len(good)
    (digest,) = _add(fake, "v1", [(TAR, good)])
    fake.blobs[digest] = forged
    store = _store(tmp_path)
    with pytest.raises(DigestMismatchError, match=r"layer sha256:\w+: received content hashes to sha256:"):
        await store.pull(f"oci://{fake.host}/test/m:v1")
    assert fake.gets(digest) == 1
    _nothing_left(store)


async def test_more_bytes_than_declared_are_refused(fake: FakeRegistry, tmp_path: Path) -> None:
    data = tar_bytes({"model.safetensors": secrets.token_bytes(MiB)}, "gzip")
    (digest,) = _add(fake, "v1", [(TAR_GZIP, data)], sizes={0: len(data) - 100})
    store = _store(tmp_path)
    with pytest.raises(DigestMismatchError, match="sent more than the"):
        await store.pull(f"oci://{fake.host}/test/m:v1")
    assert fake.gets(digest) == 1
    _nothing_left(store)


def _cut_in_half() -> Sender:
    """The full Content-Length, then the connection closed halfway."""

    async def send(request: web.Request, data: bytes) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp

    return send


async def test_a_layer_cut_every_time_is_given_up_after_its_tries(fake: FakeRegistry, tmp_path: Path) -> None:
    """Every try starts from byte 0 (no Range: a stream does not resume) and each is cleaned up."""
    data = tar_bytes({"model.safetensors": secrets.token_bytes(2 * MiB)}, "gzip")
    (digest,) = _add(fake, "v1", [(TAR_GZIP, data)])
    fake.send_blob = _cut_in_half()
    store = _store(tmp_path, retries=1)
    with pytest.raises(RegistryUnreachableError, match="download interrupted 2 times"):
        await store.pull(f"oci://{fake.host}/test/m:v1")
    assert fake.gets(digest) == 2
    _nothing_left(store)


async def test_a_tar_that_hashes_right_but_ends_mid_file_is_refused(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    """The digest is the publisher's word for the bytes, not for the archive: one cut short as
    published is verified, then refused for not ending cleanly."""
    whole = tar_bytes({"a.safetensors": secrets.token_bytes(MiB), "b.json": b"{}"})
    _add(fake, "v1", [(TAR, whole[: MiB // 2])])
    store = _store(tmp_path)
    with pytest.raises(UnsafePathError, match="not a readable tar archive"):
        await store.pull(f"oci://{fake.host}/test/m:v1")
    _nothing_left(store)


def _held(digest: str, started: asyncio.Event, gate: asyncio.Event) -> Sender:
    """``digest``'s body: its first half, then the rest once ``gate`` is set; others whole."""

    async def send(request: web.Request, data: bytes) -> web.StreamResponse:
        if not request.path.endswith(digest):
            return web.Response(body=data, content_type="application/octet-stream")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        started.set()
        await gate.wait()
        await resp.write(data[len(data) // 2 :])
        return resp

    return send


async def test_two_models_sharing_a_tar_layer_fetch_it_once(fake: FakeRegistry, tmp_path: Path) -> None:
    """The second pull waits for the first one's unpacking of the shared layer and links the same
    files: one download, one copy on disk for both models, nothing unpacked left over."""
    shared = tar_bytes({"model.safetensors": secrets.token_bytes(2 * MiB)}, "gzip")
    own_a = tar_bytes({"config.json": b'{"a": 1}'})
    own_b = tar_bytes({"config.json": b'{"b": 2}'})
    layer, _ = _add(fake, "a", [(TAR_GZIP, shared), (TAR, own_a)])
    _, b_own = _add(fake, "b", [(TAR_GZIP, shared), (TAR, own_b)])
    started, gate = asyncio.Event(), asyncio.Event()
    fake.send_blob = _held(layer, started, gate)
    store = _store(tmp_path)
    first = asyncio.create_task(store.pull(f"oci://{fake.host}/test/m:a"))
    try:
        await asyncio.wait_for(started.wait(), 30)
        second = asyncio.create_task(store.pull(f"oci://{fake.host}/test/m:b"))
        # the second pull asks for its own layers once it has decided what it needs
        await async_wait_for(lambda: fake.gets(b_own), timeout=30, message="the second pull started")
    finally:
        gate.set()
    a, b = await first, await second
    assert fake.gets(layer) == 1
    weights_a, weights_b = a.path / "model.safetensors", b.path / "model.safetensors"
    assert weights_a.read_bytes() == weights_b.read_bytes()
    assert weights_a.stat().st_ino == weights_b.stat().st_ino
    assert json.loads((b.path / "config.json").read_bytes()) == {"b": 2}
    assert list(store.index.layers_dir.iterdir()) == []


async def test_a_pull_with_peers_takes_tar_layers_from_the_registry_unpacked_on_the_way(
    fake: FakeRegistry, tmp_path: Path
) -> None:
    """No Mac keeps a tar blob (without ``keep_archives``), so none could serve one: a pull with
    peers never asks them for a tar layer (nor claims it, which would make them wait) and shares
    the unpacking of another pull in flight; neither a blob nor the unpacked layer outlives them."""
    from orchardist.oci.peering import Claims, Peer
    from orchardist.oci.peers import PeerSource

    asked: list[str] = []

    async def peer(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", peer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    shared = tar_bytes({"model.safetensors": secrets.token_bytes(2 * MiB)}, "gzip")
    layer, _ = _add(fake, "a", [(TAR_GZIP, shared), (TAR, tar_bytes({"config.json": b'{"a": 1}'}))])
    _, b_own = _add(fake, "b", [(TAR_GZIP, shared), (TAR, tar_bytes({"config.json": b'{"b": 2}'}))])
    started, gate = asyncio.Event(), asyncio.Event()
    fake.send_blob = _held(layer, started, gate)
    store = _store(tmp_path)
    claims = Claims()
    peers = PeerSource([Peer("mac-2", f"http://127.0.0.1:{port}")], "t", name="mac-1", claims=claims)
    try:
        first = asyncio.create_task(store.pull(f"oci://{fake.host}/test/m:a"))
        try:
            await asyncio.wait_for(started.wait(), 30)
            second = asyncio.create_task(store.pull(f"oci://{fake.host}/test/m:b", peers=peers))
            await async_wait_for(lambda: fake.gets(b_own), timeout=30, message="the second pull started")
        finally:
            gate.set()
        a, b = await first, await second
    finally:
        await runner.cleanup()
    assert [
        p for p in asked if layer.removeprefix("sha256:") in p or b_own.removeprefix("sha256:") in p
    ] == []
    assert claims.header(layer) is None and claims.header(b_own) is None
    assert (a.path / "model.safetensors").read_bytes() == (b.path / "model.safetensors").read_bytes()
    assert json.loads((b.path / "config.json").read_bytes()) == {"b": 2}
    assert fake.gets(layer) == 1  # one download, unpacked once for both pulls
    assert list(store.index.layers_dir.iterdir()) == []
    assert sorted(store.index.blobs) == [sha256_digest(CONFIG)]
    assert list(store.tmp_dir.iterdir()) == []


async def test_a_cancelled_pull_leaves_no_staging(fake: FakeRegistry, tmp_path: Path) -> None:
    data = tar_bytes({"model.safetensors": secrets.token_bytes(2 * MiB)}, "gzip")
    (digest,) = _add(fake, "v1", [(TAR_GZIP, data)])
    started, gate = asyncio.Event(), asyncio.Event()
    fake.send_blob = _held(digest, started, gate)
    store = _store(tmp_path)
    pull = asyncio.create_task(store.pull(f"oci://{fake.host}/test/m:v1"))
    try:
        await asyncio.wait_for(started.wait(), 30)
        await async_wait_for(
            lambda: list(store.index.layers_dir.glob(".staging-*")),
            timeout=30,
            message="the layer is unpacking",
        )
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
    finally:
        gate.set()
    _nothing_left(store)


async def test_a_restart_drops_what_an_interrupted_pull_unpacked(tmp_path: Path) -> None:
    """Unpacked layers and their staging belong to pulls in flight: none survives a reopen."""
    root = tmp_path / "store"
    ContentStore(root, 1 << 30).close()
    left = [root / "layers" / ".staging-0123456789ab-00000000", root / "layers" / f"{'ab' * 32}.00000000"]
    for d in left:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"x")
    store = ContentStore(root, 1 << 30)
    assert list(store.index.layers_dir.iterdir()) == []
    store.close()


def _tar_of_many(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(n):
            info = tarfile.TarInfo(f"d{i % 7}/f{i}.json")
            payload = json.dumps({"i": i}).encode()
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


async def test_a_layer_of_many_files_in_directories(fake: FakeRegistry, tmp_path: Path) -> None:
    """Directories and many small files come through the pipe and the links intact."""
    _add(
        fake, "v1", [(TAR, _tar_of_many(300)), (TAR_GZIP, tar_bytes({"d0/extra.bin": b"\0" * 5000}, "gzip"))]
    )
    store = _store(tmp_path)
    got = await store.pull(f"oci://{fake.host}/test/m:v1")
    assert len(got.files) == 301
    assert json.loads((got.path / "d3" / "f10.json").read_bytes()) == {"i": 10}
    assert (got.path / "d0" / "extra.bin").stat().st_size == 5000
    assert list(store.index.layers_dir.iterdir()) == []
