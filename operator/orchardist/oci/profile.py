"""A model's profile for the planner from the manifest and small blobs only (never the weights).

Exact weight bytes come from layer sizes; ``config.json`` from its own layer (or a small config
tar); a GGUF header from a Range read of the first megabytes of the first weight shard.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchardist.oci import gguf
from orchardist.oci.auth import Credentials
from orchardist.oci.client import CONFIG_LIMIT, Manifest, RegistryClient
from orchardist.oci.errors import OCIError, TooLargeError
from orchardist.oci.layouts import Entry, Layout, describe_config, read_layout
from orchardist.oci.reference import Reference, parse
from orchardist.planning import profile as planning
from orchardist.planning.profile import ModelProfile

CONFIG_JSON_LIMIT = 16 << 20
CONFIG_TAR_LIMIT = 64 << 20
GGUF_FIRST_READ = 4 << 20
GGUF_MAX_READ = 128 << 20
_WEIGHT_EXT = (".safetensors", ".gguf")


class ProfileUnavailableError(OCIError):
    reason = "ResolveFailed"


@dataclass(frozen=True)
class Inspection:
    """What a registry says about a model, without its weights."""

    reference: Reference
    manifest: Manifest
    layout: Layout
    config: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def described(self) -> dict[str, Any]:
        return describe_config(self.layout, self.config)


def exact_weight_bytes(layout: Layout) -> int:
    """Bytes of the weight files themselves (safetensors/GGUF shards), else all weight layers."""
    exact = sum(
        e.layer.size
        for e in layout.entries
        if e.archive is None
        and e.role == "weight"
        and e.path.lower().endswith(_WEIGHT_EXT)
        and "mmproj" not in e.path.lower()
    )
    return exact or layout.weight_bytes


async def inspect(
    ref: str | Reference, *, auth: Credentials | None = None, insecure: Iterable[str] = ()
) -> Inspection:
    r = parse(ref) if isinstance(ref, str) else ref
    async with RegistryClient.for_ref(r, credentials=auth, insecure=insecure) as client:
        return await _inspect(client, r)


async def _inspect(client: RegistryClient, r: Reference) -> Inspection:
    manifest = await client.resolve(r)
    layout = read_layout(manifest.data)
    config: dict[str, Any] = {}
    if layout.config.size and layout.config.size <= CONFIG_LIMIT:
        raw = await client.get_blob(r.repository, layout.config.digest, limit=CONFIG_LIMIT)
        try:
            parsed = json.loads(raw)
            config = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            config = {}
    return Inspection(r, manifest, layout, config)


async def model_profile(
    ref: str | Reference, auth: Credentials | None = None, *, insecure: Iterable[str] = ()
) -> tuple[str, ModelProfile]:
    """(manifest digest, profile) of a model, reading only the manifest and small blobs."""
    r = parse(ref) if isinstance(ref, str) else ref
    async with RegistryClient.for_ref(r, credentials=auth, insecure=insecure) as client:
        info = await _inspect(client, r)
        return info.digest, await profile_of(client, info)


async def profile_of(client: RegistryClient, info: Inspection) -> ModelProfile:
    layout, repo = info.layout, info.reference.repository
    weight_bytes = exact_weight_bytes(layout)
    cfg_entry = _config_json_entry(layout)
    if cfg_entry is not None:
        raw = await client.get_blob(repo, cfg_entry.layer.digest, limit=CONFIG_JSON_LIMIT)
        return planning.from_config(
            _json(raw, cfg_entry.path), weight_bytes, format=layout.format or "safetensors"
        )
    first_gguf = next(
        (e for e in layout.entries if e.archive is None and e.role == "weight" and _is_gguf(e)), None
    )
    if first_gguf is not None:
        meta = await read_gguf_metadata(client, repo, first_gguf)
        return planning.from_gguf_metadata(meta, weight_bytes)
    for e in layout.entries:
        if e.archive is not None and e.layer.size <= CONFIG_TAR_LIMIT:
            blob = await client.get_blob(repo, e.layer.digest, limit=CONFIG_TAR_LIMIT)
            config = _config_from_tar(blob, e.archive)
            if config is not None:
                return planning.from_config(config, weight_bytes, format=layout.format or "safetensors")
    raise ProfileUnavailableError(
        f"{info.reference}: no config.json layer, GGUF weights or small config archive to profile"
    )


def _is_gguf(e: Entry) -> bool:
    return e.path.lower().endswith(".gguf") and "mmproj" not in e.path.lower()


def _config_json_entry(layout: Layout) -> Entry | None:
    found = [e for e in layout.entries if e.archive is None and e.path.rsplit("/", 1)[-1] == "config.json"]
    return min(found, key=lambda e: e.path.count("/")) if found else None


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProfileUnavailableError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileUnavailableError(f"{what} is not a JSON object")
    return data


async def read_gguf_metadata(client: RegistryClient, repo: str, entry: Entry) -> dict[str, Any]:
    """Parse a GGUF header with Range reads, widening the read until the header fits."""
    want = min(GGUF_FIRST_READ, entry.layer.size)
    while True:
        head = await client.get_blob_range(repo, entry.layer.digest, 0, want)
        try:
            return gguf.parse_header(head)
        except gguf.NeedMoreError as exc:
            if want >= min(GGUF_MAX_READ, entry.layer.size):
                raise TooLargeError(f"{entry.path}: GGUF header larger than {want} bytes") from exc
            want = min(want * 4, GGUF_MAX_READ, entry.layer.size)
        except gguf.GGUFError as exc:
            raise ProfileUnavailableError(f"{entry.path}: {exc}") from exc


def _config_from_tar(blob: bytes, archive: str) -> dict[str, Any] | None:
    stream: Any = io.BytesIO(blob)
    if archive == "tar+zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(stream)
    mode = "r|gz" if archive == "tar+gzip" else "r|"
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tf:  # type: ignore[call-overload]
            for m in tf:
                if m.isreg() and m.name.removeprefix("./").rsplit("/", 1)[-1] == "config.json":
                    f = tf.extractfile(m)
                    if f is not None and m.size <= CONFIG_JSON_LIMIT:
                        return _json(f.read(), m.name)
    except tarfile.TarError:
        return None
    return None
