"""The process helpers on real short-lived processes: identity through psutil, records survive a
round trip, stop() ends a process group, and a record whose PID now belongs to another process (or
runs another command line) is never signalled."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchardist import processes
from orchardist.dev import cluster, procs
from tests.fixtures.wait import wait_for

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


def test_identity_of_a_live_process_and_after_it_exits() -> None:
    """identify reads pid, start stamp and command line; an exited (even unreaped) child is gone."""
    child = subprocess.Popen(SLEEPER, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        found = processes.settle(child.pid, SLEEPER)
        assert found is not None
        assert found == processes.Identity(child.pid, found.started, processes.argv_digest(SLEEPER))
        assert processes.check(found) == "same" and processes.alive(child.pid)
        assert processes.cmdline(child.pid) == SLEEPER
        assert processes.group_members(child.pid) == [child.pid]
        assert processes.check(replace(found, started="another-boot:1.00")) == "other"
        assert processes.check(replace(found, digest=processes.argv_digest(["sleep", "60"]))) == "other"
        child.kill()
        wait_for(
            lambda: not processes.alive(child.pid),
            timeout=10,
            interval=0.02,
            message="the killed child still lives",
        )
        assert not processes.alive(child.pid)  # a zombie until reaped, which counts as dead
        assert processes.check(found) != "same"
    finally:
        child.kill()
        child.wait()
    assert processes.check(found) == "gone"
    assert processes.identify(child.pid) is None and processes.start_stamp(child.pid) is None


def test_another_users_process_is_other_not_gone() -> None:
    """pid 1 exists; a record claiming it with a made-up stamp must never be called ours."""
    assert processes.check(processes.Identity(1, "made-up", "digest")) == "other"


def test_descendants_and_group_signal(tmp_path: Path) -> None:
    """A group leader's children are found, and one signal to the group ends them all."""
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(c.pid, flush=True); time.sleep(60)"
    )
    leader = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert leader.stdout is not None
        grandchild = int(leader.stdout.readline())
        assert processes.descendants(leader.pid) == [grandchild]
        assert sorted(processes.group_members(leader.pid)) == sorted([leader.pid, grandchild])
        assert processes.signal_group(leader.pid, signal.SIGKILL)
        leader.wait()
        wait_for(
            lambda: not processes.group_alive(leader.pid),
            timeout=10,
            interval=0.02,
            message="the killed group still lives",
        )
        assert not processes.group_alive(leader.pid) and not processes.alive(grandchild)
    finally:
        leader.kill()
        leader.wait()


def test_start_records_pid_and_start_time_in_own_group(sleeper: procs.ProcRecord) -> None:
    assert procs.is_running(sleeper)
    assert os.getpgid(sleeper.pid) == sleeper.pid
    assert sleeper.start_time == processes.start_stamp(sleeper.pid)
    assert processes.check(sleeper.identity) == "same"


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
    wait_for(
        lambda: not ("ok" not in Path(rec.log).read_text()),
        timeout=10,
        interval=0.05,
        message="still true: 'ok' not in Path(rec.log).read_text()",
    )
    t0 = time.monotonic()
    assert procs.stop(rec, grace=0.5) is True
    assert not procs.is_running(rec)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    "stale",
    [
        {"start_time": "another-boot:1.00"},  # same pid, another start: the pid was reused
        {"argv": ["/usr/bin/etcd", "--data-dir", "x"]},  # same pid and start, another program
    ],
)
def test_reused_pid_is_not_signalled(sleeper: procs.ProcRecord, stale: dict[str, object]) -> None:
    record = replace(sleeper, **stale)  # type: ignore[arg-type]
    assert not procs.is_running(record)
    assert procs.stop(record) is False
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


def test_down_of_a_dead_recorded_cluster_removes_its_state(tmp_path: Path) -> None:
    rec = procs.start("etcd", [sys.executable, "-c", "pass"], tmp_path / "state" / "logs" / "etcd.log")
    state = tmp_path / "state"
    procs.save([rec], state / "pids")
    (state / "cluster.json").write_text(
        '{"bin_dir": "/nonexistent", "api_port": 1, "etcd_port": 2, "token": "t", "order": ["etcd"]}'
    )
    wait_for(
        lambda: not procs.is_running(rec),
        timeout=10,
        interval=0.05,
        message="still running",
    )
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
        wait_for(
            lambda: not procs.is_running(child),
            timeout=10,
            interval=0.05,
            message="the orphan still runs",
        )
        assert not procs.is_running(child)
    finally:
        procs.stop(child, grace=1)
