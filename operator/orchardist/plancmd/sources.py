"""Where ``orchardist plan`` gets a model's profile: a config.json, a model directory, a GGUF header
or an OCI registry (manifest and small blobs only).

Every failure becomes an ``InputError`` naming the file or reference and the reason.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchardist.plancmd import InputError
from orchardist.planning.profile import ModelProfile, ProfileError, from_config, from_gguf_metadata

#: A GGUF header is read in growing prefixes up to this size (the metadata, not the tensors).
GGUF_HEADER_LIMIT = 128 << 20


def load_profile(
    *,
    model: str | None,
    model_config: Path | None,
    model_dir: Path | None,
    weights_bytes: int | None,
    insecure: Sequence[str] = (),
) -> ModelProfile:
    """The model profile from ``model`` (oci://), else ``model_config``/``model_dir`` and the weight bytes."""
    if model:
        return oci_profile(model, insecure)
    config_path = model_config or model_dir
    if config_path is None:
        raise InputError(
            "give --model-config PATH (and --weights-bytes N), --model-dir DIR, or --model oci://..."
        )
    weights = weights_bytes
    if weights is None:
        if model_dir is None:
            raise InputError("--weights-bytes N is required unless --model-dir DIR is given")
        weights = weights_in(model_dir)
    if model_config is None and model_dir is not None and not (model_dir / "config.json").exists():
        ggufs = [p for p in weight_files(model_dir) if p.suffix == ".gguf"]
        if ggufs:
            return gguf_profile(ggufs[0], weights)
    try:
        return from_config(read_config(config_path), weights)
    except ProfileError as exc:
        raise InputError(str(exc)) from None


def weight_files(directory: Path) -> list[Path]:
    """The weight shards of a model directory (a vision projector ``mmproj`` is not the model)."""
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise InputError(f"cannot read {directory}: {exc.strerror or exc}") from None
    return sorted(
        p
        for p in entries
        if p.is_file() and p.suffix in (".safetensors", ".gguf") and "mmproj" not in p.name.lower()
    )


def weights_in(directory: Path) -> int:
    """Bytes of the weight shards in ``directory``."""
    files = weight_files(directory)
    if not files:
        raise InputError(f"{directory} holds no *.safetensors or *.gguf files; give --weights-bytes")
    return sum(p.stat().st_size for p in files)


def read_config(path: Path) -> dict[str, Any]:
    """A config.json (or the one in a directory) as a JSON object."""
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object")
    return data


def gguf_profile(path: Path, weights: int) -> ModelProfile:
    """A GGUF file's profile from its header, reading a larger prefix until the header fits."""
    from orchardist.oci import gguf

    size = 4 << 20
    with path.open("rb") as f:
        while True:
            f.seek(0)
            data = f.read(size)
            try:
                meta = gguf.parse_header(data)
                break
            except gguf.NeedMoreError:
                if len(data) < size or size >= GGUF_HEADER_LIMIT:
                    raise InputError(f"{path}: GGUF header is cut short or larger than 128 MiB") from None
                size *= 4
            except gguf.GGUFError as exc:
                raise InputError(f"{path}: {exc}") from None
    try:
        return from_gguf_metadata(meta, weights)
    except ProfileError as exc:
        raise InputError(f"{path}: {exc}") from None


def oci_profile(reference: str, insecure: Sequence[str]) -> ModelProfile:
    """An OCI model's profile from its manifest and small blobs (the weights are not downloaded).

    Credentials come from the user's docker config, as for ``orchardist pull``. The registry client
    is imported here, not at the top: only this option talks to a registry.
    """
    from orchardist.oci.auth import from_user_config
    from orchardist.oci.errors import OCIError
    from orchardist.oci.profile import model_profile
    from orchardist.oci.reference import parse

    try:
        ref = parse(reference)
        _, profile = asyncio.run(model_profile(ref, from_user_config(ref), insecure=tuple(insecure)))
    except (OCIError, ProfileError) as exc:
        raise InputError(f"{reference}: {exc}") from None
    return profile
