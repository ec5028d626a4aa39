"""Artifacts shaped exactly as real producers write them, pulled and profiled through a real registry.

Each fixture names the producer's source (repository, file, commit) it copies the structure from:
media types, annotations, config JSON and tar member names. Nothing of the producers' code is used.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import secrets
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchardist.oci import mediatypes as mt
from orchardist.oci import profile as profile_mod
from orchardist.oci.client import RegistryClient
from orchardist.oci.profile import inspect, model_profile
from orchardist.oci.push import push
from orchardist.oci.store import ContentStore
from tests.fixtures.registry import TINY_CONFIG, make_gguf, push_artifact

pytestmark = pytest.mark.registry
GiB = 1 << 30


def _repo(name: str) -> str:
    return f"test/{name}-{secrets.token_hex(3)}"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    """A tar in the given order; ``None`` content is a directory entry (name ends with ``/``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _compress(raw: bytes, kind: str) -> bytes:
    if kind == "tar+gzip":
        return gzip.compress(raw)
    if kind == "tar+zstd":
        import zstandard

        # a streaming encoder (as Go's zstd writer) leaves the frame's content size out
        out = io.BytesIO()
        with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as w:
            w.write(raw)
        return out.getvalue()
    return raw


def _big_gguf(path: Path, *, tokens: int, tensor_floats: int, context: int = 4096) -> Path:
    """A real GGUF (the ``gguf`` package) with a long vocabulary and random weights after it."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(context)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_file_type(7)
    w.add_token_list([f"token-{i}" for i in range(tokens)])
    rng = np.random.default_rng(7)
    w.add_tensor("token_embd.weight", rng.standard_normal(tensor_floats, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- oras CLI: `oras push REF .` ----------------------------------------------------------------
# oras-project/oras-go content/file/file.go@900ddd2da94a781b3d2f5448ac9d107ef9f3c88a (a directory
# is one tar+gzip layer titled with the name given, here ".", with io.deis.oras.content.unpack=true
# and io.deis.oras.content.digest = the uncompressed tar's digest) and
# content/file/utils.go@8db78e574e278299c2f89656352859f055a879a3 (tarDirectory: member names
# path.Join(name, rel), directories with a trailing "/", so the root is "./" and files are
# "config.json", "tokenizer/vocab.json"); the CLI's default artifactType
# application/vnd.unknown.artifact.v1 and the empty config.


async def test_oras_push_dot_is_the_model_root(registry: str, tmp_path: Path) -> None:
    """A directory pushed whole with ``oras push REF .`` materializes at the model root and profiles."""
    config = json.dumps(TINY_CONFIG).encode()
    raw = _tar(
        [
            ("./", None),
            ("config.json", config),
            ("model.safetensors", b"\x05" * 4096),
            ("tokenizer/", None),
            ("tokenizer/vocab.json", b"{}"),
        ]
    )
    layer = gzip.compress(raw)
    repo = _repo("oras-dot")
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.OCI_EMPTY, b"{}"),
        [
            (
                mt.OCI_LAYER_TAR_GZIP,
                layer,
                {
                    mt.TITLE: ".",
                    mt.ORAS_UNPACK: "true",
                    "io.deis.oras.content.digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
                },
            )
        ],
        artifact_type="application/vnd.unknown.artifact.v1",
    )
    ref = f"oci://{registry}/{repo}:v1"
    got = await ContentStore(tmp_path / "store", GiB).pull(ref)
    assert got.layout == "oras"
    assert got.format == "safetensors"
    assert _files(got.path) == {
        "config.json": config,
        "model.safetensors": b"\x05" * 4096,
        "tokenizer/vocab.json": b"{}",
    }
    _, prof = await model_profile(ref)
    assert prof.num_layers == TINY_CONFIG["num_hidden_layers"]
    assert prof.weight_bytes == len(raw)  # the whole directory's tar, uncompressed (gzip trailer)


async def test_oras_push_dot_of_a_gguf_directory(registry: str, tmp_path: Path) -> None:
    """Nothing in the manifest says GGUF: a short look at the archive's first member finds it."""
    member = make_gguf(tmp_path / "g" / "tiny.gguf", context=1234).read_bytes()
    raw = _tar([("./", None), ("README.md", b"# tiny\n"), ("tiny.gguf", member)])
    repo = _repo("oras-gguf")
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.OCI_EMPTY, b"{}"),
        [(mt.OCI_LAYER_TAR_GZIP, gzip.compress(raw), {mt.TITLE: ".", mt.ORAS_UNPACK: "true"})],
        artifact_type="application/vnd.unknown.artifact.v1",
    )
    ref = f"oci://{registry}/{repo}:v1"
    _, prof = await model_profile(ref)
    assert (prof.format, prof.max_position_embeddings) == ("gguf", 1234)
    got = await ContentStore(tmp_path / "store", GiB).pull(ref)
    assert got.format == "gguf"
    assert (got.path / "tiny.gguf").read_bytes() == member


async def test_oras_title_still_refuses_an_escaping_directory_name(registry: str, tmp_path: Path) -> None:
    """Only ``.`` names the root: a title that climbs out of the model directory is refused."""
    from orchardist.oci.errors import UnsafePathError

    repo = _repo("oras-up")
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.OCI_EMPTY, b"{}"),
        [
            (
                mt.OCI_LAYER_TAR_GZIP,
                gzip.compress(_tar([("a", b"x")])),
                {mt.TITLE: "../up", mt.ORAS_UNPACK: "true"},
            )
        ],
    )
    with pytest.raises(UnsafePathError, match=r"'\.\.'"):
        await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")


# ---- Docker Model Runner: a dir.tar layer ---------------------------------------------------------
# docker/model-runner pkg/distribution/packaging (CreateDirectoryTarArchive: members carry the
# directory's own name, "tok/vocab.json"; written to a temp file "dir-tar-*.tar", whose base name
# becomes the layer's org.cncf.model.filepath through partial.NewLayer) and
# pkg/distribution/internal/bundle/unpack.go@1d14f67b92995de476b4b6fd6b68f86458b68298
# (unpackDirTarArchives: every dir.tar is extracted into the model directory itself).


async def test_docker_dir_tar_unpacks_at_the_model_root(registry: str, tmp_path: Path) -> None:
    repo = _repo("dmr-dirtar")
    cfg = {"config": {"format": "safetensors"}, "descriptor": {"created": "2025-01-01T00:00:00Z"}}
    weights = b"\x03" * 512
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.DMR_CONFIG_V02, json.dumps(cfg).encode()),
        [
            (mt.DMR_SAFETENSORS, weights, {mt.FILEPATH: "model.safetensors"}),
            (mt.DMR_FILE, json.dumps(TINY_CONFIG).encode(), {mt.FILEPATH: "config.json"}),
            (
                mt.DMR_DIR_TAR,
                _tar([("tok/", None), ("tok/vocab.json", b"{}"), ("tok/sub/merges.txt", b"a b")]),
                {mt.FILEPATH: "dir-tar-2961337105.tar"},
            ),
        ],
    )
    got = await ContentStore(tmp_path / "store", GiB).pull(f"oci://{registry}/{repo}:v1")
    assert set(_files(got.path)) == {
        "model.safetensors",
        "config.json",
        "tok/vocab.json",
        "tok/sub/merges.txt",
    }


# ---- GGUF inside tar layers: KitOps and modctl ---------------------------------------------------
# KitOps: kitops-ml/kitops pkg/lib/filesystem/tar.go@d86453695d39423250f8444b03390d040b1412c5 (the
# model path of the Kitfile is tarred with names relative to the context directory; the layer type
# application/vnd.kitops.modelkit.model.v1.tar[+gzip|+zstd], config = the Kitfile as JSON).
# modctl: modelpack/modctl pkg/backend/build/builder.go@009e7f10f32e78fb7c9886f4716940517db9cbc4
# (one file per layer, application/vnd.cncf.model.weight.v1.tar by default, the relative path in
# org.cncf.model.filepath, the member named by that path; config.format from the Modelfile).


def _kitfile(model_path: str) -> dict[str, Any]:
    return {
        "manifestVersion": "1.0",
        "package": {"name": "tiny-gguf", "authors": ["someone"]},
        "model": {"name": "tiny", "path": model_path, "license": "Apache-2.0"},
    }


@pytest.mark.parametrize("kind", ["tar", "tar+gzip", "tar+zstd"])
async def test_kitops_gguf_in_tar_is_profiled_from_its_first_bytes(
    registry: str, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KitOps GGUF ModelKit: format, sizes and the GGUF header come from the layer's first bytes."""
    gguf_path = _big_gguf(tmp_path / "tiny.gguf", tokens=20000, tensor_floats=1 << 20, context=3333)
    member = gguf_path.read_bytes()
    layer = _compress(_tar([("tiny.gguf", member)]), kind)
    repo = _repo("kit-gguf-" + kind.replace("+", "-"))
    suffix = kind.removeprefix("tar")
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.KIT_CONFIG, json.dumps(_kitfile("tiny.gguf")).encode()),
        [(f"application/vnd.kitops.modelkit.model.v1.tar{suffix}", layer, {})],
        artifact_type=mt.KIT_MANIFEST,
    )
    ref = f"oci://{registry}/{repo}:v1"

    # a small first read makes the reader widen it; the spy records what was asked of the registry
    monkeypatch.setattr(profile_mod, "GGUF_FIRST_READ", 4 << 10)
    asked: list[int] = []
    real = RegistryClient.get_blob_range

    async def spy(self: RegistryClient, repo: str, digest: str, start: int, length: int) -> bytes:
        asked.append(length)
        return await real(self, repo, digest, start, length)

    monkeypatch.setattr(RegistryClient, "get_blob_range", spy)

    info = await inspect(ref)
    assert info.format == "gguf"
    _, prof = await model_profile(ref)
    assert prof.format == "gguf"
    assert prof.max_position_embeddings == 3333
    assert prof.num_layers == 2
    assert prof.weight_bytes == len(member)  # the file, not the (compressed) layer
    assert max(asked) < len(layer) // 2  # the header's bytes, not the weights
    assert len(asked) >= 2  # the first read was too small and was widened

    got = await ContentStore(tmp_path / "store", GiB).pull(ref)
    assert got.format == "gguf"
    assert (got.path / "tiny.gguf").read_bytes() == member


async def test_modctl_gguf_weight_tar_layer(registry: str, tmp_path: Path) -> None:
    gguf_path = make_gguf(tmp_path / "w" / "model-q8.gguf", context=901)
    member = gguf_path.read_bytes()
    meta = {"name": "model-q8.gguf", "mode": 420, "uid": 0, "gid": 0, "size": len(member), "typeflag": 48}
    repo = _repo("modctl-gguf")
    cfg = {
        "descriptor": {"createdAt": "2025-05-01T00:00:00Z", "name": "tiny"},
        "config": {"architecture": "llama", "format": "gguf", "quantization": "q8_0"},
        "modelfs": {"type": "layers", "diffIds": []},
    }
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.MODELPACK_CONFIG, json.dumps(cfg).encode()),
        [
            (
                "application/vnd.cncf.model.weight.v1.tar",
                _tar([("model-q8.gguf", member)]),
                {mt.FILEPATH: "model-q8.gguf", mt.FILE_METADATA: json.dumps(meta)},
            ),
            (
                "application/vnd.cncf.model.doc.v1.tar",
                _tar([("README.md", b"# tiny\n")]),
                {mt.FILEPATH: "README.md"},
            ),
        ],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    ref = f"oci://{registry}/{repo}:v1"
    _, prof = await model_profile(ref)
    assert (prof.format, prof.max_position_embeddings, prof.weight_bytes) == ("gguf", 901, len(member))

    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "orchardist", "inspect", ref, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert "profileError" not in out
    assert (out["format"], out["weightBytes"], out["profile"]["maxContext"]) == ("gguf", len(member), 901)
    got = await ContentStore(tmp_path / "store", GiB).pull(ref)
    assert got.format == "gguf"
    assert set(_files(got.path)) == {"model-q8.gguf", "README.md"}


async def test_gzip_safetensors_weights_count_uncompressed(registry: str, tmp_path: Path) -> None:
    """A tar+gzip weight layer counts the bytes of its files (from the gzip trailer), not the layer's."""
    weights = b"\x00" * (1 << 20)  # compresses to a few KiB
    raw = _tar([("model.safetensors", weights)])
    layer = gzip.compress(raw)
    repo = _repo("mp-gz")
    cfg = {"descriptor": {"name": "tiny"}, "config": {"format": "safetensors"}, "modelfs": {"type": "layers"}}
    await push_artifact(
        registry,
        f"{repo}:v1",
        (mt.MODELPACK_CONFIG, json.dumps(cfg).encode()),
        [
            ("application/vnd.cncf.model.weight.v1.tar+gzip", layer, {}),
            (mt.MODELPACK_WEIGHT_CONFIG_RAW, json.dumps(TINY_CONFIG).encode(), {mt.FILEPATH: "config.json"}),
        ],
        artifact_type=mt.MODELPACK_MANIFEST,
    )
    _, prof = await model_profile(f"oci://{registry}/{repo}:v1")
    assert len(layer) < len(weights) // 10
    assert prof.weight_bytes == len(raw)  # the tar's bytes: the file plus its headers


# ---- push --format docker: v0.1 for GGUF, as Docker writes it --------------------------------------
# docker/model-runner pkg/distribution/builder (FromPath for a GGUF file: config
# application/vnd.docker.ai.model.config.v0.1+json; FromDirectory: v0.2) and its test
# TestConfigMediaTypes, which expects v0.1 for a GGUF artifact.


async def test_push_docker_gguf_writes_v01_and_safetensors_v02(registry: str, tmp_path: Path) -> None:
    from tests.fixtures.registry import make_safetensors_model

    gguf_dir = tmp_path / "gguf"
    make_gguf(gguf_dir / "tiny.gguf")
    (gguf_dir / "LICENSE").write_text("MIT\n")
    st_dir = make_safetensors_model(tmp_path / "st")
    refs = {}
    for name, d in (("gguf", gguf_dir), ("st", st_dir)):
        refs[name] = f"oci://{registry}/{_repo('dmr-' + name)}:v1"
        await push(d, refs[name], format="docker")

    g = await inspect(refs["gguf"])
    assert g.manifest.data["config"]["mediaType"] == mt.DMR_CONFIG_V01
    assert {e.layer.media_type for e in g.layout.entries} == {mt.DMR_GGUF, mt.DMR_LICENSE}
    s = await inspect(refs["st"])
    assert s.manifest.data["config"]["mediaType"] == mt.DMR_CONFIG_V02

    both = ContentStore(tmp_path / "store", GiB)
    assert _files((await both.pull(refs["gguf"])).path) == _files(gguf_dir)
    assert _files((await both.pull(refs["st"])).path) == _files(st_dir)

    forced = f"oci://{registry}/{_repo('dmr-forced')}:v1"
    await push(gguf_dir, forced, format="docker", docker_config="v0.2")
    assert (await inspect(forced)).manifest.data["config"]["mediaType"] == mt.DMR_CONFIG_V02
