"""Pull progress as a stream of immutable events; the agent throttles them into status patches.

:class:`Tracker` turns byte counts into events (rate over a sliding window, ETA) and calls the
callback at most every ``min_interval`` seconds, plus once for each phase change and at the end.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class PullProgress:
    reference: str
    digest: str
    phase: str  # resolving | downloading | materializing | done
    bytes_done: int
    bytes_total: int
    bytes_per_second: float
    eta_seconds: float | None
    layers_done: int = 0
    layers_total: int = 0

    @property
    def fraction(self) -> float:
        return 1.0 if self.bytes_total <= 0 else min(1.0, self.bytes_done / self.bytes_total)

    @property
    def percent(self) -> str:
        return f"{int(self.fraction * 100)}%"


ProgressCallback = Callable[[PullProgress], None]


class Tracker:
    """Accumulates bytes (downloaded or already cached) and emits throttled events."""

    def __init__(
        self,
        callback: ProgressCallback | None,
        reference: str,
        *,
        min_interval: float = 0.1,
        window: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.callback = callback
        self.reference = reference
        self.digest = ""
        self.phase = "resolving"
        self.done = 0
        self.total = 0
        self.layers_done = 0
        self.layers_total = 0
        self.min_interval = min_interval
        self.window = window
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._last_emit = float("-inf")

    def start(self, digest: str, total: int, layers: int, phase: str = "downloading") -> None:
        self.digest, self.total, self.layers_total = digest, total, layers
        self.set_phase(phase)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.emit(force=True)

    def add(self, n: int) -> None:
        self.done += n
        self.emit()

    def layer_done(self) -> None:
        self.layers_done += 1
        self.emit()

    def rate(self) -> float:
        now = self.clock()
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        return (self.done - d0) / (now - t0) if now > t0 else 0.0

    def event(self) -> PullProgress:
        rate = self.rate()
        remaining = max(0, self.total - self.done)
        eta = (remaining / rate) if rate > 0 else (0.0 if remaining == 0 and self.total else None)
        return PullProgress(
            self.reference,
            self.digest,
            self.phase,
            self.done,
            self.total,
            rate,
            eta,
            self.layers_done,
            self.layers_total,
        )

    def emit(self, force: bool = False) -> None:
        now = self.clock()
        if self.callback is None:
            self.rate()
            return
        if not force and now - self._last_emit < self.min_interval:
            self.rate()
            return
        self._last_emit = now
        self.callback(self.event())


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ConsolePrinter:
    """The CLI's view: a redrawn bar on a terminal, a line every ``every`` seconds otherwise."""

    def __init__(self, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._last = float("-inf")
        self._phase = ""

    def __call__(self, p: PullProgress) -> None:
        eta = f"{p.eta_seconds:.0f}s" if p.eta_seconds is not None else "?"
        text = (
            f"{p.phase:<13} {human_bytes(p.bytes_done)}/{human_bytes(p.bytes_total)} "
            f"{human_bytes(p.bytes_per_second)}/s eta {eta}"
        )
        if self.tty:
            width = 30
            filled = int(p.fraction * width)
            bar = "#" * filled + "-" * (width - filled)
            end = "\n" if p.phase == "done" else ""
            self.stream.write(f"\r[{bar}] {p.percent:>4} {text}\x1b[K{end}")
            self.stream.flush()
            return
        now = time.monotonic()
        if p.phase != self._phase or now - self._last >= self.every:
            self._last, self._phase = now, p.phase
            self.stream.write(f"{p.percent:>4} {text}\n")
            self.stream.flush()
