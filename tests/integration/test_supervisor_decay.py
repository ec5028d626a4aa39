"""Service forgives earlier crashes: real processes on the real clock, the minutes scaled down.

Not on looptime like test_supervisor_timing: this engine must pass real health probes to become
Ready, and a fake clock that jumps ahead while a probe waits on a real socket turns "Ready" into a
race with the machine's load (a loaded machine timed every probe out and never reached Ready).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.integration.test_supervisor_timing import ENGINE, Program, Timeline, supervisor

BASE = 0.2  # seconds: the first restart delay; doubled per counted crash
DECAY = 1.0  # seconds of Ready that forgive one crash (60 s in production)


async def test_service_forgives_earlier_crashes_so_the_next_delay_is_short(tmp_path: Path) -> None:
    """Three crashes, then five decay intervals of service: the next crash waits the base delay,
    not the 8x a fourth doubling would be (the status reports the delay it chose)."""
    timeline = Timeline()
    # No liveness probe while it serves: only the kill ends it.
    sup = supervisor(
        tmp_path,
        timeline,
        backoff_base=BASE,
        backoff_max=30,
        backoff_decay=DECAY,
        rng=lambda: 0.0,
        probe_interval=1000,
        tick=0.05,
    )
    starts = tmp_path / "starts"
    flaky = (
        f"import pathlib, sys\nn = pathlib.Path({str(starts)!r})\n"
        "k = int(n.read_text()) if n.exists() else 0\nn.write_text(str(k + 1))\n"
        "if k < 3:\n    sys.exit(3)\n"
    ) + ENGINE  # exits at its first three starts, then serves
    try:
        await sup.ensure("team/flaky", Program(flaky))
        _, ready = await timeline.until(lambda s: s.phase == "Ready", within=60)
        assert ready.restarts == 3 and ready.pid is not None
        await asyncio.sleep(5.5 * DECAY)  # the scenario itself: five intervals of service
        os.kill(ready.pid, signal.SIGKILL)
        _, waiting = await timeline.until(lambda s: s.next_try is not None, within=30)
        assert (waiting.phase, waiting.restarts, waiting.backoff_seconds) == ("CrashLoop", 4, BASE)
        _, again = await timeline.until(lambda s: s.phase == "Starting", within=30)
        assert again.next_try is None and again.backoff_seconds is None  # the wait is over
    finally:
        await sup.shutdown()
