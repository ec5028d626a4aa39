"""Push a model directory as an OCI artifact: CNCF ModelPack (default) or Docker Model Runner.

Docker's own packager writes config v0.1 for a GGUF model (weights, license, chat template and
projector, found by media type; what older clients read) and v0.2 for a directory; ``auto`` does
the same.

One layer per file, uncompressed, each annotated with its relative path, so any reader can
materialize it without guessing. Blobs the registry already has are skipped (HEAD first); big
blobs go up in chunks so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from orchardist import log
from orchardist.oci import gguf
from orchardist.oci import mediatypes as mt
from orchardist.oci.auth import Credentials
from orchardist.oci.client import RegistryClient, sha256_digest
from orchardist.oci.errors import OCIError
from orchardist.oci.progress import ProgressCallback, Tracker
from orchardist.oci.reference import Reference, parse

_log = log.get(__name__)

Format = Literal["modelpack", "docker"]
DockerConfig = Literal["auto", "v0.1", "v0.2"]
#: the media types a v0.1 reader finds by type: anything else needs v0.2's per-file paths
_V01_TYPES = (mt.DMR_GGUF, mt.DMR_LICENSE, mt.DMR_CHAT_TEMPLATE, mt.DMR_MMPROJ)
HASH_CHUNK = 4 << 20


@dataclass(frozen=True)
class Blob:
    """Something to upload: bytes in memory or a file on disk, with its descriptor fields."""

    media_type: str
    digest: str
    size: int
    source: Path | bytes
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of_bytes(cls, media_type: str, data: bytes, annotations: Mapping[str, str] | None = None) -> Blob:
        return cls(media_type, sha256_digest(data), len(data), data, dict(annotations or {}))

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def _is_weight(name: str) -> bool:
    return name.lower().endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth", ".onnx", ".dduf"))


def _is_license(name: str) -> bool:
    return bool(re.search(r"licen[cs]e|copying|notice", name.lower()))


def modelpack_media_type(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    if _is_weight(name):
        return mt.MODELPACK_WEIGHT_RAW
    if _is_license(name) or name.lower().endswith(".md"):
        return mt.MODELPACK_DOC_RAW
    if name.endswith(".py"):
        return mt.MODELPACK_CODE_RAW
    return mt.MODELPACK_WEIGHT_CONFIG_RAW


def docker_media_type(rel: str) -> str:
    """Docker Model Runner's classification of a file in a directory (layer-per-file, v0.2)."""
    name = rel.rsplit("/", 1)[-1].lower()
    if "mmproj" in name and name.endswith(".gguf"):
        return mt.DMR_MMPROJ
    if name.endswith(".gguf"):
        return mt.DMR_GGUF
    if name.endswith(".safetensors"):
        return mt.DMR_SAFETENSORS
    if name.endswith(".dduf"):
        return mt.DMR_DDUF
    if name.endswith(".jinja") or "chat_template" in name:
        return mt.DMR_CHAT_TEMPLATE
    if _is_license(name):
        return mt.DMR_LICENSE
    return mt.DMR_FILE


def docker_config_version(rels: Sequence[str], wanted: DockerConfig = "auto") -> str:
    """The DMR config media type for these files: v0.1 for a GGUF model as Docker writes it."""
    off = [r for r in rels if "/" in r or docker_media_type(r) not in _V01_TYPES]
    gguf_model = any(docker_media_type(r) == mt.DMR_GGUF for r in rels)
    if wanted == "v0.1" and (off or not gguf_model):
        raise OCIError(
            "Docker config v0.1 holds only top-level GGUF weights, license, chat template and "
            f"projector; not {', '.join(off[:5]) or 'a model without GGUF weights'} (use v0.2)"
        )
    if wanted == "v0.1" or (wanted == "auto" and gguf_model and not off):
        return mt.DMR_CONFIG_V01
    return mt.DMR_CONFIG_V02


def scan(model_dir: Path) -> list[tuple[str, Path]]:
    """(relative path, file) of every regular file, hidden files skipped, sorted by path."""
    root = model_dir.resolve()
    out: list[tuple[str, Path]] = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(root) and not p.resolve().is_file():
            continue
        out.append((rel.as_posix(), p))
    if not out:
        raise OCIError(f"{model_dir}: no files to push")
    return out


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _file_annotations(rel: str, path: Path, size: int, *, title: bool) -> dict[str, str]:
    st = path.stat()
    meta = {
        "name": rel,
        "mode": st.st_mode & 0o777,
        "uid": 0,
        "gid": 0,
        "size": size,
        "mtime": datetime.fromtimestamp(st.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "typeflag": 0,
    }
    ann = {
        mt.FILEPATH: rel,
        mt.FILE_METADATA: json.dumps(meta, separators=(",", ":")),
        mt.MEDIATYPE_UNTESTED: "false",
    }
    if title:
        ann[mt.TITLE] = rel
    return ann


def _model_facts(files: Sequence[tuple[str, Path]]) -> dict[str, Any]:
    """Architecture, format, quantization, context from config.json or a GGUF header (for the config blob)."""
    facts: dict[str, Any] = {}
    names = [rel for rel, _ in files]
    if any(n.lower().endswith(".gguf") for n in names):
        facts["format"] = "gguf"
        first = next(p for rel, p in files if rel.lower().endswith(".gguf") and "mmproj" not in rel.lower())
        with first.open("rb") as f:
            head = f.read(32 << 20)
        try:
            meta = gguf.parse_header(head)
            arch = meta.get("general.architecture")
            facts["architecture"] = arch
            if arch and isinstance(meta.get(f"{arch}.context_length"), int):
                facts["context_size"] = meta[f"{arch}.context_length"]
            ftype = meta.get("general.file_type")
            if ftype is not None:
                from orchardist.planning.profile import GGUF_FILE_TYPES

                facts["quantization"] = GGUF_FILE_TYPES.get(int(ftype), str(ftype))
        except gguf.GGUFError:
            pass
    elif any(n.lower().endswith(".safetensors") for n in names):
        facts["format"] = "safetensors"
    cfg = next((p for rel, p in files if rel == "config.json"), None)
    if cfg is not None:
        try:
            c = json.loads(cfg.read_text())
        except (OSError, ValueError):
            c = {}
        if isinstance(c, dict):
            archs = c.get("architectures") or []
            facts.setdefault("architecture", archs[0] if archs else c.get("model_type"))
            text_config = c.get("text_config")
            text: dict[str, Any] = text_config if isinstance(text_config, dict) else c
            ctx = text.get("max_position_embeddings")
            if isinstance(ctx, int):
                facts.setdefault("context_size", ctx)
            q = c.get("quantization") or c.get("quantization_config")
            if isinstance(q, dict) and q.get("bits"):
                facts.setdefault("quantization", f"{q['bits']}-bit")
            dtype = c.get("torch_dtype") or c.get("dtype")
            if dtype:
                facts["precision"] = str(dtype)
    return {k: v for k, v in facts.items() if v not in (None, "")}


def build(
    model_dir: Path,
    files: Sequence[tuple[str, Path, str, int]],
    fmt: Format,
    name: str,
    docker_config: DockerConfig = "auto",
) -> tuple[Blob, list[Blob], dict[str, Any]]:
    """Config blob, layer blobs and the manifest for hashed files ``(rel, path, digest, size)``."""
    facts = _model_facts([(rel, p) for rel, p, _, _ in files])
    layers = [
        Blob(
            modelpack_media_type(rel) if fmt == "modelpack" else docker_media_type(rel),
            digest,
            size,
            path,
            _file_annotations(rel, path, size, title=fmt == "modelpack"),
        )
        for rel, path, digest, size in files
    ]
    diff_ids = [b.digest for b in layers]
    if fmt == "modelpack":
        body: dict[str, Any] = {
            "descriptor": {"createdAt": _now(), "name": name},
            "config": {
                k: facts[k2]
                for k, k2 in (
                    ("architecture", "architecture"),
                    ("format", "format"),
                    ("quantization", "quantization"),
                    ("precision", "precision"),
                )
                if k2 in facts
            },
            "modelfs": {"type": "layers", "diffIds": diff_ids},
        }
        config = Blob.of_bytes(mt.MODELPACK_CONFIG, json.dumps(body, separators=(",", ":")).encode())
    else:
        total = sum(b.size for b in layers)
        cfg: dict[str, Any] = {
            k: facts[k] for k in ("format", "architecture", "quantization", "context_size") if k in facts
        }
        cfg["size"] = f"{total / 1e6:.2f}MB"
        body = {
            "config": cfg,
            "descriptor": {"created": _now()},
            "rootfs": {"type": "rootfs", "diff_ids": diff_ids},
        }
        version = docker_config_version([rel for rel, _, _, _ in files], docker_config)
        config = Blob.of_bytes(version, json.dumps(body, separators=(",", ":")).encode())
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST}
    if fmt == "modelpack":
        manifest["artifactType"] = mt.MODELPACK_MANIFEST
    manifest["config"] = config.descriptor()
    manifest["layers"] = [b.descriptor() for b in layers]
    manifest["annotations"] = {"org.opencontainers.image.created": _now()}
    return config, layers, manifest


async def upload(
    client: RegistryClient,
    ref: Reference,
    config: Blob,
    layers: Sequence[Blob],
    manifest: Mapping[str, Any],
    *,
    tracker: Tracker | None = None,
    parallel: int = 2,
    mount_from: str | None = None,
) -> str:
    """Upload missing blobs (HEAD first), then the manifest under the reference's tag. Returns its digest."""
    repo = ref.repository
    sem = asyncio.Semaphore(parallel)
    skipped = 0

    async def one(b: Blob) -> None:
        nonlocal skipped
        async with sem:
            if await client.blob_exists(repo, b.digest) or (
                mount_from and await client.mount_blob(repo, b.digest, mount_from)
            ):
                skipped += 1
                if tracker:
                    tracker.add(b.size)
                return
            await client.upload_blob(repo, b.digest, b.source, on_bytes=tracker.add if tracker else None)

    unique = list({b.digest: b for b in (config, *layers)}.values())
    await asyncio.gather(*(one(b) for b in unique))
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    digest = await client.put_manifest(repo, ref.tag or sha256_digest(raw), raw, str(manifest["mediaType"]))
    _log.info("pushed", reference=str(ref), digest=digest, blobs=len(unique), skipped=skipped)
    return digest


async def push(
    model_dir: Path | str,
    ref: str | Reference,
    *,
    format: Format = "modelpack",
    docker_config: DockerConfig = "auto",
    auth: Credentials | None = None,
    insecure: Iterable[str] = (),
    progress: ProgressCallback | None = None,
    mount_from: str | None = None,
) -> str:
    """Push a model directory; returns the manifest digest.

    ``mount_from`` names a repository of the same registry that may hold some blobs already: they
    are mounted (no upload) instead of uploaded.
    """
    model_dir = Path(model_dir)
    r = parse(ref) if isinstance(ref, str) else ref
    if r.digest and not r.tag:
        raise OCIError(f"{r}: push needs a tag, not a digest")
    found = await asyncio.to_thread(scan, model_dir)
    hashed = await asyncio.gather(*(asyncio.to_thread(_hash_file, p) for _, p in found))
    files = [(rel, p, d, s) for (rel, p), (d, s) in zip(found, hashed, strict=True)]
    config, layers, manifest = await asyncio.to_thread(
        build, model_dir, files, format, model_dir.resolve().name, docker_config
    )
    tracker = Tracker(progress, str(r))
    tracker.start("", sum(b.size for b in layers) + config.size, len(layers) + 1, phase="uploading")
    async with RegistryClient.for_ref(r, credentials=auth, insecure=insecure) as client:
        digest = await upload(client, r, config, layers, manifest, tracker=tracker, mount_from=mount_from)
    tracker.digest = digest
    tracker.set_phase("done")
    return digest
