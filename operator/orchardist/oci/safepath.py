"""Keep every written path inside the model directory: annotation paths and tar entries alike.

Refused: absolute paths, ``..``, backslashes and NULs, writing through a symlink, symlinks or
hardlinks whose target leaves the directory, and device/FIFO entries. Callers materialize into a
fresh staging directory, so a refused entry leaves nothing behind outside it.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

from orchardist.oci.errors import UnsafePathError

COPY_CHUNK = 1 << 20


def safe_relpath(path: str, what: str = "path") -> PurePosixPath:
    """A normalized relative POSIX path, or :class:`UnsafePathError`."""
    if not path or "\x00" in path or "\\" in path:
        raise UnsafePathError(f"{what} {path!r}: empty or contains NUL/backslash")
    if path.startswith("/"):
        raise UnsafePathError(f"{what} {path!r}: absolute paths are refused")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{what} {path!r}: '..' is refused")
    if not parts:
        raise UnsafePathError(f"{what} {path!r}: names no file")
    return PurePosixPath(*parts)


def prepare(root: Path, rel: PurePosixPath, what: str = "path") -> Path:
    """The destination for ``rel`` under ``root``, parents created; never through a symlink."""
    cur = root
    for part in rel.parts[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            cur.mkdir(0o755)
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{what} {str(rel)!r}: parent {part!r} is a link or a file")
    dest = cur / rel.parts[-1]
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return dest
    if stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{what} {str(rel)!r}: a directory is already there")
    dest.unlink()  # a later entry replaces an earlier one, as tar does; never follow it
    return dest


def _check_symlink(rel: PurePosixPath, target: str) -> None:
    if not target or target.startswith("/") or "\x00" in target:
        raise UnsafePathError(f"symlink {str(rel)!r} -> {target!r}: absolute or empty target")
    joined = posixpath.normpath(posixpath.join(str(rel.parent), target))
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise UnsafePathError(f"symlink {str(rel)!r} -> {target!r} escapes the model directory")


def extract_tar(src: IO[bytes], root: Path, compression: str | None, what: str) -> list[tuple[str, int]]:
    """Extract a (gzip/zstd-compressed) tar stream into ``root`` safely; returns (path, size) of files."""
    stream: IO[bytes] = src
    if compression == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(src)
    mode = "r|gz" if compression == "gzip" else "r|"
    files: list[tuple[str, int]] = []
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tf:  # type: ignore[call-overload]
            for member in tf:
                _extract_member(tf, member, root, what, files)
    except tarfile.TarError as exc:
        raise UnsafePathError(f"{what}: not a readable tar archive: {exc}") from exc
    return files


def _extract_member(
    tf: tarfile.TarFile, m: tarfile.TarInfo, root: Path, what: str, files: list[tuple[str, int]]
) -> None:
    name = m.name.removeprefix("./")
    if name in ("", "."):
        return
    rel = safe_relpath(name, f"{what}: tar entry")
    if m.isdir():
        dest = root.joinpath(*rel.parts)
        if dest.is_symlink():
            raise UnsafePathError(f"{what}: tar entry {name!r}: a symlink is in the way")
        if not dest.is_dir():
            prepare(root, rel, f"{what}: tar entry")
            dest.mkdir(0o755)
        return
    if m.isreg():
        dest = prepare(root, rel, f"{what}: tar entry")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        reader = tf.extractfile(m)
        assert reader is not None
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(reader, out, COPY_CHUNK)
        dest.chmod(0o755 if m.mode & 0o111 else 0o644)
        files.append((str(rel), m.size))
        return
    if m.issym():
        _check_symlink(rel, m.linkname)
        dest = prepare(root, rel, f"{what}: tar entry")
        dest.symlink_to(m.linkname)
        return
    if m.islnk():
        target = safe_relpath(m.linkname.removeprefix("./"), f"{what}: hardlink {name!r} target")
        src = root.joinpath(*target.parts)
        if src.is_symlink() or not src.is_file():
            raise UnsafePathError(f"{what}: hardlink {name!r} -> {m.linkname!r} names no extracted file")
        dest = prepare(root, rel, f"{what}: tar entry")
        os.link(src, dest)
        files.append((str(rel), src.stat().st_size))
        return
    raise UnsafePathError(f"{what}: tar entry {name!r} is a device, FIFO or other special file; refused")


def check_tree(root: Path) -> None:
    """After extraction: every symlink in the tree must resolve inside ``root`` (catches link chains)."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                resolved = os.path.realpath(p)
                if resolved != real_root and not resolved.startswith(real_root + os.sep):
                    rel = os.path.relpath(p, root)
                    raise UnsafePathError(f"symlink {rel!r} resolves outside the model directory")


def ensure_dir(root: Path, rel: PurePosixPath, what: str = "path") -> Path:
    """``root/rel`` as a real directory (created if missing), never reached through a symlink."""
    cur = root
    for part in rel.parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            cur.mkdir(0o755)
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{what} {str(rel)!r}: {part!r} is a link or a file")
    return cur
