"""The process helpers on real short-lived processes: records survive a round trip, stop() ends a
process group, and a record whose PID now belongs to another process is never signalled."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchardist.dev import cluster, procs

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[procs.ProcRecord]:
    rec = procs.start("sleeper", SLEEPER, tmp_path / "logs" / "sleeper.log")
    yield rec
    procs.stop(rec, grace=1)


def test_free_port_is_bindable() -> None:
    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 1024 <= port <= 65535


def test_start_records_pid_and_start_time_in_own_group(sleeper: procs.ProcRecord) -> None:
    assert procs.is_running(sleeper)
    assert os.getpgid(sleeper.pid) == sleeper.pid
    assert sleeper.start_time == procs.start_time(sleeper.pid)


def test_records_round_trip_through_files(sleeper: procs.ProcRecord, tmp_path: Path) -> None:
    procs.save([sleeper], tmp_path / "pids")
    [loaded] = procs.load(tmp_path / "pids")
    assert loaded == sleeper
    assert procs.is_running(loaded)


def test_stop_terminates_and_reports(sleeper: procs.ProcRecord) -> None:
    assert procs.stop(sleeper, grace=5) is True
    assert not procs.is_running(sleeper)
    assert procs.stop(sleeper) is False  # already gone


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ok', flush=True); time.sleep(60)"
    )
    rec = procs.start("stubborn", [sys.executable, "-c", code], tmp_path / "stubborn.log")
    deadline = time.monotonic() + 10
    while "ok" not in Path(rec.log).read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    assert procs.stop(rec, grace=0.5) is True
    assert not procs.is_running(rec)
    assert time.monotonic() - t0 < 5


def test_reused_pid_is_not_signalled(sleeper: procs.ProcRecord) -> None:
    # Same PID, different start time: what a record looks like after the PID was reused.
    stale = replace(
        sleeper, start_time=str(int(sleeper.start_time) - 1) if sleeper.start_time.isdigit() else "x"
    )
    assert not procs.is_running(stale)
    assert procs.stop(stale) is False
    assert procs.is_running(sleeper)  # the live process was left alone


def test_start_failure_is_reported_with_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        procs.start("missing", [str(tmp_path / "no-such-binary")], tmp_path / "m.log")


def test_wait_http_fails_fast_when_the_process_dies(tmp_path: Path) -> None:
    rec = procs.start("dies", [sys.executable, "-c", "print('bye')"], tmp_path / "dies.log")
    t0 = time.monotonic()
    with pytest.raises(procs.ProcessError, match="exited"):
        procs.wait_http(f"http://127.0.0.1:{procs.free_port()}/", timeout=30, proc=rec)
    assert time.monotonic() - t0 < 10


def test_wait_http_times_out_and_then_succeeds_on_a_real_server() -> None:
    port = procs.free_port()
    with pytest.raises(procs.ProcessError, match="not ready"):
        procs.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=0.3)

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        waited = procs.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=10, expect="ok")
        assert waited < 10
    finally:
        server.shutdown()


def test_missing_control_plane_binaries_are_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    monkeypatch.setenv("ORCHARDIST_KUBEBINS", str(tmp_path))
    with pytest.raises(cluster.KubebinsMissingError, match="lacks kube-apiserver, kube-controller-manager"):
        cluster.find_kubebins()


def test_cluster_start_refuses_a_foreign_non_empty_state_dir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no cluster record"):
        cluster.Cluster.start(tmp_path, bin_dir=tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_down_of_a_dead_recorded_cluster_removes_its_state(tmp_path: Path) -> None:
    rec = procs.start("etcd", [sys.executable, "-c", "pass"], tmp_path / "state" / "logs" / "etcd.log")
    state = tmp_path / "state"
    procs.save([rec], state / "pids")
    (state / "cluster.json").write_text(
        '{"bin_dir": "/nonexistent", "api_port": 1, "etcd_port": 2, "token": "t", "order": ["etcd"]}'
    )
    deadline = time.monotonic() + 10
    while procs.is_running(rec) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.down(state) == []
    assert not state.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is a Linux feature")
def test_die_with_parent_stops_the_child_when_its_starter_is_killed(tmp_path: Path) -> None:
    starter = (
        "import sys; from pathlib import Path; from orchardist.dev import procs\n"
        f"log = Path({str(tmp_path / 'child.log')!r})\n"
        f"rec = procs.start('child', {SLEEPER!r}, log, die_with_parent=True)\n"
        "print('RECORD', rec.to_json().replace(chr(10), ' '), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    line = ""
    while not line.startswith("RECORD "):  # other output (logging) may come first
        line = parent.stdout.readline()
        assert line, "the starter exited without starting its child"
    child = procs.ProcRecord.from_json(line.removeprefix("RECORD "))
    try:
        assert procs.is_running(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while procs.is_running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.is_running(child)
    finally:
        procs.stop(child, grace=1)
