"""The supervisor's pure parts and its small file helpers: restart delays, records, log rotation, tails."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchardist.retry import ENGINE_RESTART
from orchardist_agent.engines.base import Launch, Measured, Probe
from orchardist_agent.supervisor import SupervisorConfig, logs, records
from orchardist_agent.supervisor.policy import forgiven, tail_message


@pytest.mark.parametrize(
    ("failures", "longest", "shortest"),
    [(0, 0.0, 0.0), (1, 10.0, 5.0), (2, 20.0, 10.0), (3, 40.0, 20.0), (5, 160.0, 80.0), (6, 300.0, 150.0),
     (10**6, 300.0, 150.0)],
)  # fmt: skip
def test_restarts_wait_the_engine_restart_policy(failures: int, longest: float, shortest: float) -> None:
    """10 s doubling to 5 min, less up to half of it by jitter, so engines do not restart in lockstep."""
    restart = SupervisorConfig().restart
    assert restart == ENGINE_RESTART
    assert restart.delay(failures, lambda: 0.0) == longest
    assert restart.delay(failures, lambda: 1.0) == shortest


def test_restart_base_and_cap_are_configurable_with_the_same_jitter() -> None:
    restart = SupervisorConfig(backoff_base=0.5, backoff_max=2.0).restart
    assert [restart.delay(n, lambda: 0.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    assert restart.jitter == ENGINE_RESTART.jitter


@pytest.mark.parametrize(
    ("failures", "served", "after"),
    [(0, 5.0, 0), (4, 5.0, 4), (4, 59.9, 4), (4, 60.0, 3), (4, 179.0, 2), (3, 300.0, 0), (9, 86400.0, 0),
     (2, -5.0, 2)],
)  # fmt: skip
def test_service_forgives_one_failure_per_full_decay(failures: int, served: float, after: int) -> None:
    """Each full minute of Ready forgives one failure: the next delay halves per minute served."""
    assert forgiven(failures, served, decay=60.0) == after


def test_three_crashes_then_five_minutes_of_service_wait_the_base_delay_next() -> None:
    restart = SupervisorConfig().restart
    assert restart.nominal(forgiven(3, 300.0, decay=60.0) + 1) == restart.base
    assert restart.nominal(3 + 1) == 80.0  # what it waited before: a reset only after 10 min


def test_tail_message_keeps_the_end() -> None:
    lines = [f"line {i}" for i in range(1000)]
    msg = tail_message(lines, limit=100)
    assert len(msg) == 100
    assert msg.startswith("...")
    assert msg.endswith("line 999")
    assert tail_message(["a ", "b"]) == "a\nb"


def record(key: str) -> records.Record:
    return records.Record(
        key=key,
        pid=123,
        start_time="boot:42",
        cmdline_sha256="d",
        fingerprint="f",
        argv=["/bin/engine", "--port", "1"],
        env={"A": "1"},
        host="127.0.0.1",
        port=1,
        health_path="/health",
        probe_path="/v1/completions",
        probe_body={"prompt": "Hi", "max_tokens": 1},
        api_key=None,
        log_path="/tmp/x.log",
        started_at="2026-11-26T12:00:00+00:00",
        restarts=2,
        measured={"overhead_bytes": 5, "num_blocks": 6, "details": {}},
    )


def test_records_round_trip_private_and_by_key(tmp_path: Path) -> None:
    rec = record("ns/replica-0")
    records.write(tmp_path, rec)
    path = records.path_for(tmp_path, rec.key)
    assert path.name == "ns%2Freplica-0.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert records.load_all(tmp_path) == [rec]
    records.remove(tmp_path, rec.key)
    assert records.load_all(tmp_path) == []


def test_a_record_gives_back_its_launch_and_measurements(tmp_path: Path) -> None:
    launch = Launch(
        argv=("/venv/bin/python", "-m", "mlx_lm", "server", "--port", "9"),
        env={"HF_HUB_OFFLINE": "1"},
        host="0.0.0.0",
        port=9,
        probe=Probe(path="/v1/completions", body={"prompt": "Hi", "max_tokens": 1}),
        health_path="/health",
        api_key="k",
    )
    measured = Measured(overhead_bytes=5, num_blocks=6, details={"kv_cache_tokens": 96.0})
    rec = records.of(
        "ns/r", launch, pid=7, start_time="b:1.00", cmdline_sha256="d", log_path=tmp_path / "r.log",
        started_at="2026-11-26T12:00:00+00:00", restarts=1, measured=measured,
    )  # fmt: skip
    records.write(tmp_path, rec)
    [back] = records.load_all(tmp_path)
    assert records.launch_of(back) == launch
    assert records.launch_of(back).fingerprint() == rec.fingerprint
    assert records.measured_of(back) == measured
    assert records.measured_of(records.Record(**{**vars(back), "measured": {}})) is None


def test_unreadable_records_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "wrong.json").write_text('{"key": "x"}')
    records.write(tmp_path, record("good"))
    assert [r.key for r in records.load_all(tmp_path)] == ["good"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json"]


def test_rotate_keeps_backups(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    for run in range(5):
        logs.rotate(log, 3)
        log.write_text(f"run {run}\n")
    assert log.read_text() == "run 4\n"
    assert [(tmp_path / f"e.log.{i}").read_text() for i in (1, 2, 3)] == ["run 3\n", "run 2\n", "run 1\n"]
    assert not (tmp_path / "e.log.4").exists()


def test_copy_truncate_keeps_an_appending_writer_working(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    with log.open("ab", buffering=0) as writer:
        writer.write(b"old 1\nold 2\n")
        logs.copy_truncate(log, 2)
        writer.write(b"new\n")
    assert (tmp_path / "e.log.1").read_text() == "old 1\nold 2\n"
    assert log.read_text() == "new\n"


def test_follower_reads_new_lines_and_survives_truncation(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("before\n")
    f = logs.Follower(log, from_end=True)
    assert f.read() == []
    with log.open("a") as w:
        w.write("one\ntw")
    assert f.read() == ["one"]
    with log.open("a") as w:
        w.write("o\n")
    assert f.read() == ["two"]
    log.write_text("")
    with log.open("a") as w:
        w.write("short\n")
    assert f.read() == ["short"]  # shrank below the offset: read from the start
    f.reset()
    assert f.read() == ["short"]


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("".join(f"{i}\n" for i in range(100)))
    assert logs.tail(log, 3) == ["97", "98", "99"]
    assert logs.tail(tmp_path / "missing.log", 3) == []
