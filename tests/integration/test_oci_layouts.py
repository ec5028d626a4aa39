"""Every layout round-trips through a real registry on loopback: push (ours or hand-built), pull, compare."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from orchardist.oci import mediatypes as mt
from orchardist.oci.client import RegistryClient
from orchardist.oci.errors import NotFoundError, UnknownLayoutError
from orchardist.oci.profile import inspect, model_profile
from orchardist.oci.push import push
from orchardist.oci.reference import parse
from orchardist.oci.store import ContentStore
from tests.fixtures.registry import (
    TINY_CONFIG,
    make_gguf,
    make_safetensors_model,
    push_artifact,
    tar_bytes,
)

pytestmark = pytest.mark.registry
GiB = 1 << 30


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _repo(name: str) -> str:
    return f"test/{name}-{secrets.token_hex(3)}"


@pytest.mark.parametrize("fmt", ["modelpack", "docker"])
async def test_push_pull_directory_round_trips(registry: str, tmp_path: Path, fmt: str) -> None:
    model = make_safetensors_model(tmp_path / "model")
    ref = f"oci://{registry}/{_repo('tiny')}:v1"
    digest = await push(model, ref, format=fmt)  # type: ignore[arg-type]

    store = ContentStore(tmp_path / "store", 1 * GiB)
    got = await store.pull(ref)

    assert got.digest == digest
    assert got.layout == ("modelpack" if fmt == "modelpack" else "docker-model-runner")
    assert got.format == "safetensors"
    assert _files(got.path) == _files(model)
    assert sorted(p for p, _ in got.files) == sorted(_files(model))

    info = await inspect(ref)
    manifest = info.manifest.data
    if fmt == "modelpack":
        assert manifest["artifactType"] == mt.MODELPACK_MANIFEST
        assert manifest["config"]["mediaType"] == mt.MODELPACK_CONFIG
        weights = [layer for layer in manifest["layers"] if layer["mediaType"] == mt.MODELPACK_WEIGHT_RAW]
        assert weights[0]["annotations"][mt.TITLE] == "model.safetensors"
    else:
        assert "artifactType" not in manifest
        assert manifest["config"]["mediaType"] == mt.DMR_CONFIG_V02
        by_path = {layer["annotations"][mt.FILEPATH]: layer["mediaType"] for layer in manifest["layers"]}
        assert by_path["model.safetensors"] == mt.DMR_SAFETENSORS
        assert by_path["config.json"] == mt.DMR_FILE
        assert by_path["LICENSE"] == mt.DMR_LICENSE
        assert by_path["extra/notes.txt"] == mt.DMR_FILE

    pinned_digest, profile = await model_profile(ref)
    assert pinned_digest == digest
    assert profile.architecture == "LlamaForCausalLM"
    assert profile.max_position_embeddings == TINY_CONFIG["max_position_embeddings"]
    assert profile.weight_bytes == (model / "model.safetensors").stat().st_size


async def test_gguf_docker_format_and_header_profile(registry: str, tmp_path: Path) -> None:
    model = tmp_path / "gguf"
    make_gguf(model / "tiny-q8_0.gguf", context=777)
    ref = f"oci://{registry}/{_repo('gguf')}:q8"
    await push(model, ref, format="docker")

    info = await inspect(ref)
    assert info.layout.entries[0].layer.media_type == mt.DMR_GGUF
    assert info.described["architecture"] == "llama"
    assert info.described["context_size"] == 777

    _, profile = await model_profile(ref)  # a Range read of the header, not the weights
    assert profile.format == "gguf"
    assert profile.max_position_embeddings == 777
    assert profile.num_layers == 2
    assert profile.quantization == "Q8_0"

    got = await ContentStore(tmp_path / "store", GiB).pull(ref)
    assert (got.path / "tiny-q8_0.gguf").read_bytes() == (model / "tiny-q8_0.gguf").read_bytes()


async def test_docker_v01_without_annotations_names_files_by_media_type(
    registry: str, tmp_path: Path
) -> None:
    gguf_file = make_gguf(tmp_path / "w.gguf")
    repo = _repo("dmr-v01")
    config = json.dumps({"config": {"format": "gguf"}, "descriptor": {"created": "2025-01-01T00:00:00Z"}})
    await push_artifact(
        registry,
        f"{repo}:latest",
        (mt.DMR_CONFIG_V01, config.encode()),
        [(mt.DMR_GGUF, gguf_file.read_bytes(), {}), (mt.DMR_LICENSE, b"Apache-2.0\n", {})],
    )
    got = await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}")
    assert got.layout == "docker-model-runner"
    assert _files(got.path) == {"LICENSE": b"Apache-2.0\n", "model.gguf": gguf_file.read_bytes()}


@pytest.mark.parametrize("kind", ["tar", "tar+gzip", "tar+zstd"])
async def test_modelpack_archive_layers(registry: str, tmp_path: Path, kind: str) -> None:
    compression = {"tar": None, "tar+gzip": "gzip", "tar+zstd": "zstd"}[kind]
    weights = {"model.safetensors": b"\x00" * 4096, "sub/model-2.safetensors": b"\x01" * 1000}
    configs = {"config.json": json.dumps(TINY_CONFIG).encode(), "tokenizer.json": b"{}"}
    repo = _repo("mp-" + kind.replace("+", "-"))
    await push_artifact(
        registry,
        f"{repo}:v1",
        (
            mt.MODELPACK_CONFIG,
            b'{"config":{"format":"safetensors"},"modelfs":{"type":"layers","diffIds":[]}}',
        ),
        [
            (f"application/vnd.cncf.model.weight.v1.{kind}", tar_bytes(weights, compression), {}),
            (f"application/vnd.cncf.model.weight.config.v1.{kind}", tar_bytes(configs, compression), {}),
            (mt.MODELPACK_DOC_RAW, b"# readme\n", {mt.FILEPATH: "README.md"}),
        ],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    got = await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")
    assert got.layout == "modelpack"
    assert _files(got.path) == {**weights, **configs, "README.md": b"# readme\n"}

    _, profile = await model_profile(f"oci://{registry}/{repo}:v1")  # config.json from the small config tar
    assert profile.architecture == "LlamaForCausalLM"


async def test_kitops_modelkit(registry: str, tmp_path: Path) -> None:
    repo = _repo("kit")
    kitfile = {
        "manifestVersion": "1.0",
        "package": {"name": "tiny"},
        "model": {"path": "model", "name": "tiny"},
    }
    model_tar = tar_bytes(
        {"model/model.safetensors": b"\x02" * 2048, "model/config.json": json.dumps(TINY_CONFIG).encode()}
    )
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.KIT_CONFIG, json.dumps(kitfile).encode()),
        [
            ("application/vnd.kitops.modelkit.model.v1.tar", model_tar, {}),
            ("application/vnd.kitops.modelkit.docs.v1.tar+gzip", tar_bytes({"README.md": b"hi"}, "gzip"), {}),
        ],
        artifact_type=mt.KIT_MANIFEST,
    )
    got = await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")
    assert got.layout == "kitops"
    assert set(_files(got.path)) == {"model/model.safetensors", "model/config.json", "README.md"}
    info = await inspect(f"oci://{registry}/{repo}:v1")
    assert info.described["name"] == "tiny"


async def test_plain_oras_artifact(registry: str, tmp_path: Path) -> None:
    repo = _repo("oras")
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.OCI_EMPTY, b"{}"),
        [
            ("application/octet-stream", b"weights" * 100, {mt.TITLE: "model.safetensors"}),
            ("application/json", json.dumps(TINY_CONFIG).encode(), {mt.TITLE: "config.json"}),
            (
                mt.OCI_LAYER_TAR_GZIP,
                tar_bytes({"tokenizer/vocab.json": b"{}", "tokenizer/merges.txt": b""}, "gzip"),
                {mt.TITLE: "tokenizer", mt.ORAS_UNPACK: "true"},
            ),
        ],
    )
    got = await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")
    assert got.layout == "oras"
    assert set(_files(got.path)) == {
        "model.safetensors",
        "config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    }


async def test_unknown_layout_lists_media_types(registry: str, tmp_path: Path) -> None:
    repo = _repo("unknown")
    await push_artifact(
        registry,
        f"{repo}:v1",
        ("application/vnd.example.config+json", b"{}"),
        [("application/vnd.example.weights", b"w", {})],
    )
    with pytest.raises(UnknownLayoutError) as err:
        await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")
    assert "application/vnd.example.weights" in str(err.value)
    assert "application/vnd.example.config+json" in str(err.value)
    assert not any((tmp_path / "store" / "models").iterdir())


async def test_index_resolves_to_darwin_arm64(registry: str, tmp_path: Path) -> None:
    repo = _repo("index")
    model = make_safetensors_model(tmp_path / "m")
    mac = await push(model, f"oci://{registry}/{repo}:mac")
    other = await push_artifact(
        registry,
        f"{repo}:linux",
        (mt.OCI_EMPTY, b"{}"),
        [("application/octet-stream", b"x", {mt.TITLE: "x"})],
    )
    ref = parse(f"oci://{registry}/{repo}:multi")
    async with RegistryClient.for_ref(ref) as client:
        mac_m = await client.get_manifest(repo, mac)
        other_m = await client.get_manifest(repo, other)
        index = {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {
                    "mediaType": mt.OCI_MANIFEST,
                    "digest": other,
                    "size": len(other_m.raw),
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
                {
                    "mediaType": mt.OCI_MANIFEST,
                    "digest": mac,
                    "size": len(mac_m.raw),
                    "platform": {"os": "darwin", "architecture": "arm64"},
                },
            ],
        }
        await client.put_manifest(repo, "multi", json.dumps(index).encode(), mt.OCI_INDEX)
    got = await ContentStore(tmp_path / "store", GiB).pull(ref)
    assert got.digest == mac
    assert _files(got.path) == _files(model)


async def test_missing_tag_is_a_clear_not_found(registry: str, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/test/nothing-here:v9")


async def test_manifest_size_limit(registry: str, tmp_path: Path) -> None:
    from orchardist.oci.errors import TooLargeError

    model = make_safetensors_model(tmp_path / "m")
    repo = _repo("limit")
    await push(model, f"oci://{registry}/{repo}:v1")
    ref = parse(f"oci://{registry}/{repo}:v1")
    async with RegistryClient.for_ref(ref) as client:
        with pytest.raises(TooLargeError, match="limit"):
            await client.get_manifest(repo, "v1", limit=512)
        assert (await client.get_manifest(repo, "v1")).data["layers"]


async def test_docker_tar_layers(registry: str, tmp_path: Path) -> None:
    repo = _repo("dmr-tars")
    config = json.dumps(
        {"config": {"format": "safetensors"}, "descriptor": {"created": "2025-01-01T00:00:00Z"}}
    )
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.DMR_CONFIG_V02, config.encode()),
        [
            (mt.DMR_SAFETENSORS, b"\x03" * 512, {mt.FILEPATH: "model.safetensors"}),
            (mt.DMR_VLLM_CONFIG_TAR, tar_bytes({"config.json": json.dumps(TINY_CONFIG).encode()}), {}),
            (
                mt.DMR_DIR_TAR,
                tar_bytes({"tok/vocab.json": b"{}", "tok/sub/merges.txt": b"a b"}),
                {mt.FILEPATH: "dir-tar-1.tar"},
            ),
        ],
    )
    got = await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")
    assert got.layout == "docker-model-runner"
    assert set(_files(got.path)) == {
        "model.safetensors",
        "config.json",
        "tok/vocab.json",
        "tok/sub/merges.txt",
    }
    _, profile = await model_profile(f"oci://{registry}/{repo}:v1")
    assert profile.weight_bytes == 512
