"""Pure restart policy: how long to wait before the next start after consecutive failures."""

from __future__ import annotations


def backoff_delay(failures: int, *, base: float, cap: float) -> float:
    """0 failures -> 0; then base, 2*base, 4*base ... capped (10 s doubling up to 5 min by default)."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 32)))


def failures_after_uptime(failures: int, up_seconds: float, *, stable_after: float) -> int:
    """An engine that stayed up long enough starts its backoff over (a crash a day is not a loop)."""
    return 0 if up_seconds > stable_after else failures


def tail_message(lines: list[str], *, limit: int = 4000) -> str:
    """The last log lines as a condition message, trimmed from the front to `limit` characters."""
    text = "\n".join(line.rstrip() for line in lines)
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]
