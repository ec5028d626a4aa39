"""Hostile or broken artifacts from a real registry: nothing lands outside the model directory."""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev.registry import Registry
from orchardist.oci import download as download_module
from orchardist.oci import mediatypes as mt
from orchardist.oci import transfer
from orchardist.oci.errors import DigestMismatchError, TooLargeError, UnsafePathError
from orchardist.oci.push import push
from orchardist.oci.store import ContentStore
from tests.fixtures.registry import make_safetensors_model, push_artifact

pytestmark = pytest.mark.registry
GiB = 1 << 30
MODELPACK_CONFIG = (mt.MODELPACK_CONFIG, b'{"config":{},"modelfs":{"type":"layers","diffIds":[]}}')


def _repo(name: str) -> str:
    return f"test/{name}-{secrets.token_hex(3)}"


def _snapshot(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


def _exists(path: str) -> bool:
    return Path(path).exists()


def _assert_nothing_materialized(store_root: Path) -> None:
    assert list((store_root / "models").iterdir()) == []
    assert list((store_root / "manifests" / "sha256").iterdir()) == []


@pytest.mark.parametrize("fast_path", [True, False], ids=["raw-socket", "aiohttp-stream"])
async def test_corrupted_blob_is_refused_and_discarded(
    registry: str, registry_server: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    readers: list[str] = []

    def watched(resp: Any, *, fast: bool = True) -> transfer.Body:
        readers.append((body := transfer.open_body(resp, fast=fast)).kind)
        return body

    monkeypatch.setattr(download_module, "open_body", watched)
    model = make_safetensors_model(tmp_path / "m", weight_bytes=4 << 20, seed=secrets.randbits(32))
    repo = _repo("corrupt")
    await push(model, f"oci://{registry}/{repo}:v1")
    weights = (model / "model.safetensors").read_bytes()
    import hashlib

    hexd = hashlib.sha256(weights).hexdigest()
    data = registry_server.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    original = data.read_bytes()
    data.write_bytes(original[:1000] + bytes([original[1000] ^ 0xFF]) + original[1001:])  # same size
    store = ContentStore(tmp_path / "store", GiB, fast_path=fast_path)
    try:
        with pytest.raises(DigestMismatchError, match="hashes to"):
            await store.pull(f"oci://{registry}/{repo}:v1")
    finally:
        data.write_bytes(original)
    assert ("raw" in readers) == fast_path  # the 4 MiB weights: the raw socket only on the fast path
    assert not store.blob_path("sha256:" + hexd).exists()
    assert not (tmp_path / "store" / "tmp" / f"{hexd}.partial").exists()  # others stay, for resume
    _assert_nothing_materialized(tmp_path / "store")

    got = await store.pull(f"oci://{registry}/{repo}:v1")  # the registry healed: the pull works
    assert (got.path / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    "path", ["../evil.txt", "a/../../evil.txt", "/tmp/orchardist-evil.txt", "a\\..\\evil.txt"]
)
async def test_annotation_paths_cannot_escape(registry: str, tmp_path: Path, path: str) -> None:
    repo = _repo("traversal")
    await push_artifact(
        registry,
        f"{repo}:v1",
        MODELPACK_CONFIG,
        [(mt.MODELPACK_WEIGHT_RAW, b"pwned", {mt.FILEPATH: path})],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    before = _snapshot(tmp_path, tmp_path / "store")
    store = ContentStore(tmp_path / "store", GiB)
    with pytest.raises(UnsafePathError):
        await store.pull(f"oci://{registry}/{repo}:v1")
    assert _snapshot(tmp_path, tmp_path / "store") == before
    assert not _exists("/tmp/orchardist-evil.txt")
    assert not (tmp_path / "evil.txt").exists()
    _assert_nothing_materialized(tmp_path / "store")


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """Members as (kind, name, data-or-linkname); kind in file|symlink|hardlink|chardev|fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chardev": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            if isinstance(payload, str):
                info.linkname = payload
            tf.addfile(info)
    return buf.getvalue()


ESCAPES = {
    "dotdot": _tar(("file", "../escape.txt", b"x")),
    "absolute": _tar(("file", "/tmp/orchardist-abs-escape.txt", b"x")),
    "through-symlink": _tar(("symlink", "link", "../../.."), ("file", "link/escape.txt", b"x")),
    "absolute-symlink": _tar(("symlink", "etc", "/etc")),
    "symlink-chain": _tar(("symlink", "a", "."), ("symlink", "b", "a/../escape.txt")),
    "hardlink-outside": _tar(("hardlink", "passwd", "../../../../etc/passwd")),
    "device": _tar(("chardev", "null", b"")),
    "fifo": _tar(("fifo", "pipe", b"")),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
async def test_tar_escapes_write_nothing_outside(registry: str, tmp_path: Path, case: str) -> None:
    repo = _repo("tar-" + case)
    await push_artifact(
        registry,
        f"{repo}:v1",
        MODELPACK_CONFIG,
        [
            (mt.MODELPACK_WEIGHT_CONFIG_RAW, b"{}", {mt.FILEPATH: "config.json"}),
            ("application/vnd.cncf.model.weight.v1.tar", ESCAPES[case], {}),
        ],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    before = _snapshot(tmp_path, work / "store")
    store = ContentStore(work / "store", GiB)
    with pytest.raises(UnsafePathError):
        await store.pull(f"oci://{registry}/{repo}:v1")
    assert _snapshot(tmp_path, work / "store") == before
    assert not _exists("/tmp/orchardist-abs-escape.txt")
    _assert_nothing_materialized(work / "store")


async def test_oversized_config_is_refused(registry: str, tmp_path: Path) -> None:
    repo = _repo("big-config")
    big = json.dumps({"config": {}, "pad": "x" * (5 << 20)}).encode()
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.MODELPACK_CONFIG, big),
        [(mt.MODELPACK_WEIGHT_RAW, b"w", {mt.FILEPATH: "model.safetensors"})],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    with pytest.raises(TooLargeError, match="limit"):
        await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")
