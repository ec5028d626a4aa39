"""Hostile artifacts from a real registry, and a second owner of the store: refused, nothing outside.

Every case pulls through the real ``docker-registry`` into a store under ``tmp_path/work`` and
checks the refusal, its message, that the store holds no model or staging directory afterwards,
and that nothing beside the store changed (a victim file beside it keeps one link and its bytes).
"""

from __future__ import annotations

import gzip
import io
import os
import secrets
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard
from structlog.testing import capture_logs

from orchardist.oci import mediatypes as mt
from orchardist.oci.errors import StoreFullError, StoreLockedError, UnsafePathError
from orchardist.oci.profile import ProfileUnavailableError, model_profile
from orchardist.oci.store import ContentStore
from tests.fixtures.registry import push_artifact

pytestmark = pytest.mark.registry
MiB = 1 << 20
MODELPACK_CONFIG = (mt.MODELPACK_CONFIG, b'{"config":{},"modelfs":{"type":"layers","diffIds":[]}}')
TAR = "application/vnd.cncf.model.weight.v1.tar"
TAR_GZIP = TAR + "+gzip"
TAR_ZSTD = TAR + "+zstd"
SECRET = b"the agent's credentials"


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """(kind, name, data or link target); kind in file|dir|symlink|hardlink."""
    kinds = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = kinds[kind]
            info.linkname = payload if isinstance(payload, str) else ""
            tf.addfile(info)
    return buf.getvalue()


def _ladder(levels: int) -> list[tuple[str, str, bytes | str]]:
    """Symlinks each one level above the last in reality, but inside the directory on paper.

    ``l0/up -> ..`` is the model directory; ``lN/up -> ../l{N-1}/up/..`` reads as ``lN-1``, yet
    through ``l{N-1}/up`` it is one more level up. ``l{levels}/up`` ends ``levels`` above it.
    """
    steps: list[tuple[str, str, bytes | str]] = [("dir", "l0", b""), ("symlink", "l0/up", "..")]
    for n in range(1, levels + 1):
        steps += [("dir", f"l{n}", b""), ("symlink", f"l{n}/up", f"../l{n - 1}/up/..")]
    return steps


class Work:
    """A store under ``tmp_path/work/a/b`` with a victim file beside it (``tmp_path/work``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.top = tmp_path / "work"
        self.root = self.top / "a" / "b" / "store"
        self.root.parent.mkdir(parents=True)
        self.victim = self.top / "victim.txt"
        self.victim.write_bytes(SECRET)
        self.before = self._outside()

    def _outside(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for p in self.top.rglob("*"):
            if self.root == p or self.root in p.parents:
                continue
            st = p.lstat()  # a directory's size and links change with the store created in it
            out[str(p)] = (st.st_mode, 0, 0) if p.is_dir() else (st.st_mode, st.st_size, st.st_nlink)
        return out

    def assert_untouched(self) -> None:
        assert self._outside() == self.before
        assert self.victim.read_bytes() == SECRET and self.victim.stat().st_nlink == 1
        assert sorted(p.name for p in (self.root / "models").iterdir()) == []  # no model, no staging
        assert sorted(p.name for p in (self.root / "layers").iterdir()) == []  # no layer unpacked
        assert sorted(p.name for p in (self.root / "manifests" / "sha256").iterdir()) == []


async def _pull_refused(
    registry: str,
    tmp_path: Path,
    layers: list[tuple[str, bytes, dict[str, str]]],
    error: type[Exception],
    message: str,
    *,
    budget: int = 1 << 30,
) -> Work:
    repo = f"test/hostile-{secrets.token_hex(3)}"
    await push_artifact(
        registry,
        f"{repo}:v1",
        MODELPACK_CONFIG,
        [(mt.MODELPACK_WEIGHT_CONFIG_RAW, b"{}", {mt.FILEPATH: "config.json"}), *layers],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    work = Work(tmp_path)
    store = ContentStore(work.root, budget)
    try:
        with pytest.raises(error, match=message):
            await store.pull(f"oci://{registry}/{repo}:v1")
    finally:
        store.close()
    work.assert_untouched()
    return work


TAR_CASES: dict[str, tuple[bytes, str]] = {
    # The published attack: hardlink through links that resolve outside, links then overwritten.
    "hardlink through a ladder of links, links overwritten after": (
        _tar(
            *_ladder(5),  # the staging dir is work/a/b/store/layers/.staging-*: 5 levels under work
            ("hardlink", "weights.bin", "l5/up/victim.txt"),
            *[("file", f"l{n}/up", b"now a file") for n in range(6)],
        ),
        r"'l1/up' -> '\.\./l0/up/\.\.' resolves outside the model directory \(through a link\)",
    ),
    "hardlink through a symlink inside": (
        _tar(("file", "sub/f", b"x"), ("symlink", "s", "sub"), ("hardlink", "h", "s/f")),
        r"hardlink 'h' -> 's/f': not a regular file extracted earlier from this archive",
    ),
    "hardlink to a file replaced by a symlink": (
        _tar(("file", "f", b"x"), ("symlink", "f", "g"), ("hardlink", "h", "f")),
        r"hardlink 'h' -> 'f': not a regular file extracted earlier",
    ),
    "hardlink to a directory": (
        _tar(("dir", "d", b""), ("hardlink", "h", "d")),
        r"hardlink 'h' -> 'd': not a regular file extracted earlier",
    ),
    "directory replaced by a symlink": (
        _tar(("dir", "d", b""), ("file", "d/a", b"x"), ("symlink", "d", "."), ("file", "d/b", b"y")),
        r"tar entry 'd': a directory is already there",
    ),
    "symlink made to escape by a later link": (
        _tar(("symlink", "b", "a/../victim.txt"), ("symlink", "a", ".")),
        r"symlink 'b' resolves outside the model directory",
    ),
}


@pytest.mark.parametrize("case", sorted(TAR_CASES))
async def test_hostile_tar_layers(registry: str, tmp_path: Path, case: str) -> None:
    data, message = TAR_CASES[case]
    await _pull_refused(registry, tmp_path, [(TAR, data, {})], UnsafePathError, message)


@pytest.mark.parametrize("media_type", [TAR_GZIP, TAR_ZSTD])
async def test_compression_bomb_stops_at_the_budget(registry: str, tmp_path: Path, media_type: str) -> None:
    """48 MiB of zeros compress to almost nothing: the budget counts what the archive expands to."""
    raw = _tar(("file", "zeros.safetensors", bytes(48 * MiB)))
    data = gzip.compress(raw) if media_type == TAR_GZIP else zstandard.ZstdCompressor().compress(raw)
    assert len(data) < MiB
    await _pull_refused(
        registry,
        tmp_path,
        [(media_type, data, {})],
        StoreFullError,
        r"expands past the \d+ bytes left in the store budget \(counted uncompressed\); extraction stopped",
        budget=16 * MiB,
    )


def _nested_gguf(depth: int) -> bytes:
    key = b"general.evil"
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    return head + struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQI", 4, 1, 7)


async def test_deeply_nested_gguf_header_is_a_profile_error(registry: str) -> None:
    """A header nesting arrays 50,000 deep fails as a profile error, not a RecursionError."""
    repo = f"test/gguf-nest-{secrets.token_hex(3)}"
    await push_artifact(
        registry,
        f"{repo}:v1",
        MODELPACK_CONFIG,
        [(mt.MODELPACK_WEIGHT_RAW, _nested_gguf(50_000), {mt.FILEPATH: "model.gguf"})],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    with pytest.raises(
        ProfileUnavailableError, match=r"model\.gguf: GGUF metadata nests arrays deeper than 4"
    ):
        await model_profile(f"oci://{registry}/{repo}:v1")


OPEN_STORE = """
import sys
from orchardist.oci.errors import StoreLockedError
from orchardist.oci.store import ContentStore
try:
    ContentStore(sys.argv[1], 1 << 30).close()
except StoreLockedError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def _open_in_another_process(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", OPEN_STORE, str(root)], capture_output=True, text=True, timeout=60, check=False
    )


async def test_second_process_cannot_open_the_store(tmp_path: Path) -> None:
    """Two owners would evict each other's pins: the second one gets a clear error, then can open."""
    root = tmp_path / "store"
    store = ContentStore(root, 1 << 30)
    try:
        refused = _open_in_another_process(root)
        assert refused.returncode == 3, refused.stderr
        assert f"model store {root} is in use by another process (pid {os.getpid()})" in refused.stderr
        with pytest.raises(StoreLockedError, match="in use by another process"):
            ContentStore(root, 1 << 30)  # a second owner in this process is refused as well
        assert list((root / "blobs" / "sha256").iterdir()) == []
    finally:
        store.close()
    allowed = _open_in_another_process(root)
    assert allowed.returncode == 0, allowed.stderr
    assert (root / ".lock").stat().st_mode & 0o777 == 0o600


async def test_archive_larger_than_its_blob_gets_room_by_eviction(registry: str, tmp_path: Path) -> None:
    """The control case for the budget: a real archive expanding past the room made for its
    compressed size evicts an unpinned model and extracts whole (unpacked while it downloads, so
    the room it needs is its files alone: 6 + 6 MiB would fit 14, hence a budget of 11)."""
    old_repo, new_repo = f"test/old-{secrets.token_hex(3)}", f"test/new-{secrets.token_hex(3)}"
    await push_artifact(
        registry,
        f"{old_repo}:v1",
        MODELPACK_CONFIG,
        [(mt.MODELPACK_WEIGHT_RAW, secrets.token_bytes(6 * MiB), {mt.FILEPATH: "model.safetensors"})],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    payload = secrets.token_bytes(3 * MiB) + bytes(3 * MiB)  # compresses to about half
    await push_artifact(
        registry,
        f"{new_repo}:v1",
        MODELPACK_CONFIG,
        [(TAR_GZIP, gzip.compress(_tar(("file", "model.safetensors", payload))), {})],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    store = ContentStore(tmp_path / "store", 11 * MiB)
    try:
        old = await store.pull(f"oci://{registry}/{old_repo}:v1")
        with capture_logs() as logs:
            new = await store.pull(f"oci://{registry}/{new_repo}:v1")
        assert (new.path / "model.safetensors").read_bytes() == payload
        assert [e["event"] for e in logs if "GC" in e["event"]] == [
            "layer expands past the room left; trying again after GC"
        ]
        assert [d for d, _ in store.cached()] == [new.digest]  # the old model made the room
        assert not old.path.exists()
        assert store.usage().used_bytes <= 11 * MiB
    finally:
        store.close()
