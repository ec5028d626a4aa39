"""A model's profile for the planner from the manifest and small blobs only (never the weights).

Exact weight bytes come from layer sizes (a tar layer's uncompressed size: annotated, from the gzip
trailer or from the member's header); ``config.json`` from its own layer (or a small config tar); a
GGUF header from a Range read of the first megabytes of the first weight shard, or of the tar layer
holding it, decompressed only as far as the header.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchardist.oci import gguf
from orchardist.oci import mediatypes as mt
from orchardist.oci.auth import Credentials
from orchardist.oci.client import CONFIG_LIMIT, Manifest, RegistryClient
from orchardist.oci.errors import OCIError, RegistryError, TooLargeError
from orchardist.oci.layouts import Entry, Layout, describe_config, read_layout
from orchardist.oci.reference import Reference, parse
from orchardist.planning import profile as planning
from orchardist.planning.profile import ModelProfile

CONFIG_JSON_LIMIT = 16 << 20
CONFIG_TAR_LIMIT = 64 << 20
GGUF_FIRST_READ = 4 << 20
GGUF_MAX_READ = 128 << 20
#: what a tar of one file adds to it (headers, a pax record, padding, the end blocks)
TAR_OVERHEAD = 64 << 10
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

    @property
    def format(self) -> str | None:
        """``gguf`` | ``safetensors`` from the manifest, else from the config (or Kitfile)."""
        return self.layout.format_with(config=self.config)


def exact_weight_bytes(layout: Layout, unpacked: Mapping[str, int] | None = None) -> int:
    """Bytes of the weight files themselves (safetensors/GGUF shards), else all weight layers.

    A tar layer counts its files' uncompressed size: ``unpacked`` (digest -> bytes, read from the
    archive itself) first, then the file metadata its packer annotated, then the layer's size
    (a plain tar is its files plus headers; a compressed one is only a lower bound).
    """
    exact = sum(
        e.layer.size
        for e in layout.entries
        if e.archive is None
        and e.role == "weight"
        and e.path.lower().endswith(_WEIGHT_EXT)
        and "mmproj" not in e.path.lower()
    )
    archived = sum(
        (unpacked or {}).get(e.layer.digest) or _annotated_size(e) or e.layer.size
        for e in _weight_archives(layout)
    )
    return exact + archived or layout.weight_bytes


def _weight_archives(layout: Layout) -> list[Entry]:
    """Archives holding weights: those marked so, else (a whole directory in one tar, as ``oras
    push REF .`` makes) every archive when nothing in the manifest is marked a weight."""
    marked = [e for e in layout.entries if e.archive is not None and e.role == "weight"]
    if marked or any(e.role == "weight" for e in layout.entries):
        return marked
    return [e for e in layout.entries if e.archive is not None and e.role == "other"]


def _annotated_size(e: Entry) -> int | None:
    """The file size a ModelPack packer (modctl) wrote in ``org.cncf.model.file.metadata+json``."""
    raw = e.layer.annotations.get(mt.FILE_METADATA)
    try:
        size = json.loads(raw).get("size") if raw else None
    except (ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size >= 0 else None


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
    fmt = info.format
    unpacked = await _gzip_sizes(client, repo, layout)
    cfg_entry = _config_json_entry(layout)
    if cfg_entry is not None:
        raw = await client.get_blob(repo, cfg_entry.layer.digest, limit=CONFIG_JSON_LIMIT)
        return planning.from_config(
            _json(raw, cfg_entry.path), exact_weight_bytes(layout, unpacked), format=fmt or "safetensors"
        )
    first_gguf = next(
        (e for e in layout.entries if e.archive is None and e.role == "weight" and _is_gguf(e)), None
    )
    if first_gguf is not None:
        meta = await read_gguf_metadata(client, repo, first_gguf)
        return planning.from_gguf_metadata(meta, exact_weight_bytes(layout, unpacked))
    tarred = next(iter(_weight_archives(layout)), None)
    if tarred is not None and fmt in ("gguf", None):
        try:  # an unknown format gets a short look only: a GGUF header starts the file
            meta, member_size = await read_gguf_in_tar(
                client, repo, tarred, max_read=GGUF_MAX_READ if fmt else GGUF_FIRST_READ
            )
        except (ProfileUnavailableError, TooLargeError):
            if fmt:
                raise
        else:
            whole = unpacked.get(tarred.layer.digest) or _annotated_size(tarred) or tarred.layer.size
            if whole - member_size <= TAR_OVERHEAD:  # the layer is that one file: count the file
                unpacked[tarred.layer.digest] = member_size
            return planning.from_gguf_metadata(meta, exact_weight_bytes(layout, unpacked))
    for e in layout.entries:
        if e.archive is not None and e.layer.size <= CONFIG_TAR_LIMIT:
            blob = await client.get_blob(repo, e.layer.digest, limit=CONFIG_TAR_LIMIT)
            config = _config_from_tar(blob, e.archive)
            if config is not None:
                return planning.from_config(
                    config, exact_weight_bytes(layout, unpacked), format=fmt or "safetensors"
                )
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


async def _gzip_sizes(client: RegistryClient, repo: str, layout: Layout) -> dict[str, int]:
    """Uncompressed sizes of gzip weight layers from their trailer (ISIZE, the size mod 2**32).

    One 4-byte Range read per layer; the size is the smallest value with that remainder that is not
    below the compressed size, which is exact for weights (they barely compress) under 4 GiB ratio.
    """
    out: dict[str, int] = {}
    for e in _weight_archives(layout):
        if e.archive != "tar+gzip" or e.layer.size < 18 or _annotated_size(e):
            continue
        try:
            tail = await client.get_blob_range(repo, e.layer.digest, e.layer.size - 4, 4)
        except RegistryError:  # a registry without Range support: the layer size stands in
            continue
        if len(tail) == 4:
            isize = int.from_bytes(tail, "little")
            floor = e.layer.size - e.layer.size // 64  # weights shrink by a few percent at most
            out[e.layer.digest] = isize + max(0, -(-(floor - isize) // (1 << 32))) * (1 << 32)
    return out


class _Prefix:
    """The start of a (compressed) tar layer, decompressed just far enough to read headers."""

    def __init__(self, archive: str) -> None:
        self.archive = archive

    def tar_bytes(self, head: bytes, limit: int) -> bytes:
        if self.archive == "tar":
            return head
        if self.archive == "tar+gzip":
            try:
                return zlib.decompressobj(wbits=31).decompress(head, limit)
            except zlib.error as exc:
                raise ProfileUnavailableError(f"not a gzip stream: {exc}") from exc
        import zstandard

        # read() stops at ``limit`` however far the data would expand (a bomb costs nothing)
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(head), read_across_frames=True)
        out = bytearray()
        try:
            while len(out) < limit and (chunk := reader.read(min(1 << 20, limit - len(out)))):
                out += chunk
        except zstandard.ZstdError as exc:
            if not out:
                raise ProfileUnavailableError(f"not a zstd stream: {exc}") from exc
        return bytes(out)


def gguf_member(tar_head: bytes, complete: bool) -> tuple[dict[str, Any], int] | None:
    """(GGUF metadata, member size) of the first ``.gguf`` member in the start of a tar stream.

    None when the bytes end before the header does (read more); an error when the whole archive
    was given and holds no readable GGUF. Pure, so it is tested with the producers' archives.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_head), mode="r:") as tf:
            for m in iter(tf.next, None):
                name = m.name.lower()
                if not (m.isreg() and name.endswith(".gguf") and "mmproj" not in name):
                    continue
                body = tar_head[m.offset_data : m.offset_data + m.size]
                try:
                    return gguf.parse_header(body), m.size
                except gguf.NeedMoreError:
                    if len(body) == m.size:
                        raise ProfileUnavailableError(f"{m.name}: GGUF header runs past the file") from None
                    return None
                except gguf.GGUFError as exc:
                    raise ProfileUnavailableError(f"{m.name}: {exc}") from exc
    except tarfile.TarError as exc:
        if complete:
            raise ProfileUnavailableError(f"not a readable tar archive: {exc}") from exc
        return None
    if complete:
        raise ProfileUnavailableError("the weight archive holds no .gguf file")
    return None


async def read_gguf_in_tar(
    client: RegistryClient, repo: str, entry: Entry, *, max_read: int = GGUF_MAX_READ
) -> tuple[dict[str, Any], int]:
    """A GGUF header from inside a (tar, tar+gzip, tar+zstd) layer: Range reads of the layer's
    first bytes, decompressed just far enough, widened until the member's header fits."""
    assert entry.archive is not None
    prefix = _Prefix(entry.archive)
    want = min(GGUF_FIRST_READ, max_read, entry.layer.size)
    what = f"layer {entry.layer.digest[:19]}"
    while True:
        head = await client.get_blob_range(repo, entry.layer.digest, 0, want)
        complete = want >= entry.layer.size
        try:
            found = gguf_member(prefix.tar_bytes(head, GGUF_MAX_READ + (1 << 20)), complete)
        except ProfileUnavailableError as exc:
            raise ProfileUnavailableError(f"{what}: {exc}") from exc
        if found is not None:
            return found
        if want >= min(max_read, entry.layer.size):
            raise TooLargeError(f"{what}: GGUF header not within its first {want} bytes")
        want = min(want * 4, max_read, entry.layer.size)


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
