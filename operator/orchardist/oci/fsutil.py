"""Filesystem steps the store needs to be crash-safe and cheap on disk."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so a rename or new entry in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file, fsync, rename, fsync the directory: readers see old or new, never torn."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_path(path.parent)


_clonefile = None
if sys.platform == "darwin":  # APFS copy-on-write clone: a private copy that shares the blocks
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _clonefile = getattr(_libc, "clonefile", None)


_sync_file_range = None
if sys.platform.startswith("linux"):
    try:
        _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
        _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    except (OSError, AttributeError):
        _sync_file_range = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (Linux), so the final fsync is short."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE: start, do not wait


def link_or_copy(src: Path, dst: Path) -> str:
    """Materialize ``dst`` from ``src``: clonefile (APFS), else hardlink, else copy. Returns which."""
    if _clonefile is not None and _clonefile(os.fsencode(src), os.fsencode(dst), 0) == 0:
        return "clone"
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    shutil.copyfile(src, dst)
    dst.chmod(0o444)
    return "copy"


def remove_tree(path: Path) -> None:
    """rmtree that also handles read-only files and a path that is already gone."""
    if not path.exists() and not path.is_symlink():
        return

    def onerror(func: object, name: str, _exc: object) -> None:
        p = Path(name)
        with contextlib.suppress(OSError):
            p.parent.chmod(0o755)
            p.chmod(0o755)
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()

    shutil.rmtree(path, onerror=onerror)


def remove_trees(paths: Iterable[Path]) -> None:
    """:func:`remove_tree` of each (one thread call for an async caller: it ends even if cancelled)."""
    for p in paths:
        remove_tree(p)
