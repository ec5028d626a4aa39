"""Store hardening decided without the network: pacing, credential origins, digests, GGUF depth, tars."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchardist.oci import gguf, safepath
from orchardist.oci.auth import credential_refusal
from orchardist.oci.errors import (
    DeadlineError,
    RegistryError,
    SlowTransferError,
    StoreFullError,
    UnsafePathError,
)
from orchardist.oci.index import StoreIndex
from orchardist.oci.platforms import platform_digest
from orchardist.oci.reference import parse
from orchardist.oci.safepath import extract_tar
from orchardist.oci.transfer import Pace, TransferLimits

# ---- Pace: minimum rate over a window, overall deadline ------------------------------------------


@dataclass(frozen=True)
class PaceCase:
    name: str
    reads: list[tuple[float, int]]  # (clock, bytes received so far in this request)
    error: type[Exception] | None
    message: str = ""


LIMITS = TransferLimits(min_rate=1000, window=10.0, deadline=100.0)
PACE_CASES = [
    PaceCase("fast enough", [(1, 5000), (5, 20000), (11, 40000), (20, 90000)], None),
    PaceCase("slow but inside the first window", [(1, 1), (9.9, 2)], None),
    PaceCase(
        "a drip is cut once a whole window is below the rate",
        [(1, 100), (5, 200), (10, 300)],
        SlowTransferError,
        "300 bytes in the last 10 s, below the minimum 1000 bytes/s",
    ),
    PaceCase(
        "a fast start does not buy a slow tail",
        [(1, 50000), (12, 50001), (21, 50002)],
        SlowTransferError,
        "1 bytes in the last 10 s",
    ),
    PaceCase(
        "the deadline holds even at a good rate",
        [(50, 100000), (99, 200000), (100, 300000)],
        DeadlineError,
        "not complete within its 100 s deadline",
    ),
]


@pytest.mark.parametrize("case", PACE_CASES, ids=lambda c: c.name)
def test_pace(case: PaceCase) -> None:
    pace = Pace(LIMITS, "blob x", now=0.0)
    pace.begin(0.0)
    if case.error is None:
        for now, got in case.reads:
            pace.check(now, got)
        return
    with pytest.raises(case.error, match=case.message):
        for now, got in case.reads:
            pace.check(now, got)


def test_pace_deadline_spans_requests_and_the_window_restarts() -> None:
    """A resumed request gets a fresh rate window but not a fresh deadline."""
    pace = Pace(LIMITS, "blob x", now=0.0)
    pace.begin(0.0)
    pace.check(9.0, 1)
    pace.begin(60.0)  # a retry: the slow first request is forgotten
    pace.check(65.0, 10)
    assert pace.wait_limit(95.0) == pytest.approx(5.0)  # the next read may wait only until the deadline
    with pytest.raises(DeadlineError, match="deadline"):
        pace.begin(100.0)
    assert isinstance(pace.stalled(50.0), SlowTransferError)
    assert isinstance(pace.stalled(100.0), DeadlineError)


# ---- where Basic credentials may go ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "realm", "refused"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000/token", None),
        ("http://reg.example:80", "http://REG.example/token", None),  # default port, host case
        ("https://reg.example", "https://auth.other.example/token", None),  # TLS authenticates it
        ("http://reg.example", "https://auth.other.example/token", None),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", "another origin over plain HTTP"),
        ("http://reg.example", "http://evil.example/token", "another origin over plain HTTP"),
        ("https://reg.example", "http://reg.example/token", "another origin over plain HTTP"),
        ("http://reg.example", "file:///etc/passwd", "not an http"),
        ("http://reg.example", "http://reg.example:notaport/t", "another origin"),
    ],
)
def test_credential_refusal(base: str, realm: str, refused: str | None) -> None:
    got = credential_refusal(base, realm)
    if refused is None:
        assert got is None
    else:
        assert got is not None and refused in got


# ---- digests from an image index and from the store's own index.json -------------------------------

GOOD = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../../etc", "sha256:" + "AB" * 32, "sha512:" + "ab" * 64, GOOD + "/x", None, 7],
)
def test_index_entry_digest_is_validated(digest: object) -> None:
    index = {"manifests": [{"digest": digest, "platform": {"os": "darwin", "architecture": "arm64"}}]}
    with pytest.raises(RegistryError, match=r"is not sha256:<64 hex>"):
        platform_digest(index, parse("r.io/m"))


def test_index_entry_digest_accepted() -> None:
    index = {"manifests": [{"digest": GOOD, "platform": {"os": "darwin", "architecture": "arm64"}}]}
    assert platform_digest(index, parse("r.io/m")) == GOOD


def test_store_index_drops_entries_whose_digest_is_a_path(tmp_path: Path) -> None:
    """A tampered index.json naming ``sha256:../../victim`` must not make open() delete outside."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("precious")
    root = tmp_path / "a" / "store"
    root.mkdir(parents=True)
    record: dict[str, object] = {
        "reference": "r",
        "layout": "modelpack",
        "format": None,
        "blobs": [],
        "files": [],
        "blobBytes": 0,
        "extractedBytes": 0,
        "lastUsed": 0,
    }
    bad = {"sha256:../../../victim": record, GOOD: {**record, "blobs": ["sha256:../../x"]}}
    (root / "index.json").write_text(json.dumps({"version": 1, "models": bad}))
    index = StoreIndex(root)
    index.open()
    assert index.models == {}
    assert (victim / "keep").read_text() == "precious"


# ---- GGUF nesting ------------------------------------------------------------------------------------


def _nested_gguf(depth: int) -> bytes:
    """A v3 header with one key whose value is an array of arrays ``depth`` deep, ending in a u32."""
    key = b"evil.nested"
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    out += struct.pack("<I", 9)  # the value is an array
    out += struct.pack("<IQ", 9, 1) * (depth - 1)  # of one array, of one array...
    return out + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)  # of one u32


def test_gguf_nesting_within_the_limit_parses() -> None:
    meta = gguf.parse_header(_nested_gguf(2))
    assert meta["evil.nested"] == [[7]]


@pytest.mark.parametrize("depth", [gguf.MAX_DEPTH + 1, 100_000])
def test_gguf_nesting_past_the_limit_is_a_gguf_error(depth: int) -> None:
    with pytest.raises(gguf.GGUFError, match=f"nests arrays deeper than {gguf.MAX_DEPTH}"):
        gguf.parse_header(_nested_gguf(depth))


# ---- tar: hardlinks, replaced directories, the uncompressed budget ---------------------------------


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """(kind, name, data or link target); kind in file|dir|symlink|hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[
                kind
            ]
            info.linkname = payload if isinstance(payload, str) else ""
            tf.addfile(info)
    return buf.getvalue()


TAR_REFUSALS = {
    "hardlink through a symlink": (
        _tar(("file", "sub/f", b"x"), ("symlink", "s", "sub"), ("hardlink", "h", "s/f")),
        "not a regular file extracted earlier",
    ),
    "hardlink to a file since replaced by a symlink": (
        _tar(("file", "f", b"x"), ("symlink", "f", "g"), ("hardlink", "h", "f")),
        "not a regular file extracted earlier",
    ),
    "hardlink to a directory": (_tar(("dir", "d", b""), ("hardlink", "h", "d")), "not a regular file"),
    "hardlink to a name never extracted": (_tar(("hardlink", "h", "later")), "not a regular file"),
    "directory replaced by a symlink": (
        _tar(("dir", "d", b""), ("file", "d/a", b"x"), ("symlink", "d", ".")),
        "a directory is already there",
    ),
    "directory entry through a symlink": (
        _tar(("symlink", "s", "."), ("dir", "s/d", b"")),
        "is a link or a file",
    ),
}


@pytest.mark.parametrize("case", sorted(TAR_REFUSALS))
def test_tar_refusals(tmp_path: Path, case: str) -> None:
    data, message = TAR_REFUSALS[case]
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafePathError, match=message):
        extract_tar(io.BytesIO(data), root, None, "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_hardlink_to_an_earlier_file_works(tmp_path: Path) -> None:
    files = extract_tar(
        io.BytesIO(_tar(("file", "d/f", b"abc"), ("hardlink", "g", "d/f"))), tmp_path, None, "t"
    )
    assert (tmp_path / "g").stat().st_ino == (tmp_path / "d" / "f").stat().st_ino
    assert sorted(files) == [("d/f", 3), ("g", 3)]


def test_gzip_bomb_stops_at_the_uncompressed_budget(tmp_path: Path) -> None:
    bomb = gzip.compress(_tar(("file", "zeros", bytes(32 << 20))))
    assert len(bomb) < 64 << 10  # small on the wire: the compressed size says nothing
    with pytest.raises(StoreFullError, match=r"expands past the 1048576 bytes left .* uncompressed"):
        extract_tar(io.BytesIO(bomb), tmp_path, "gzip", "t", limit=1 << 20)
    assert (tmp_path / "zeros").stat().st_size <= 1 << 20  # stopped; the caller removes its staging dir


def test_archive_within_the_budget_extracts(tmp_path: Path) -> None:
    data = gzip.compress(_tar(("file", "w", bytes(100 << 10))))
    assert extract_tar(io.BytesIO(data), tmp_path, "gzip", "t", limit=1 << 20) == [("w", 100 << 10)]


def test_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A pax header is read into memory whole: a big one is refused from its declared size."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("w")
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tf.addfile(info, io.BytesIO(b""))
    buf.seek(0)
    with pytest.raises(UnsafePathError, match=r"byte metadata header \(more than 1048576\); refused"):
        extract_tar(buf, tmp_path, None, "t")
    assert list(tmp_path.iterdir()) == []


def test_too_many_entries_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safepath, "MAX_ENTRIES", 10)
    data = _tar(*[("file", f"f{i}", b"") for i in range(11)])
    with pytest.raises(UnsafePathError, match="more than 10 tar entries; refused"):
        extract_tar(io.BytesIO(data), tmp_path, None, "t")
    assert len(list(tmp_path.iterdir())) == 10
