"""Keep every written path inside the model directory: annotation paths and tar entries alike.

Refused: absolute paths, ``..``, backslashes and NULs, writing through a symlink, replacing a
directory, symlinks whose target leaves the directory (lexically or through a link already
there), hardlinks to anything but a regular file the same archive wrote earlier, device/FIFO
entries, and archives that expand past the bytes the store has left. Every write walks its
parents with ``lstat`` and opens with ``O_NOFOLLOW``, so a link never redirects a write. Callers
materialize into a fresh staging directory, so a refused entry leaves nothing behind outside it.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, Any

from orchardist.oci.errors import StoreFullError, UnsafePathError

COPY_CHUNK = 1 << 20
#: a pax or GNU long-name header is read into memory whole: bigger ones are refused
MAX_META_HEADER = 1 << 20
#: entries per archive (each costs an inode and memory while extracting); a model has a few hundred
MAX_ENTRIES = 100_000


class _BoundedInfo(tarfile.TarInfo):
    """Tar headers whose metadata blocks (read into memory before we see the entry) are bounded."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > MAX_META_HEADER:
            raise UnsafePathError(
                f"tar entry {self.name[:80]!r}: a {self.size}-byte metadata header "
                f"(more than {MAX_META_HEADER}); refused"
            )
        return super()._proc_member(tf)  # type: ignore[misc,no-any-return]


_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


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


class _Budget:
    """Uncompressed bytes an archive may still produce; a stream wrapper counts every byte read.

    Counting the decompressed stream (headers, padding and data) and not the compressed blob is
    what stops a small layer that expands past the store's budget (a compression bomb).
    """

    def __init__(self, src: IO[bytes], limit: int, what: str) -> None:
        self.src = src
        self.left = limit
        self.limit = limit
        self.what = what

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n if n >= 0 else self.left + 1)
        self.left -= len(data)
        if self.left < 0:
            raise StoreFullError(
                f"{self.what}: expands past the {self.limit} bytes left in the store budget "
                "(counted uncompressed); extraction stopped"
            )
        return data


def extract_tar(
    src: IO[bytes], root: Path, compression: str | None, what: str, *, limit: int | None = None
) -> list[tuple[str, int]]:
    """Extract a (gzip/zstd-compressed) tar stream into ``root`` safely; returns (path, size) of files.

    ``limit`` caps the uncompressed bytes read (:class:`StoreFullError` past it). The caller
    extracts into a private staging directory and removes it on any error.
    """
    stream: Any = src  # a file, a decompressor or the budget counter: all have read()
    if compression == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(src)
    elif compression == "gzip":
        stream = gzip.GzipFile(fileobj=src, mode="rb")
    if limit is not None:
        stream = _Budget(stream, limit, what)
    files: list[tuple[str, int]] = []
    extracted: dict[PurePosixPath, tuple[int, int]] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedInfo) as tf:
            for count, member in enumerate(tf, 1):
                tf.members.clear()  # type: ignore[attr-defined]  # a stream is read once: keeping every header only costs memory
                if count > MAX_ENTRIES:
                    raise UnsafePathError(f"{what}: more than {MAX_ENTRIES} tar entries; refused")
                _extract_member(tf, member, root, what, files, extracted)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UnsafePathError(f"{what}: not a readable tar archive: {exc}") from exc
    return files


def _extract_member(
    tf: tarfile.TarFile,
    m: tarfile.TarInfo,
    root: Path,
    what: str,
    files: list[tuple[str, int]],
    extracted: dict[PurePosixPath, tuple[int, int]],
) -> None:
    """One entry. ``extracted`` maps each regular file written so far to its (device, inode)."""
    name = m.name.removeprefix("./")
    if name in ("", "."):
        return
    rel = safe_relpath(name, f"{what}: tar entry")
    if m.isdir():
        ensure_dir(root, rel, f"{what}: tar entry")
        return
    if m.isreg():
        dest = prepare(root, rel, f"{what}: tar entry")
        extracted.pop(rel, None)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        reader = tf.extractfile(m)
        assert reader is not None
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(reader, out, COPY_CHUNK)
            os.fchmod(out.fileno(), 0o755 if m.mode & 0o111 else 0o644)
            st = os.fstat(out.fileno())
        extracted[rel] = (st.st_dev, st.st_ino)
        files.append((str(rel), m.size))
        return
    if m.issym():
        dest = prepare(root, rel, f"{what}: tar entry")
        _check_symlink(root, rel, m.linkname)
        extracted.pop(rel, None)
        dest.symlink_to(m.linkname)
        return
    if m.islnk():
        _hardlink(root, rel, m.linkname, what, files, extracted)
        return
    raise UnsafePathError(f"{what}: tar entry {name!r} is a device, FIFO or other special file; refused")


def _check_symlink(root: Path, rel: PurePosixPath, target: str) -> None:
    """Refuse a symlink that leaves ``root``, judged lexically and by the real path as it is now.

    The parent was just walked without links (:func:`prepare`), so resolving the target against
    the real tree catches a target that goes through an earlier symlink and then ``..``. A link
    added later that changes what this one resolves to is caught by :func:`check_tree`.
    """
    if not target or target.startswith("/") or "\x00" in target:
        raise UnsafePathError(f"symlink {str(rel)!r} -> {target!r}: absolute or empty target")
    joined = posixpath.normpath(posixpath.join(str(rel.parent), target))
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise UnsafePathError(f"symlink {str(rel)!r} -> {target!r} escapes the model directory")
    real_root = os.path.realpath(root)
    real = os.path.realpath(root.joinpath(*rel.parent.parts) / target)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise UnsafePathError(
            f"symlink {str(rel)!r} -> {target!r} resolves outside the model directory (through a link)"
        )


def _hardlink(
    root: Path,
    rel: PurePosixPath,
    linkname: str,
    what: str,
    files: list[tuple[str, int]],
    extracted: dict[PurePosixPath, tuple[int, int]],
) -> None:
    """A hardlink only to a regular file this archive wrote earlier, reached without any symlink."""
    target = safe_relpath(linkname.removeprefix("./"), f"{what}: hardlink {str(rel)!r} target")
    refused = f"{what}: hardlink {str(rel)!r} -> {linkname!r}"
    if target not in extracted:
        raise UnsafePathError(f"{refused}: not a regular file extracted earlier from this archive")
    src = root
    for part in target.parts:
        src = src / part
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            raise UnsafePathError(f"{refused}: the file extracted earlier is gone") from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{refused}: the path goes through a symlink")
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != extracted[target]:
        raise UnsafePathError(f"{refused}: not the file extracted earlier from this archive")
    dest = prepare(root, rel, f"{what}: tar entry")
    os.link(src, dest, follow_symlinks=False)
    extracted[rel] = extracted[target]
    files.append((str(rel), st.st_size))


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
