"""The content store against a real registry: resume after a cut, de-duplication, GC, restarts, auth."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchardist.oci import download as download_module
from orchardist.oci import pull as pull_module
from orchardist.oci import transfer
from orchardist.oci.auth import Credentials, from_dockerconfig
from orchardist.oci.errors import AuthRequiredError, RegistryUnreachableError
from orchardist.oci.progress import PullProgress
from orchardist.oci.push import push
from orchardist.oci.reference import parse
from orchardist.oci.store import ContentStore
from tests.fixtures.registry import AuthRegistry, CuttingProxy, make_safetensors_model

pytestmark = pytest.mark.registry
GiB = 1 << 30
MiB = 1 << 20


def _repo(name: str) -> str:
    return f"test/{name}-{secrets.token_hex(3)}"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _spy_readers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kind of body reader each blob request used (the real ``open_body``, watched)."""
    kinds: list[str] = []

    def watched(resp: Any, *, fast: bool = True) -> transfer.Body:
        body = transfer.open_body(resp, fast=fast)
        kinds.append(body.kind)
        return body

    monkeypatch.setattr(download_module, "open_body", watched)
    return kinds


@pytest.mark.parametrize("fast_path", [True, False], ids=["raw-socket", "aiohttp-stream"])
async def test_cut_mid_blob_resumes_with_range(
    registry: str,
    registry_proxy: CuttingProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fast_path: bool,
) -> None:
    model = make_safetensors_model(tmp_path / "m", weight_bytes=6 * MiB)
    repo = _repo("resume")
    await push(model, f"oci://{registry}/{repo}:v1")
    weights = (model / "model.safetensors").stat().st_size
    readers = _spy_readers(monkeypatch)

    registry_proxy.cut_after(2 * MiB)
    events: list[PullProgress] = []
    store = ContentStore(tmp_path / "store", GiB, max_parallel=1, fast_path=fast_path)
    got = await store.pull(f"oci://{registry_proxy.host}/{repo}:v1", progress=events.append)

    # Small bodies arrive whole with the headers and are read from aiohttp's buffer either way;
    # the 6 MiB weights (cut, then resumed) take the raw socket only on the fast path.
    assert readers.count("raw") == (2 if fast_path else 0)
    assert store.blob_gets == len(readers) == len(registry_proxy.blob_gets) - 1  # the config is small
    assert registry_proxy.cuts == 1
    assert _files(got.path) == _files(model)
    weight_digest = next(
        d for d in set(registry_proxy.blob_gets) if store.blob_path(d).stat().st_size == weights
    )
    assert registry_proxy.blob_gets.count(weight_digest) == 2  # the cut request and one resumed request
    assert registry_proxy.ranges and registry_proxy.ranges[-1] > 0  # the second asked for the rest only
    assert events[-1].phase == "done" and events[-1].bytes_done == events[-1].bytes_total
    assert not list((tmp_path / "store" / "tmp").iterdir())


async def test_two_concurrent_pulls_download_once(
    registry: str, registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    model = make_safetensors_model(tmp_path / "m", weight_bytes=2 * MiB)
    repo = _repo("concurrent")
    await push(model, f"oci://{registry}/{repo}:v1")
    store = ContentStore(tmp_path / "store", GiB)
    ref = f"oci://{registry_proxy.host}/{repo}:v1"

    a, b = await asyncio.gather(store.pull(ref), store.pull(ref))

    assert a.path == b.path and a.digest == b.digest
    assert len(registry_proxy.blob_gets) == len(set(registry_proxy.blob_gets)) == 6  # config + 5 files
    assert _files(a.path) == _files(model)


async def test_shared_blob_is_stored_once(
    registry: str, registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    one = make_safetensors_model(tmp_path / "one", weight_bytes=1 * MiB, seed=1)
    two = make_safetensors_model(tmp_path / "two", weight_bytes=1 * MiB, seed=1)
    (two / "tokenizer.json").write_text('{"different": true}')
    repo = _repo("shared")
    await push(one, f"oci://{registry}/{repo}:one")
    await push(two, f"oci://{registry}/{repo}:two")
    store = ContentStore(tmp_path / "store", GiB)

    m1 = await store.pull(f"oci://{registry_proxy.host}/{repo}:one")
    first = list(registry_proxy.blob_gets)
    m2 = await store.pull(f"oci://{registry_proxy.host}/{repo}:two")
    second = registry_proxy.blob_gets[len(first) :]

    assert len(second) == 2  # only the new config blob and the changed tokenizer
    weights = m1.path / "model.safetensors"
    assert weights.stat().st_ino == (m2.path / "model.safetensors").stat().st_ino  # stored once
    assert sum(1 for _ in (tmp_path / "store" / "blobs" / "sha256").iterdir()) == len(
        set(first) | set(second)
    )


async def test_gc_under_budget_spares_pinned_models(registry: str, tmp_path: Path) -> None:
    repo = _repo("gc")
    refs = []
    for i in range(3):
        m = make_safetensors_model(tmp_path / f"m{i}", weight_bytes=3 * MiB, seed=10 + i)
        refs.append(f"oci://{registry}/{repo}:m{i}")
        await push(m, refs[-1])
    store = ContentStore(tmp_path / "store", 7 * MiB)  # room for two of the three models

    a = await store.pull(refs[0], keep_pinned=True)  # oldest, but running: pinned
    b = await store.pull(refs[1])
    c = await store.pull(refs[2])

    cached = {d for d, _ in store.cached()}
    assert cached == {a.digest, c.digest}  # b (unpinned, least recently used) was evicted
    assert a.path.is_dir() and (a.path / "model.safetensors").is_file()
    assert not b.path.exists()
    assert store.usage().used_bytes <= store.budget_bytes

    store.unpin(a.digest)
    await store.pull(refs[1])  # now a is the LRU unpinned model
    assert {d for d, _ in store.cached()} == {c.digest, b.digest}


async def test_index_survives_restart_and_torn_write(registry: str, tmp_path: Path) -> None:
    repo = _repo("restart")
    m = make_safetensors_model(tmp_path / "m")
    await push(m, f"oci://{registry}/{repo}:v1")
    root = tmp_path / "store"
    first = ContentStore(root, GiB)
    got = await first.pull(f"oci://{registry}/{repo}:v1")
    cached = first.cached()
    first.close()

    reopened = ContentStore(root, GiB)
    assert reopened.cached() == cached
    assert reopened.get(got.digest) is not None
    reopened.close()

    (root / "index.json").write_bytes(b'{"version": 1, "models": {"sha256:ab')  # torn
    rebuilt = ContentStore(root, GiB)
    model = rebuilt.get(got.digest)
    assert model is not None and sorted(model.files) == sorted(got.files)

    # A pinned reference already in the store is served without the registry.
    offline = await rebuilt.pull(f"oci://127.0.0.1:1/{repo}@{got.digest}")
    assert offline.path == got.path

    # A model directory deleted behind the store's back is dropped, its blobs become collectable.
    import shutil

    shutil.rmtree(got.path)
    rebuilt.close()
    assert ContentStore(root, GiB).get(got.digest) is None


async def test_basic_auth_registry(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    m = make_safetensors_model(tmp_path / "m")
    ref = f"oci://{auth_registry.host}/{_repo('auth')}:v1"
    creds = Credentials(auth_registry.username, auth_registry.password)

    with pytest.raises(AuthRequiredError, match="authentication required"):
        await push(m, ref)
    await push(m, ref, auth=creds)

    store = ContentStore(tmp_path / "store", GiB)
    with pytest.raises(AuthRequiredError):
        await store.pull(ref)
    with pytest.raises(AuthRequiredError):
        await store.pull(ref, auth=Credentials(auth_registry.username, "wrong"))

    dockerconfig = {"auths": {auth_registry.host: {"username": creds.username, "password": creds.password}}}
    from_secret = from_dockerconfig(dockerconfig, parse(ref))
    got = await store.pull(ref, auth=from_secret)
    assert _files(got.path) == _files(m)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchardist", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cli_uses_the_docker_credential_helper(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    """``credsStore`` in the user's Docker config: the CLI asks the helper and the registry accepts."""
    bindir, docker = tmp_path / "bin", tmp_path / "docker"
    bindir.mkdir()
    docker.mkdir()
    asked = tmp_path / "asked"
    reply = json.dumps({"Username": auth_registry.username, "Secret": auth_registry.password})
    helper = bindir / "docker-credential-test"
    helper.write_text(f"#!/bin/sh\n[ \"$1\" = get ] || exit 2\ncat > '{asked}'\necho '{reply}'\n")
    helper.chmod(0o755)
    (docker / "config.json").write_text(json.dumps({"credsStore": "test"}))
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "DOCKER_CONFIG": str(docker),
        "ORCHARDIST_STORE": str(tmp_path / "store"),
    }
    m = make_safetensors_model(tmp_path / "m")
    ref = f"oci://{auth_registry.host}/{_repo('helper')}:v1"

    pushed = _cli("push", str(m), ref, env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert asked.read_text() == auth_registry.host
    pulled = _cli("pull", ref, "--dest", str(tmp_path / "out"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert _files(tmp_path / "out") == _files(m)

    helper.unlink()
    missing = _cli("pull", ref, "--dest", str(tmp_path / "out2"), env=env)
    assert missing.returncode == 1
    assert "docker-credential-test is not on PATH" in missing.stderr
    assert auth_registry.password not in missing.stderr + missing.stdout


def test_cli_push_pull_inspect(registry: str, tmp_path: Path) -> None:
    m = make_safetensors_model(tmp_path / "m")
    ref = f"oci://{registry}/{_repo('cli')}:v1"
    env = {"ORCHARDIST_STORE": str(tmp_path / "store")}

    pushed = _cli("push", str(m), ref, "--format", "docker", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip().splitlines()[-1].startswith(f"pushed {ref} as oci://")

    pulled = _cli("pull", ref, "--dest", str(tmp_path / "out"), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert _files(tmp_path / "out") == _files(m)

    shown = _cli("inspect", ref, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["layout"] == "docker-model-runner"
    assert info["profile"]["architecture"] == "LlamaForCausalLM"
    assert info["profile"]["maxContext"] == 256
    assert {f["path"] for f in info["files"]} == set(_files(m))

    missing = _cli("pull", f"oci://{registry}/test/absent:v1", "--dest", str(tmp_path / "no"), env=env)
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("orchardist pull: ") and "not found" in last
    assert not (tmp_path / "no").exists()


async def test_chunked_upload_and_cross_repo_mount(registry: str, tmp_path: Path) -> None:
    from orchardist.oci.client import RegistryClient, sha256_digest

    blob = tmp_path / "big.bin"
    blob.write_bytes(os.urandom(3 * MiB + 12345))
    digest = sha256_digest(blob.read_bytes())
    src, dst = _repo("chunked"), _repo("mounted")
    async with RegistryClient.for_ref(parse(f"oci://{registry}/{src}")) as client:
        await client.upload_blob(src, digest, blob, chunk_size=1 * MiB)  # four PATCHes, then PUT
        assert await client.get_blob(src, digest, limit=8 * MiB) == blob.read_bytes()
        assert not await client.blob_exists(dst, digest)
        assert await client.mount_blob(dst, digest, src)
        assert await client.blob_exists(dst, digest)


async def test_push_skips_blobs_the_registry_has(
    registry: str, registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    m = make_safetensors_model(tmp_path / "m", weight_bytes=1 * MiB)
    repo = _repo("skip")
    await push(m, f"oci://{registry}/{repo}:a")
    weights = (m / "model.safetensors").stat().st_size
    events: list[PullProgress] = []
    await push(m, f"oci://{registry_proxy.host}/{repo}:b", progress=events.append)
    assert events[-1].phase == "done" and events[-1].bytes_done >= weights
    assert registry_proxy.blob_gets == []
    assert (
        registry_proxy.uploads <= 1
    )  # every file blob was found by HEAD; at most the new config blob went up


async def test_disk_work_of_a_pull_runs_off_the_event_loop(
    registry: str, registry_proxy: CuttingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resume hashing, fsync, index writes, materializing, linking, GC deletes and export all run
    in worker threads: the thread each one ran in is recorded by a wrapper around the real one."""
    from orchardist.oci import index as index_module
    from orchardist.oci import materialize as materialize_module
    from orchardist.oci import store as store_module

    repo = _repo("threads")
    refs = []
    for i in range(3):
        m = make_safetensors_model(tmp_path / f"m{i}", weight_bytes=3 * MiB, seed=20 + i)
        refs.append(f"oci://{registry_proxy.host}/{repo}:m{i}")
        await push(m, f"oci://{registry}/{repo}:m{i}")
    # No retries: the cut fails the first pull, and the next one resumes the partial file it left.
    store = ContentStore(tmp_path / "store", 7 * MiB, max_parallel=1, retries=0)  # opened before the spies

    ran_in: dict[str, set[int]] = {}
    spied = [
        (index_module, "remove_tree"),  # evicting a model
        (index_module, "atomic_write"),  # the index
        (index_module, "fsync_path"),  # committing a blob
        (download_module, "fsync_path"),  # a finished download
        (download_module, "hash_prefix"),  # resuming a cut download
        (pull_module, "materialize"),
        (pull_module, "atomic_write"),  # the manifest
        (materialize_module, "link_or_copy"),
        (store_module, "export"),
    ]
    for module, name in spied:
        real = getattr(module, name)

        def watched(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            ran_in.setdefault(_name, set()).add(threading.get_ident())
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, watched)

    loop_thread = threading.get_ident()
    registry_proxy.cut_after(2 * MiB)
    with pytest.raises(RegistryUnreachableError, match="interrupted 1 times"):
        await store.pull(refs[0])
    first = await store.pull(refs[0])
    await store.pull(refs[1])
    newest = await store.pull(refs[2])  # over budget: the least recently used model is evicted
    await store.export(newest, tmp_path / "out")

    assert registry_proxy.cuts == 1 and not first.path.exists()  # a resume and an eviction happened
    assert sorted(ran_in) == sorted({name for _, name in spied})  # every step ran
    assert {name for name, threads in ran_in.items() if loop_thread in threads} == set()


async def test_unpacking_a_tar_layer_runs_off_the_event_loop(
    registry: str, registry_proxy: CuttingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Extracting on the way, removing a cut try, placing, linking and dropping unpacked layers
    all run in worker threads (recorded by wrappers around the real functions)."""
    from orchardist.oci import materialize as materialize_module
    from orchardist.oci import unpack as unpack_module

    repo = _repo("tarthreads")
    files = await _push_tar_model(registry, tmp_path, f"{repo}:v1", seed=7)
    store = ContentStore(tmp_path / "store", GiB, max_parallel=1)
    ran_in: dict[str, set[int]] = {}
    spied = [
        (unpack_module, "extract_tar"),
        (unpack_module, "remove_trees"),  # the cut try's staging directory
        (unpack_module, "_place"),  # a verified layer's directory into place
        (pull_module, "materialize"),
        (materialize_module, "link_or_copy"),  # unpacked files into the model
        (pull_module, "remove_trees"),  # unpacked layers dropped once the model is built
    ]
    for module, name in spied:
        real = getattr(module, name)

        def watched(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            ran_in.setdefault(_name, set()).add(threading.get_ident())
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, watched)

    registry_proxy.cut_after(3 * MiB)
    got = await store.pull(f"oci://{registry_proxy.host}/{repo}:v1")
    assert _files(got.path) == files and registry_proxy.cuts == 1
    assert sorted(ran_in) == sorted({name for _, name in spied})  # every step ran
    assert {name for name, threads in ran_in.items() if threading.get_ident() in threads} == set()


def _disk_bytes(root: Path) -> int:
    """Bytes on disk under ``root``, each inode once (hardlinks share their data), as ``du`` counts."""
    seen: set[int] = set()
    total = 0
    for p in root.rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


class _DiskWatcher:
    """A thread that measures ``root`` with :func:`_disk_bytes` over and over while it runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-watcher", daemon=True)

    def __enter__(self) -> _DiskWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(_disk_bytes(self.root))
            except OSError:  # a file went away while it was measured: measure again
                continue


async def _push_tar_model(registry: str, tmp_path: Path, repo_tag: str, seed: int) -> dict[str, bytes]:
    """A ModelPack model as modctl packs it with tar layers (weights tar+gzip, config tar)."""
    from orchardist.oci import mediatypes as mt
    from tests.fixtures.registry import TINY_CONFIG, push_artifact, tar_bytes

    rng = np.random.default_rng(seed)
    files = {
        "model.safetensors": rng.bytes(6 * MiB),
        "shard/model-2.safetensors": rng.bytes(2 * MiB),
        "config.json": json.dumps(TINY_CONFIG).encode(),
    }
    weights = {k: v for k, v in files.items() if k.endswith(".safetensors")}
    cfg = {"descriptor": {"name": "tiny"}, "config": {"format": "safetensors"}, "modelfs": {"type": "layers"}}
    await push_artifact(
        registry,
        repo_tag,
        (mt.MODELPACK_CONFIG, json.dumps(cfg).encode()),
        [
            ("application/vnd.cncf.model.weight.v1.tar+gzip", tar_bytes(weights, "gzip"), {}),
            (
                "application/vnd.cncf.model.weight.config.v1.tar",
                tar_bytes({"config.json": files["config.json"]}),
                {},
            ),
        ],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    return files


async def test_tar_layers_are_stored_once(
    registry: str, registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    """A model in tar layers keeps its extracted files, not the blobs too: disk <= 1.05 x its files."""
    repo = _repo("taronce")
    files = await _push_tar_model(registry, tmp_path, f"{repo}:v1", seed=3)
    root = tmp_path / "store"
    store = ContentStore(root, GiB)
    ref = f"oci://{registry_proxy.host}/{repo}:v1"

    got = await store.pull(ref)
    assert _files(got.path) == files
    extracted = sum(len(v) for v in files.values())
    assert _disk_bytes(root) <= 1.05 * extracted
    record = store.index.models[got.digest]
    assert len(record.blobs) == 1  # the config; the two tar layers live on as their files
    assert store.usage().used_bytes <= 1.05 * extracted

    # pulled again: served from the store, nothing fetched
    gets = len(registry_proxy.blob_gets)
    assert (await store.pull(ref)).path == got.path
    assert len(registry_proxy.blob_gets) == gets

    # the stored model pushes as a directory (one layer per file) and comes back the same
    await push(got.path, f"oci://{registry}/{repo}-copy:v1")
    other = ContentStore(tmp_path / "copy", GiB)
    assert _files((await other.pull(f"oci://{registry}/{repo}-copy:v1")).path) == files
    other.close()

    # a torn index is rebuilt from the manifest without the archive blobs
    store.close()
    (root / "index.json").write_bytes(b"{")
    reopened = ContentStore(root, GiB)
    again = reopened.get(got.digest)
    assert again is not None and _files(again.path) == files

    # GC evicts it whole; a new pull fetches and extracts the archives again
    reopened.budget_bytes = 1
    reopened.gc()
    assert reopened.get(got.digest) is None and not got.path.exists()
    reopened.budget_bytes = GiB
    assert _files((await reopened.pull(ref)).path) == files
    reopened.close()


async def test_tar_layer_cut_mid_stream_starts_over_then_is_stored_once(
    registry: str, registry_proxy: CuttingProxy, tmp_path: Path
) -> None:
    """A tar layer unpacked while it downloads cannot resume: a cut one starts over from byte 0
    (no Range request), its progress taken back, and nothing of the cut try is left."""
    repo = _repo("tarrestart")
    files = await _push_tar_model(registry, tmp_path, f"{repo}:v1", seed=4)
    registry_proxy.cut_after(3 * MiB)
    events: list[PullProgress] = []
    store = ContentStore(tmp_path / "store", GiB, max_parallel=1)
    got = await store.pull(f"oci://{registry_proxy.host}/{repo}:v1", progress=events.append)
    assert registry_proxy.cuts == 1
    assert registry_proxy.ranges == []
    assert len(registry_proxy.blob_gets) == len(set(registry_proxy.blob_gets)) + 1  # the cut one again
    assert _files(got.path) == files
    assert events[-1].phase == "done" and events[-1].bytes_done == events[-1].bytes_total
    assert not list((tmp_path / "store" / "tmp").iterdir())
    assert not list((tmp_path / "store" / "layers").iterdir())
    assert _disk_bytes(tmp_path / "store") <= 1.05 * sum(len(v) for v in files.values())


async def test_tar_layer_pull_peaks_at_its_files_not_twice(registry: str, tmp_path: Path) -> None:
    """Peak disk during the pull of a tar-layer model, sampled all along by a thread: ~1x its
    extracted files. The control is the same pull through the blob path (``keep_archives``: the
    blob is kept beside its files): the watcher sees both at once there."""
    repo = _repo("tarpeak")
    files = await _push_tar_model(registry, tmp_path, f"{repo}:v1", seed=6)
    extracted = sum(len(v) for v in files.values())
    peaks: dict[str, int] = {}
    for way in ("unpacked on the way", "blob first"):
        root = tmp_path / way.replace(" ", "-")
        store = ContentStore(root, GiB, keep_archives=way == "blob first")
        with _DiskWatcher(root) as watcher:
            got = await store.pull(f"oci://{registry}/{repo}:v1")
        store.close()
        assert _files(got.path) == files
        assert len(watcher.samples) >= 10
        peaks[way] = max(watcher.samples)
        if way == "unpacked on the way":
            assert _disk_bytes(root) <= 1.05 * extracted
    assert peaks["unpacked on the way"] <= 1.1 * extracted
    assert peaks["blob first"] >= 1.5 * extracted


async def test_keep_archives_keeps_the_layer_blobs(registry: str, tmp_path: Path) -> None:
    """With ``keep_archives`` the exact blobs stay (to serve them byte for byte), at twice the disk."""
    repo = _repo("tarkeep")
    files = await _push_tar_model(registry, tmp_path, f"{repo}:v1", seed=5)
    store = ContentStore(tmp_path / "store", GiB, keep_archives=True)
    got = await store.pull(f"oci://{registry}/{repo}:v1")
    assert _files(got.path) == files
    assert len(store.index.models[got.digest].blobs) == 3
    assert all(store.blob_path(b).is_file() for b in store.index.models[got.digest].blobs)
