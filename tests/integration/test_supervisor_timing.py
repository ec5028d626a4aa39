"""The supervisor's timing on the event loop's fake clock (looptime): restart backoff and liveness.

Real processes (a Python one-liner that exits, a stdlib HTTP server that answers like an engine)
under the real supervisor; only the loop's clock is fake, so minutes of backoff and probe timeouts
take well under a second and the delays are measured exactly in loop time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orchardist import processes
from orchardist_agent.engines.base import Launch, Probe
from orchardist_agent.supervisor import EngineStatus, Supervisor, SupervisorConfig

pytestmark = pytest.mark.looptime

ENGINE = """
import http.server, json, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"choices": [{"text": "x"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class Program:
    """A Launchable running `code` with python (the port is its first argument)."""

    host = "127.0.0.1"

    def __init__(self, code: str) -> None:
        self.code = code

    def launch(self, port: int) -> Launch:
        return Launch(
            argv=(sys.executable, "-c", self.code, str(port)),
            env={},
            host=self.host,
            port=port,
            probe=Probe(path="/v1/completions", body={"prompt": "Hi", "max_tokens": 1}),
        )


class Timeline:
    """Every status change with the loop time it happened at; wakes waiters on each."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, EngineStatus]] = []
        self.changed = asyncio.Event()

    def __call__(self, status: EngineStatus) -> None:
        self.seen.append((asyncio.get_running_loop().time(), status))
        self.changed.set()

    async def until(self, fact: Callable[[EngineStatus], bool], within: float) -> tuple[float, EngineStatus]:
        """The first change (from now on) where `fact` holds; fails after `within` loop seconds."""
        start = len(self.seen)
        async with asyncio.timeout(within):
            while True:
                for when, status in self.seen[start:]:
                    if fact(status):
                        return when, status
                start = len(self.seen)
                self.changed.clear()
                await self.changed.wait()


def supervisor(tmp_path: Path, timeline: Timeline, **config: object) -> Supervisor:
    cfg = SupervisorConfig(**config)  # type: ignore[arg-type]
    return Supervisor(tmp_path / "state", tmp_path / "logs", config=cfg, on_change=timeline)


def restarted(n: int) -> Callable[[EngineStatus], bool]:
    return lambda status: status.restarts == n


@pytest.mark.parametrize(("jitter", "gaps"), [(0.0, [10, 20, 40, 40]), (1.0, [5, 10, 20, 20])])
async def test_a_crash_loop_restarts_after_doubling_jittered_delays(
    tmp_path: Path, jitter: float, gaps: list[float]
) -> None:
    """10 s, 20 s, 40 s, capped at 40 s; the most jitter takes off half of each delay."""
    timeline = Timeline()
    sup = supervisor(tmp_path, timeline, backoff_base=10, backoff_max=40, rng=lambda: jitter)
    try:
        await sup.ensure("team/crashy", Program("import sys; sys.exit(3)"))
        measured = []
        for n in range(1, len(gaps) + 1):
            crashed_at, crashed = await timeline.until(restarted(n), within=600)
            assert crashed.phase == "CrashLoop" and crashed.pid is None
            error = crashed.last_error
            assert error is not None and "engine exited with code 3" in error.message
            started_at, _ = await timeline.until(lambda s: s.pid is not None, within=600)
            measured.append(started_at - crashed_at)
        assert measured == pytest.approx(gaps, abs=0.5)
    finally:
        await sup.shutdown()


# A real engine must answer its readiness probes while fake time waits: looptime moves the clock to
# the next timer after `noop_cycles` idle loop cycles (42 by default, microseconds of real time), and a
# loaded machine's engine answered later than that often enough to time every probe out. This many
# cycles give it some tens of milliseconds of real time per jump; loop-time measurements are unchanged.
@pytest.mark.looptime(noop_cycles=20_000)
async def test_a_hung_engine_fails_liveness_after_three_probe_timeouts(tmp_path: Path) -> None:
    """Stopped with SIGSTOP: three probes time out 10 s apart, the group is killed, the restart waits."""
    timeline = Timeline()
    sup = supervisor(
        tmp_path, timeline, probe_interval=10, probe_timeout=5, liveness_failures=3, stop_timeout=5,
        ready_timeout=3600, backoff_base=10, rng=lambda: 0.0,
    )  # fmt: skip
    try:
        await sup.ensure("team/hung", Program(ENGINE))
        _, ready = await timeline.until(lambda s: s.phase == "Ready", within=3600)
        assert ready.pid is not None
        stopped_at = asyncio.get_running_loop().time()
        os.kill(ready.pid, signal.SIGSTOP)
        crashed_at, crashed = await timeline.until(lambda s: s.phase == "CrashLoop", within=600)
        assert crashed.last_error is not None
        assert "/health failed 3 times in a row" in crashed.last_error.message
        # First probe within one interval, two more 10 s apart, each 5 s to time out, 5 s of SIGTERM:
        # 25..40 s. The fake clock also moves while worker threads run (the supervisor's psutil checks),
        # so the bound allows half a probe interval more; a fourth probe would come 10 s later.
        assert 25 <= crashed_at - stopped_at <= 40 + 5
        assert not processes.alive(ready.pid)  # SIGKILL ends a stopped process too
        started_at, again = await timeline.until(lambda s: s.pid is not None, within=3600)
        assert started_at - crashed_at == pytest.approx(10, abs=0.5)
        _, ready_again = await timeline.until(lambda s: s.phase == "Ready", within=3600)
        assert ready_again.pid == again.pid != ready.pid and ready_again.restarts == 1
    finally:
        await sup.shutdown()
