"""The store's index: which verified blobs and materialized models are on disk.

Layout under ``root``::

    blobs/sha256/<hex>       verified blobs, read-only, each stored once whatever uses it
    manifests/sha256/<hex>   the raw manifest of each materialized model
    models/<hex>/            a model directory, files linked from blobs (clone/hardlink/copy)
    tmp/<hex>.<src>.partial  a download in progress from one source (registry + repository):
                             kept after a cut so the next try from that source resumes
    layers/<hex>.<random>/   a tar layer unpacked while it downloaded, verified, for the pulls in
                             flight (linked into their models, then removed); ``.staging-*`` there
                             while it arrives. Both are a pull's transient state: dropped on open
    .lock                    held (flock) by the one process that owns the root
    index.json               model records (reference, blobs, files, last use), written atomically

``index.json`` is a cache of what is on disk: on open it is checked against the disk and rebuilt
from the manifests when missing or torn (a write is temp file + fsync + rename, so a crash leaves
the old or the new file, but a copy or a bad disk can still tear it).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchardist import log
from orchardist.oci.client import sha256_digest
from orchardist.oci.errors import OCIError
from orchardist.oci.fsutil import atomic_write, fsync_path, remove_tree
from orchardist.oci.layouts import Layout, read_layout

_log = log.get(__name__)

INDEX_VERSION = 1


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def valid_digest(value: object) -> bool:
    """``sha256:<64 lower-case hex>``: the only digests that may become a path under the root."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


def blob_list(layout: Layout) -> list[str]:
    """Every blob a model needs (config first), once each."""
    return list(dict.fromkeys([layout.config.digest, *(e.layer.digest for e in layout.entries)]))


def stored_blobs(layout: Layout) -> list[str]:
    """The blobs a materialized model keeps by default: the config and every raw file. A layer
    used only as an archive lives on as the files extracted from it, so it is on disk once."""
    raw = {layout.config.digest, *(e.layer.digest for e in layout.entries if e.archive is None)}
    return [b for b in blob_list(layout) if b in raw]


def unpackable(layout: Layout) -> dict[str, str]:
    """Layers a model never keeps as blobs (see :func:`stored_blobs`), digest -> archive kind: each
    used only as one kind of tar. These can be unpacked while they download."""
    kinds: dict[str, set[str | None]] = {}
    for e in layout.entries:
        kinds.setdefault(e.layer.digest, set()).add(e.archive)
    return {
        d: kind
        for d, k in kinds.items()
        if len(k) == 1 and (kind := next(iter(k))) is not None and d != layout.config.digest
    }


def _remove(p: Path) -> None:
    """Remove a stray entry, a directory or not (a link itself, never what it points to)."""
    if p.is_dir() and not p.is_symlink():
        remove_tree(p)
    else:
        p.unlink(missing_ok=True)


@dataclass
class ModelRecord:
    reference: str
    layout: str
    format: str | None
    blobs: list[str]
    files: list[tuple[str, int]]
    blob_bytes: int
    extracted_bytes: int
    last_used: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.blob_bytes + self.extracted_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "layout": self.layout,
            "format": self.format,
            "blobs": self.blobs,
            "files": [list(f) for f in self.files],
            "blobBytes": self.blob_bytes,
            "extractedBytes": self.extracted_bytes,
            "lastUsed": self.last_used,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelRecord:
        return cls(
            reference=str(d["reference"]),
            layout=str(d["layout"]),
            format=d.get("format"),
            blobs=[str(b) for b in d["blobs"]],
            files=[(str(p), int(s)) for p, s in d["files"]],
            blob_bytes=int(d["blobBytes"]),
            extracted_bytes=int(d["extractedBytes"]),
            last_used=float(d["lastUsed"]),
        )


class StoreIndex:
    """Blobs (digest -> size) and model records, the directories they live in, and their upkeep.

    Methods that touch the disk are synchronous; async callers run them with ``asyncio.to_thread``
    (the in-memory maps are only ever changed on the event loop thread).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.manifest_dir = root / "manifests" / "sha256"
        self.model_dir = root / "models"
        self.tmp_dir = root / "tmp"
        self.layers_dir = root / "layers"
        self.blobs: dict[str, int] = {}
        self.models: dict[str, ModelRecord] = {}

    def blob_path(self, digest: str) -> Path:
        return self.blob_dir / hex_of(digest)

    def model_path(self, digest: str) -> Path:
        return self.model_dir / hex_of(digest)

    def manifest_path(self, digest: str) -> Path:
        return self.manifest_dir / hex_of(digest)

    # ---- opening: checked against the disk ---------------------------------------------------

    def open(self) -> None:
        """Create the layout, drop leftovers of a crash, load ``index.json`` and check it."""
        for d in (self.blob_dir, self.manifest_dir, self.model_dir, self.tmp_dir, self.layers_dir):
            d.mkdir(parents=True, exist_ok=True)
        for p in self.layers_dir.iterdir():  # only pulls in flight use these; none survives a restart
            _remove(p)
        for p in self.blob_dir.iterdir():
            if valid_digest("sha256:" + p.name) and p.is_file() and not p.is_symlink():
                self.blobs["sha256:" + p.name] = p.stat().st_size
            else:
                _remove(p)
        for p in self.model_dir.iterdir():
            if p.name.startswith(".staging-"):
                remove_tree(p)
        for p in self.root.glob(".index.json.*.tmp"):  # an index write cut short by a crash
            p.unlink(missing_ok=True)
        for digest, record in self._load().items():
            if self._intact(digest, record):
                self.models[digest] = record
        for p in self.manifest_dir.iterdir():
            digest = "sha256:" + p.name
            if digest in self.models:
                continue
            if not valid_digest(digest) or not p.is_file():
                _log.warning("stray file in the store's manifests dropped", name=p.name[:80])
                _remove(p)
                continue
            rebuilt = self._rebuild(digest, p)
            if rebuilt is not None:
                self.models[digest] = rebuilt
            else:
                p.unlink(missing_ok=True)
        for p in self.model_dir.iterdir():
            if "sha256:" + p.name not in self.models:
                remove_tree(p)
        self.write(self.snapshot())

    def _load(self) -> dict[str, ModelRecord]:
        index = self.root / "index.json"
        try:
            raw: dict[str, Any] = (
                json.loads(index.read_text()) if index.exists() else {"version": INDEX_VERSION}
            )
            loaded: dict[str, Any] = (raw.get("models") or {}) if raw.get("version") == INDEX_VERSION else {}
            items = list(loaded.items())
        except (OSError, ValueError, AttributeError):
            _log.warning("store index unreadable (torn write?); rebuilding it from disk", root=str(self.root))
            return {}
        records: dict[str, ModelRecord] = {}
        for digest, rec in items:
            try:
                record = ModelRecord.from_json(rec)
            except (KeyError, TypeError, ValueError):
                continue
            # A digest names a directory that GC deletes: anything else could point outside the root.
            if not valid_digest(digest) or not all(valid_digest(b) for b in record.blobs):
                _log.warning("store index entry with an invalid digest dropped", digest=str(digest)[:80])
                continue
            records[str(digest)] = record
        return records

    def _intact(self, digest: str, record: ModelRecord) -> bool:
        return (
            self.model_path(digest).is_dir()
            and self.manifest_path(digest).is_file()
            and all(b in self.blobs for b in record.blobs)
        )

    def _rebuild(self, digest: str, manifest_path: Path) -> ModelRecord | None:
        """A record from a manifest on disk, if its blobs and model directory are all there."""
        try:
            raw = manifest_path.read_bytes()
            if sha256_digest(raw) != digest:
                return None
            data = json.loads(raw)
            layout = read_layout(data)
        except (OSError, ValueError, OCIError):
            return None
        # archive blobs are usually gone (their files are the model); a kept one stays referenced
        blobs = [b for b in blob_list(layout) if b in self.blobs]
        path = self.model_path(digest)
        if not path.is_dir() or not all(b in self.blobs for b in stored_blobs(layout)):
            return None
        files = []
        for dirpath, _, names in os.walk(path):
            for n in names:
                full = Path(dirpath) / n
                if not full.is_symlink():
                    files.append((str(full.relative_to(path)), full.stat().st_size))
        extracted = sum(s for p, s in files if layout.find(p) is None)
        return ModelRecord(
            reference=str(data.get("annotations", {}).get("org.opencontainers.image.ref.name", "")),
            layout=layout.name,
            format=layout.format_with(p for p, _ in files),
            blobs=blobs,
            files=sorted(files),
            blob_bytes=sum(self.blobs[b] for b in blobs),
            extracted_bytes=extracted,
            last_used=path.stat().st_mtime,
        )

    # ---- writing ------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The index as it is now (taken on the loop, written by :meth:`write` in a thread)."""
        body = {"version": INDEX_VERSION, "models": {d: r.to_json() for d, r in sorted(self.models.items())}}
        return json.dumps(body, indent=1).encode()

    def write(self, body: bytes) -> None:
        atomic_write(self.root / "index.json", body)

    def commit_blob(self, digest: str, tmp: Path) -> int:
        """Make a verified, fsynced download the blob for ``digest``; returns its size (disk work)."""
        tmp.chmod(0o444)
        tmp.replace(self.blob_path(digest))
        fsync_path(self.blob_dir)
        return self.blob_path(digest).stat().st_size

    def write_small(self, digest: str, data: bytes, tag: str) -> Path:
        """A small verified blob written and fsynced to ``tmp/``, ready for :meth:`commit_blob`."""
        tmp = self.tmp_dir / f"{hex_of(digest)}.{tag}.small"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def partials(self) -> dict[str, tuple[str, int]]:
        """Files in ``tmp/``: name -> (the blob digest each downloads, its size so far)."""
        found: dict[str, tuple[str, int]] = {}
        for p in self.tmp_dir.iterdir():
            try:
                found[p.name] = ("sha256:" + p.name.split(".")[0], p.stat().st_size)
            except OSError:
                continue
        return found

    def delete(self, models: list[str], blobs: list[str], partials: list[str]) -> None:
        """Remove evicted models, unreferenced blobs and stale partials from disk (disk work)."""
        for digest in models:
            remove_tree(self.model_path(digest))
            self.manifest_path(digest).unlink(missing_ok=True)
        for digest in blobs:
            self.blob_path(digest).unlink(missing_ok=True)
        for name in partials:
            (self.tmp_dir / name).unlink(missing_ok=True)
