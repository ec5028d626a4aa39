"""Model directories from verified blobs: inside the store, and exported to a caller's directory.

Both are plain blocking filesystem work (links, tar extraction, fsync); async callers run them
with ``asyncio.to_thread``. Every path goes through :mod:`orchardist.oci.safepath`, so nothing a
manifest or an archive names can land outside the directory being built. A tar layer comes from
its blob (extracted here) or, when it was unpacked while it downloaded
(:mod:`orchardist.oci.unpack`), from that directory: its files linked in by the same path rules,
so the model is on disk once.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from orchardist.oci.fsutil import fsync_path, link_or_copy, remove_tree
from orchardist.oci.layouts import Layout
from orchardist.oci.safepath import check_tree, ensure_dir, extract_tar, prepare, safe_relpath
from orchardist.oci.unpack import Unpacked

_COMPRESSION = {"tar": None, "tar+gzip": "gzip", "tar+zstd": "zstd"}


def materialize(
    layout: Layout,
    blob_path: Callable[[str], Path],
    final: Path,
    *,
    extract_limit: int | None = None,
    unpacked: Mapping[str, Unpacked] | None = None,
) -> tuple[list[tuple[str, int]], int]:
    """Build ``final`` in a staging dir beside it, check it, then rename it into place.

    Returns the files (relative path, size) and the bytes extracted from archives (on disk besides
    the blobs). ``extract_limit`` caps the uncompressed bytes all archives extracted here may read
    (the room left in the store); a layer in ``unpacked`` (by digest) was counted as it unpacked
    and is linked in, not extracted. A failure leaves nothing behind.
    """
    unpacked = unpacked or {}
    staging = final.parent / f".staging-{final.name[:12]}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    files: list[tuple[str, int]] = []
    extracted = 0
    try:
        for e in layout.entries:
            blob = blob_path(e.layer.digest)
            if e.archive is None:
                dest = prepare(staging, safe_relpath(e.path), "file")
                link_or_copy(blob, dest)
                files.append((e.path, e.layer.size))
                continue
            into = ensure_dir(staging, safe_relpath(e.path)) if e.path else staging
            prefix = f"{e.path}/" if e.path else ""
            done = unpacked.get(e.layer.digest)
            if done is not None:
                _link_tree(done.path, into, f"layer {e.layer.digest[:19]}: tar entry")
                files.extend((prefix + p, s) for p, s in done.files)
                extracted += done.size
                continue
            with open(blob, "rb") as f:
                got = extract_tar(
                    f,
                    into,
                    _COMPRESSION[e.archive],
                    f"layer {e.layer.digest[:19]}",
                    limit=None if extract_limit is None else max(0, extract_limit - extracted),
                )
            files.extend((prefix + p, s) for p, s in got)
            extracted += sum(s for _, s in got)
        check_tree(staging)
        remove_tree(final)
        staging.rename(final)
        fsync_path(final.parent)
    except BaseException:
        remove_tree(staging)
        raise
    return files, extracted


def export(src: Path, dest: Path) -> Path:
    """Recreate the model directory ``src`` at ``dest``: files linked when possible, symlinks kept."""
    dest.mkdir(parents=True, exist_ok=True)
    _link_tree(src, dest, "file")
    return dest


def _link_tree(src: Path, dest: Path, what: str) -> None:
    """``src``'s tree into the directory ``dest``: directories made, files linked, symlinks copied,
    every write checked by :func:`prepare` / :func:`ensure_dir` (what is there already decides, as
    when a later archive is extracted over an earlier one; the caller checks the finished tree)."""
    for dirpath, dirnames, names in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirnames:
            full = Path(dirpath) / d
            if full.is_symlink():
                continue
            ensure_dir(dest, PurePosixPath(*(rel / d).parts), what)
        for n in names:
            s = Path(dirpath) / n
            target = prepare(dest, PurePosixPath(*(rel / n).parts), what)
            if s.is_symlink():
                target.symlink_to(s.readlink())
            else:
                link_or_copy(s, target)
        for d in dirnames:
            full = Path(dirpath) / d
            if full.is_symlink():
                prepare(dest, PurePosixPath(*(rel / d).parts), what).symlink_to(full.readlink())
