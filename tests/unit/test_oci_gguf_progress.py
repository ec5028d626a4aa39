"""GGUF header parsing (files written by the `gguf` package) and the progress tracker."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from orchardist.oci.gguf import GGUFError, NeedMoreError, parse_header
from orchardist.oci.progress import PullProgress, Tracker
from tests.fixtures.registry import make_gguf


def test_parse_header_of_a_real_gguf(tmp_path: Path) -> None:
    data = make_gguf(tmp_path / "m.gguf", context=4096, tokens=5000).read_bytes()
    meta = parse_header(data)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 4096
    assert meta["llama.block_count"] == 2
    assert meta["llama.attention.head_count_kv"] == 2
    assert meta["general.file_type"] == 7
    assert "tokenizer.ggml.tokens" not in meta  # 5000 entries: skipped, not kept


def test_parse_header_keeps_short_arrays(tmp_path: Path) -> None:
    data = make_gguf(tmp_path / "m.gguf", tokens=10).read_bytes()
    assert parse_header(data)["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(10)]


def test_truncated_header_asks_for_more(tmp_path: Path) -> None:
    data = make_gguf(tmp_path / "m.gguf", tokens=5000).read_bytes()
    with pytest.raises(NeedMoreError):
        parse_header(data[:2000])


@pytest.mark.parametrize("data", [b"GGML" + b"\0" * 20, b"GGUF" + struct.pack("<I", 9) + b"\0" * 16])
def test_not_gguf(data: bytes) -> None:
    with pytest.raises(GGUFError):
        parse_header(data)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tracker_rate_eta_and_throttle() -> None:
    clock = Clock()
    events: list[PullProgress] = []
    t = Tracker(events.append, "oci://r/m:1", min_interval=1.0, window=10.0, clock=clock)
    t.start("sha256:x", total=1000, layers=2)
    assert events[-1].phase == "downloading" and events[-1].bytes_done == 0
    for _ in range(10):
        clock.t += 0.5
        t.add(50)  # 100 bytes/s
    # throttled: one event per second of clock, plus the forced phase event
    assert 5 <= len(events) <= 7
    last = t.event()
    assert last.bytes_done == 500
    assert last.bytes_per_second == pytest.approx(100.0)
    assert last.eta_seconds == pytest.approx(5.0)
    assert last.percent == "50%"
    t.set_phase("done")
    assert events[-1].phase == "done"


def test_progress_fraction_with_unknown_total() -> None:
    p = PullProgress("r", "", "resolving", 0, 0, 0.0, None)
    assert p.fraction == 1.0 and p.percent == "100%"
