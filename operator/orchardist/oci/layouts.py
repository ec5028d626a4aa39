"""Layout readers: which file each layer of a model manifest becomes. Pure (manifest in, plan out).

Four layouts: Docker Model Runner (config v0.1/v0.2, paths in ``org.cncf.model.filepath``), CNCF
ModelPack (raw or tar/tar+gzip/tar+zstd layers), KitOps ModelKit (tar or raw layers), and plain
ORAS (``org.opencontainers.image.title``). Every path is checked before anything is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchardist.oci import mediatypes as mt
from orchardist.oci.errors import UnknownLayoutError
from orchardist.oci.safepath import safe_relpath

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".onnx", ".dduf", ".npz")


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_descriptor(cls, d: Mapping[str, Any]) -> Layer:
        try:
            digest, size, media_type = str(d["digest"]), int(d["size"]), str(d.get("mediaType", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise UnknownLayoutError(f"malformed layer descriptor: {exc}") from exc
        if not re.fullmatch(r"sha256:[a-f0-9]{64}", digest) or size < 0:
            raise UnknownLayoutError(f"unsupported layer digest or size: {digest} {size}")
        return cls(digest, size, media_type, dict(d.get("annotations") or {}))

    @property
    def annotated_path(self) -> str | None:
        return self.annotations.get(mt.FILEPATH) or self.annotations.get(mt.TITLE)


@dataclass(frozen=True)
class Entry:
    """One layer's place in the model directory.

    ``archive`` is None for a raw file at ``path``; otherwise the layer is a tar (``tar``,
    ``tar+gzip``, ``tar+zstd``) unpacked into directory ``path`` ("" = the model root).
    """

    layer: Layer
    path: str
    archive: str | None
    role: str  # weight | config | doc | code | dataset | other


@dataclass(frozen=True)
class Layout:
    name: str  # docker-model-runner | modelpack | kitops | oras
    version: str
    config: Layer
    entries: tuple[Entry, ...]

    @property
    def weight_bytes(self) -> int:
        return sum(e.layer.size for e in self.entries if e.role == "weight")

    @property
    def total_bytes(self) -> int:
        return sum(e.layer.size for e in self.entries)

    @property
    def format(self) -> str | None:
        """``gguf`` or ``safetensors`` (what the weights are), from paths or media types."""
        for e in self.entries:
            if e.role != "weight":
                continue
            p = e.path.lower()
            if p.endswith(".gguf") or e.layer.media_type == mt.DMR_GGUF:
                return "gguf"
            if p.endswith(".safetensors") or e.layer.media_type == mt.DMR_SAFETENSORS:
                return "safetensors"
        return None

    def format_with(self, files: Iterable[str] = (), config: Mapping[str, Any] | None = None) -> str | None:
        """The weights' format when layers are archives: :attr:`format`, else the paths the tar
        layers are annotated with (modctl names the packed file), else the files they held, else
        what the config says (Docker and ModelPack ``config.format``, the Kitfile's model path)."""
        found = self.format or _format_of_names(
            [e.layer.annotated_path or "" for e in self.entries if e.archive and e.role == "weight"]
        )
        found = found or _format_of_names(list(files))
        if found or not config:
            return found
        c = config.get("config")
        declared = c.get("format") if isinstance(c, Mapping) else None
        if isinstance(declared, str) and declared.lower() in ("gguf", "safetensors"):
            return declared.lower()
        model = config.get("model")
        if isinstance(model, Mapping):
            return _format_of_names([str(model.get("path") or ""), str(model.get("format") or "")])
        return None

    def find(self, path: str) -> Entry | None:
        return next((e for e in self.entries if e.archive is None and e.path == path), None)


def _format_of_names(names: list[str]) -> str | None:
    low = [n.lower() for n in names]
    if any((n.endswith(".gguf") and "mmproj" not in n) or n == "gguf" for n in low):
        return "gguf"
    if any(n.endswith(".safetensors") or n == "safetensors" for n in low):
        return "safetensors"
    return None


def _archive_of(suffix: str) -> str | None:
    """``raw`` -> None, ``tar`` / ``tar+gzip`` / ``tar+zstd`` as is; anything else is unknown."""
    if suffix == "raw":
        return None
    if suffix in ("tar", "tar+gzip", "tar+zstd"):
        return suffix
    raise ValueError(suffix)


def _checked(path: str, what: str) -> str:
    return str(safe_relpath(path, what))


def _role_from_name(path: str) -> str:
    low = path.lower()
    name = low.rsplit("/", 1)[-1]
    if low.endswith(WEIGHT_SUFFIXES):
        return "weight"
    if re.search(r"licen[cs]e|copying|notice|readme", name) or name.endswith(".md"):
        return "doc"
    return "config"


def _media_types(manifest: Mapping[str, Any]) -> str:
    seen = [f"artifactType={manifest.get('artifactType') or '-'}"]
    seen.append(f"config={(manifest.get('config') or {}).get('mediaType') or '-'}")
    layers = sorted({str(d.get("mediaType")) for d in manifest.get("layers") or []})
    seen.append(f"layers={', '.join(layers) or '-'}")
    return "; ".join(seen)


def _dmr(config: Layer, layers: list[Layer]) -> Layout:
    version = "v0.2" if config.media_type == mt.DMR_CONFIG_V02 else "v0.1"
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.media_type] = counts.get(layer.media_type, 0) + 1
    seen: dict[str, int] = {}
    entries = []
    for layer in layers:
        t = layer.media_type
        seen[t] = seen.get(t, 0) + 1
        path = layer.annotated_path
        role = {
            mt.DMR_GGUF: "weight",
            mt.DMR_SAFETENSORS: "weight",
            mt.DMR_DDUF: "weight",
            mt.DMR_MMPROJ: "weight",
            mt.DMR_MMPROJ_SPEC: "weight",
            mt.DMR_GGUF_LORA: "weight",
            mt.DMR_LICENSE: "doc",
        }.get(t, "config")
        if t in (mt.DMR_VLLM_CONFIG_TAR, mt.DMR_DIR_TAR):
            # Docker's reader extracts both at the model root; a dir.tar's members already carry the
            # directory's name and its filepath annotation is only the tar file's own name
            entries.append(Entry(layer, "", "tar", "config" if t == mt.DMR_VLLM_CONFIG_TAR else "other"))
            continue
        if not path:
            if version == "v0.2":
                raise UnknownLayoutError(f"Docker model v0.2 layer {layer.digest} ({t}) has no {mt.FILEPATH}")
            path = _v01_name(t, seen[t], counts[t], layer)
        entries.append(Entry(layer, _checked(path, f"layer {layer.digest[:19]} path"), None, role))
    return Layout("docker-model-runner", version, config, tuple(entries))


def _v01_name(media_type: str, n: int, total: int, layer: Layer) -> str:
    """Legacy v0.1 layers without annotations: name by media type and shard order."""
    ext = {mt.DMR_GGUF: "gguf", mt.DMR_SAFETENSORS: "safetensors", mt.DMR_DDUF: "dduf"}.get(media_type)
    if ext:
        return f"model.{ext}" if total == 1 else f"model-{n:05d}-of-{total:05d}.{ext}"
    fixed = {
        mt.DMR_LICENSE: "LICENSE",
        mt.DMR_CHAT_TEMPLATE: "template.jinja",
        mt.DMR_MMPROJ: "model.mmproj",
        mt.DMR_MMPROJ_SPEC: "model.mmproj",
        mt.DMR_GGUF_LORA: "adapter.gguf",
    }.get(media_type)
    if fixed:
        return fixed if total == 1 else f"{fixed}.{n}"
    return layer.digest.replace(":", "-")


_MODELPACK_LAYER = re.compile(
    r"application/vnd\.cncf\.model\.(weight\.config|weight|doc|code|dataset)\.v1\.(raw|tar|tar\+gzip|tar\+zstd|gguf|safetensors)"
)


def _modelpack(config: Layer, layers: list[Layer], manifest: Mapping[str, Any]) -> Layout:
    entries = []
    for layer in layers:
        m = _MODELPACK_LAYER.fullmatch(layer.media_type)
        if not m:
            raise UnknownLayoutError(
                f"ModelPack layer with unknown media type {layer.media_type}; {_media_types(manifest)}"
            )
        base, kind = m.group(1), m.group(2)
        role = {"weight.config": "config"}.get(base, base)
        archive = None if kind in ("gguf", "safetensors") else _archive_of(kind)
        path = layer.annotated_path
        if archive is None:
            if not path:
                raise UnknownLayoutError(
                    f"ModelPack raw layer {layer.digest} has no {mt.FILEPATH} or {mt.TITLE}"
                )
            entries.append(Entry(layer, _checked(path, f"layer {layer.digest[:19]} path"), None, role))
        else:
            entries.append(Entry(layer, "", archive, role))
    return Layout("modelpack", "v1", config, tuple(entries))


_KIT_LAYER = re.compile(r"application/vnd\.kitops\.modelkit\.([a-z-]+)\.v1\.(raw|tar)(?:\+(gzip|zstd))?")


def _kitops(config: Layer, layers: list[Layer], manifest: Mapping[str, Any]) -> Layout:
    entries = []
    for layer in layers:
        m = _KIT_LAYER.fullmatch(layer.media_type)
        if not m:
            raise UnknownLayoutError(
                f"ModelKit layer with unknown media type {layer.media_type}; {_media_types(manifest)}"
            )
        base, kind, comp = m.groups()
        role = {"model": "weight", "modelpart": "weight", "docs": "doc"}.get(base, base)
        if kind == "raw":
            path = layer.annotated_path
            if not path:
                raise UnknownLayoutError(
                    f"ModelKit raw layer {layer.digest} has no {mt.FILEPATH} or {mt.TITLE}"
                )
            entries.append(Entry(layer, _checked(path, f"layer {layer.digest[:19]} path"), None, role))
        else:
            entries.append(Entry(layer, "", f"tar+{comp}" if comp else "tar", role))
    return Layout("kitops", "v1", config, tuple(entries))


def _oras(config: Layer, layers: list[Layer], manifest: Mapping[str, Any]) -> Layout:
    entries = []
    for layer in layers:
        title = layer.annotations.get(mt.TITLE)
        if not title:
            raise UnknownLayoutError(
                f"unknown model layout (layers without file names): {_media_types(manifest)}"
            )
        if layer.annotations.get(mt.ORAS_UNPACK) == "true" or layer.media_type == mt.OCI_LAYER_TAR_GZIP:
            # oras tars a directory with its own name as the top entry (``.`` for ``oras push REF .``):
            # the members carry their paths, so the title names no file and is checked only if it
            # is not the root
            if title.strip("/") not in (".", ""):
                _checked(title, f"layer {layer.digest[:19]} title")
            comp = "tar+zstd" if layer.media_type.endswith("zstd") else "tar+gzip"
            entries.append(Entry(layer, "", "tar" if layer.media_type.endswith(".tar") else comp, "other"))
        else:
            path = _checked(title, f"layer {layer.digest[:19]} title")
            entries.append(Entry(layer, path, None, _role_from_name(path)))
    return Layout("oras", "v1", config, tuple(entries))


def read_layout(manifest: Mapping[str, Any]) -> Layout:
    """Decide the layout from the manifest alone; raise :class:`UnknownLayoutError` listing what was seen."""
    cfg = manifest.get("config")
    if not isinstance(cfg, Mapping):
        raise UnknownLayoutError(f"manifest has no config descriptor; {_media_types(manifest)}")
    config = Layer.from_descriptor(cfg)
    layers = [Layer.from_descriptor(d) for d in manifest.get("layers") or []]
    if not layers:
        raise UnknownLayoutError(f"manifest has no layers; {_media_types(manifest)}")
    artifact = manifest.get("artifactType")
    if config.media_type in (mt.DMR_CONFIG_V01, mt.DMR_CONFIG_V02):
        layout = _dmr(config, layers)
    elif artifact == mt.MODELPACK_MANIFEST or config.media_type == mt.MODELPACK_CONFIG:
        layout = _modelpack(config, layers, manifest)
    elif artifact == mt.KIT_MANIFEST or config.media_type == mt.KIT_CONFIG:
        layout = _kitops(config, layers, manifest)
    elif all(layer.annotations.get(mt.TITLE) for layer in layers):
        layout = _oras(config, layers, manifest)
    else:
        raise UnknownLayoutError(f"unknown model layout: {_media_types(manifest)}")
    raw_paths = [e.path for e in layout.entries if e.archive is None]
    dupes = sorted({p for p in raw_paths if raw_paths.count(p) > 1})
    if dupes:
        raise UnknownLayoutError(f"{layout.name} manifest names the same file twice: {', '.join(dupes)}")
    return layout


def describe_config(layout: Layout, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the config blob says about the model (display only: the planner reads config.json)."""
    out: dict[str, Any] = {}
    if layout.name == "docker-model-runner":
        c = config.get("config") or {}
        for key in ("format", "architecture", "parameters", "quantization", "size", "context_size"):
            if c.get(key) not in (None, ""):
                out[key] = c[key]
    elif layout.name == "modelpack":
        c = config.get("config") or {}
        for src, dst in (
            ("format", "format"),
            ("architecture", "architecture"),
            ("paramSize", "parameters"),
            ("quantization", "quantization"),
            ("precision", "precision"),
        ):
            if c.get(src) not in (None, ""):
                out[dst] = c[src]
        name = (config.get("descriptor") or {}).get("name")
        if name:
            out["name"] = name
    elif layout.name == "kitops":
        pkg = config.get("package") or {}
        if pkg.get("name"):
            out["name"] = pkg["name"]
        model = config.get("model") or {}
        for key in ("name", "path", "framework", "format"):
            if model.get(key):
                out[f"model_{key}"] = model[key]
    return out
