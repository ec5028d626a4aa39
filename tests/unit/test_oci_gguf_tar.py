"""A GGUF header found in the first bytes of a tar layer (raw, gzip, zstd), as a pure table."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from pathlib import Path

import pytest

from orchardist.oci import mediatypes as mt
from orchardist.oci.layouts import read_layout
from orchardist.oci.profile import ProfileUnavailableError, _Prefix, exact_weight_bytes, gguf_member
from tests.fixtures.registry import make_gguf


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_gguf(Path(tmp_path_factory.mktemp("g")) / "t.gguf", context=640).read_bytes()


def test_found_after_other_members(gguf_bytes: bytes) -> None:
    raw = _tar([("README.md", b"# hi\n" * 100), ("weights/tiny.gguf", gguf_bytes)])
    meta, size = gguf_member(raw, complete=True) or ({}, 0)
    assert (meta["llama.context_length"], size) == (640, len(gguf_bytes))


def test_a_prefix_that_ends_in_the_header_asks_for_more(gguf_bytes: bytes) -> None:
    raw = _tar([("tiny.gguf", gguf_bytes)])
    assert gguf_member(raw[:2048], complete=False) is None
    assert gguf_member(raw[:100], complete=False) is None  # not even a whole tar header


def test_a_whole_archive_without_gguf_is_an_error() -> None:
    with pytest.raises(ProfileUnavailableError, match=r"no \.gguf file"):
        gguf_member(_tar([("model.safetensors", b"\0" * 64)]), complete=True)


def test_mmproj_is_not_the_model(gguf_bytes: bytes) -> None:
    raw = _tar([("mmproj-f16.gguf", b"GGUFjunk"), ("model.gguf", gguf_bytes)])
    found = gguf_member(raw, complete=True)
    assert found is not None and found[1] == len(gguf_bytes)


@pytest.mark.parametrize("archive", ["tar+gzip", "tar+zstd"])
def test_decompression_stops_at_the_limit(archive: str) -> None:
    """A bomb (tiny compressed, huge expanded) costs at most the limit."""
    raw = b"\0" * (64 << 20)
    if archive == "tar+gzip":
        packed = gzip.compress(raw)
    else:
        import zstandard

        packed = zstandard.ZstdCompressor().compress(raw)
    assert len(_Prefix(archive).tar_bytes(packed, 1 << 20)) == 1 << 20


@pytest.mark.parametrize("archive", ["tar+gzip", "tar+zstd"])
def test_a_compressed_prefix_decompresses_as_far_as_it_goes(archive: str, gguf_bytes: bytes) -> None:
    """zstd yields whole blocks (up to 128 KiB), gzip as it goes: either way a prefix gives a prefix."""
    raw = _tar([("tiny.gguf", gguf_bytes), ("pad.bin", random.randbytes(1 << 20))])
    if archive == "tar+gzip":
        packed = gzip.compress(raw)
    else:
        import zstandard

        packed = zstandard.ZstdCompressor().compress(raw)
    head = _Prefix(archive).tar_bytes(packed[: len(packed) // 2], 64 << 20)
    assert 0 < len(head) < len(raw) and raw.startswith(head)


def test_weight_bytes_from_the_packers_file_metadata() -> None:
    meta = '{"name":"m.gguf","size":123456}'
    layout = read_layout(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "artifactType": mt.MODELPACK_MANIFEST,
            "config": {"mediaType": mt.MODELPACK_CONFIG, "digest": "sha256:" + "a" * 64, "size": 10},
            "layers": [
                {
                    "mediaType": "application/vnd.cncf.model.weight.v1.tar+gzip",
                    "digest": "sha256:" + "b" * 64,
                    "size": 999,
                    "annotations": {mt.FILEPATH: "m.gguf", mt.FILE_METADATA: meta},
                },
                {
                    "mediaType": "application/vnd.cncf.model.weight.v1.tar",
                    "digest": "sha256:" + "c" * 64,
                    "size": 5000,
                },
            ],
        }
    )
    assert exact_weight_bytes(layout) == 123456 + 5000
    assert exact_weight_bytes(layout, {"sha256:" + "c" * 64: 4000}) == 123456 + 4000
