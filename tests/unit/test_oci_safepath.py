"""Path safety and tar extraction on a scratch directory (pure filesystem, no network)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from orchardist.oci.errors import UnsafePathError
from orchardist.oci.safepath import check_tree, extract_tar, prepare, safe_relpath


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a", "a"),
        ("./a/b", "a/b"),
        ("a//b/", "a/b"),
        ("a/./b", "a/b"),
        ("dir/model.safetensors", "dir/model.safetensors"),
    ],
)
def test_safe_relpath(raw: str, clean: str) -> None:
    assert str(safe_relpath(raw)) == clean


@pytest.mark.parametrize("raw", ["", ".", "/", "/a", "..", "a/..", "a/../..", "a\\b", "a\x00b"])
def test_safe_relpath_refuses(raw: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(raw)


def test_prepare_refuses_to_write_through_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="link"):
        prepare(root, PurePosixPath("link/x"))


def _tar(members: list[tarfile.TarInfo], payloads: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m in members:
            data = payloads.get(m.name)
            if data is not None:
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname, i.mode = kind, link, mode
    return i


def test_extract_regular_dirs_links(tmp_path: Path) -> None:
    buf = _tar(
        [
            _info("./model", tarfile.DIRTYPE),
            _info("./model/w.safetensors"),
            _info("run.sh", mode=0o755),
            _info("model/alias", tarfile.SYMTYPE, "w.safetensors"),
            _info("model/hard", tarfile.LNKTYPE, "model/w.safetensors"),
        ],
        {"./model/w.safetensors": b"weights", "run.sh": b"#!/bin/sh\n"},
    )
    files = extract_tar(buf, tmp_path, None, "t")
    assert (tmp_path / "model" / "w.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "model" / "alias").resolve() == (tmp_path / "model" / "w.safetensors").resolve()
    assert (tmp_path / "model" / "hard").stat().st_ino == (tmp_path / "model" / "w.safetensors").stat().st_ino
    assert (tmp_path / "run.sh").stat().st_mode & 0o111
    assert sorted(files) == [("model/hard", 7), ("model/w.safetensors", 7), ("run.sh", 10)]
    check_tree(tmp_path)


@pytest.mark.parametrize(
    "members",
    [
        [_info("../x")],
        [_info("/abs")],
        [_info("l", tarfile.SYMTYPE, "/etc")],
        [_info("l", tarfile.SYMTYPE, "../..")],
        [_info("l", tarfile.SYMTYPE, "."), _info("l/x")],  # writing through a symlink
        [_info("h", tarfile.LNKTYPE, "../outside")],
        [_info("h", tarfile.LNKTYPE, "missing")],
        [_info("dev", tarfile.CHRTYPE)],
        [_info("blk", tarfile.BLKTYPE)],
        [_info("fifo", tarfile.FIFOTYPE)],
    ],
)
def test_extract_refuses(tmp_path: Path, members: list[tarfile.TarInfo]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    payloads = {m.name: b"x" for m in members if m.type == tarfile.REGTYPE}
    with pytest.raises(UnsafePathError):
        extract_tar(_tar(members, payloads), root, None, "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_symlink_through_an_earlier_link_is_refused_at_creation(tmp_path: Path) -> None:
    """``a/../x`` is inside lexically, but ``a`` is a link to ``.``: really ``../x``."""
    root = tmp_path / "root"
    root.mkdir()
    members = [_info("a", tarfile.SYMTYPE, "."), _info("b", tarfile.SYMTYPE, "a/../x")]
    with pytest.raises(UnsafePathError, match=r"'b' -> 'a/\.\./x' resolves outside"):
        extract_tar(_tar(members, {}), root, None, "t")
    assert not (root / "b").is_symlink()


def test_check_tree_catches_symlink_chains(tmp_path: Path) -> None:
    """The link that makes ``b`` escape comes after it: only the whole-tree check can see it."""
    root = tmp_path / "root"
    root.mkdir()
    extract_tar(
        _tar([_info("b", tarfile.SYMTYPE, "a/../x"), _info("a", tarfile.SYMTYPE, ".")], {}), root, None, "t"
    )
    with pytest.raises(UnsafePathError, match="'b'"):
        check_tree(root)


def test_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="not a readable tar"):
        extract_tar(io.BytesIO(b"\x1f\x8bgarbage"), tmp_path, "gzip", "t")
