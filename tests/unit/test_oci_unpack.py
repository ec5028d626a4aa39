"""The parts of unpacking on the way that need no registry: the pipe between the download and the
extracting thread, the shared allowance, and which layers a model unpacks on the way."""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from orchardist.oci import mediatypes as mt
from orchardist.oci.errors import StoreFullError
from orchardist.oci.index import unpackable
from orchardist.oci.layouts import read_layout
from orchardist.oci.unpack import Allowance, Pipe, StoppedError, _Counted, _decompressed, _extract

DIGEST = {c: "sha256:" + c * 64 for c in "abcdef"}


def _write_all(pipe: Pipe, data: bytes, batch: int) -> None:
    for offset in range(0, len(data), batch):
        pipe.write_at(memoryview(data)[offset : offset + batch], offset)


def test_the_pipe_hands_over_every_byte_in_order_then_ends_on_finish() -> None:
    data = bytes(range(256)) * 1000
    pipe = Pipe()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        writing = pool.submit(_write_all, pipe, data, 4096)
        got = bytearray()
        while len(got) < len(data):
            got += pipe.read(1000)
        writing.result(timeout=30)
        pipe.finish()
        assert pipe.read(1000) == b""
    assert bytes(got) == data


def test_a_batch_is_handed_back_only_once_the_reader_took_all_of_it() -> None:
    """The writer's buffer is reused as soon as write_at returns: the reader must have copied it."""
    pipe = Pipe()
    buf = bytearray(b"x" * 10)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        writing = pool.submit(pipe.write_at, memoryview(buf), 0)
        assert pipe.read(4) == b"xxxx"
        assert not writing.done()  # 6 bytes still to take
        assert pipe.read(-1) == b"xxxxxx"
        writing.result(timeout=30)


def test_abort_wakes_a_waiting_reader() -> None:
    pipe = Pipe()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(pipe.read, 10)
        pipe.abort()
        with pytest.raises(StoppedError, match="the download stopped"):
            reading.result(timeout=30)


def test_a_reader_that_stopped_never_leaves_a_writer_waiting() -> None:
    pipe = Pipe()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        writing = pool.submit(pipe.write_at, memoryview(b"abc"), 0)
        assert pipe.read(1) == b"a"
        pipe.stop_reading()
        with pytest.raises(StoppedError, match="the unpacking side stopped"):
            writing.result(timeout=30)
    with pytest.raises(StoppedError):
        pipe.write_at(memoryview(b"d"), 3)


def test_batches_out_of_order_are_refused() -> None:
    pipe = Pipe()
    with pytest.raises(StoppedError, match="batch at 5, expected 0"):
        pipe.write_at(memoryview(b"abc"), 5)


def test_the_allowance_is_shared_by_every_thread_and_stops_at_its_room() -> None:
    room = Allowance(1000)
    taken = threading.Barrier(4)

    def take() -> None:
        taken.wait()
        for _ in range(25):
            room.take(10, "layer x")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(take) for _ in range(4)]:
            f.result(timeout=30)
    assert room.staged == 1000
    with pytest.raises(
        StoreFullError,
        match=r"layer x: expands past the 1000 bytes left in the store budget \(counted uncompressed\)",
    ):
        room.take(1, "layer x")
    room.give_back(501)  # a failed layer's bytes come back
    room.take(500, "layer y")
    room.kept(1000)  # a kept layer is counted by the store from now on
    assert room.staged == 0


def test_widening_sets_the_room_left_from_now_on() -> None:
    room = Allowance(10)
    with pytest.raises(StoreFullError):
        room.take(11, "layer x")
    room.give_back(11)
    room.widen(100)
    assert room.widened and room.room == 100
    room.take(100, "layer x")


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("archive", ["tar", "tar+gzip"])
def test_extracting_from_the_pipe_takes_the_rest_of_the_body(tmp_path: Path, archive: str) -> None:
    """Bytes after the tar's end (padding, trailing data) are read, not extracted: the writer is
    never left waiting, and the uncompressed bytes count against the allowance."""
    raw = _tar({"a/b.txt": b"hello"}) + b"\0" * 20000
    body = gzip.compress(raw) + b"trailing bytes the digest covers" if archive == "tar+gzip" else raw
    pipe = Pipe()
    room = Allowance(1 << 20)
    counted = _Counted(_decompressed(pipe, archive), room, "layer x")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        extracting = pool.submit(_extract, pipe, tmp_path, counted)
        pool.submit(_write_all, pipe, body, 7000).result(timeout=30)
        pipe.finish()
        assert extracting.result(timeout=30) == [("a/b.txt", 5)]
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"hello"
    assert 0 < counted.bytes == room.staged <= len(raw)


def _manifest(*layers: tuple[str, str, dict[str, str]], config: str = DIGEST["f"]) -> dict[str, Any]:
    return {
        "artifactType": mt.MODELPACK_MANIFEST,
        "config": {"mediaType": mt.MODELPACK_CONFIG, "digest": config, "size": 10},
        "layers": [{"mediaType": m, "digest": d, "size": 10, "annotations": a} for m, d, a in layers],
    }


TAR_GZIP = "application/vnd.cncf.model.weight.v1.tar+gzip"
TAR = "application/vnd.cncf.model.weight.v1.tar"
RAW = "application/vnd.cncf.model.weight.v1.raw"
FILE = {mt.FILEPATH: "model.safetensors"}

UNPACKABLE: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "tar layers, each with its kind": (
        _manifest((TAR_GZIP, DIGEST["a"], {}), (TAR, DIGEST["b"], {}), (RAW, DIGEST["c"], FILE)),
        {DIGEST["a"]: "tar+gzip", DIGEST["b"]: "tar"},
    ),
    "a layer that is also a raw file is kept as a blob": (
        _manifest((TAR, DIGEST["a"], {}), (RAW, DIGEST["a"], FILE)),
        {},
    ),
    "a layer named as two kinds of archive is fetched as a blob": (
        _manifest((TAR, DIGEST["a"], {}), (TAR_GZIP, DIGEST["a"], {})),
        {},
    ),
    "the same archive twice is one layer": (
        _manifest((TAR, DIGEST["a"], {}), (TAR, DIGEST["a"], {})),
        {DIGEST["a"]: "tar"},
    ),
    "a layer that is also the config is kept as a blob": (
        _manifest((TAR, DIGEST["a"], {}), config=DIGEST["a"]),
        {},
    ),
}


@pytest.mark.parametrize("case", list(UNPACKABLE))
def test_unpackable(case: str) -> None:
    manifest, want = UNPACKABLE[case]
    assert unpackable(read_layout(manifest)) == want
