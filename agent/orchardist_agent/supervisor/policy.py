"""Pure restart policy details: when a backoff starts over, and how a crash is told in a condition.

The delay itself is the project's one policy, :data:`orchardist.retry.ENGINE_RESTART` (capped
doubling with jitter, so engines that crashed together do not restart in lockstep).
"""

from __future__ import annotations


def failures_after_uptime(failures: int, up_seconds: float, *, stable_after: float) -> int:
    """An engine that stayed up long enough starts its backoff over (a crash a day is not a loop)."""
    return 0 if up_seconds > stable_after else failures


def tail_message(lines: list[str], *, limit: int = 4000) -> str:
    """The last log lines as a condition message, trimmed from the front to `limit` characters."""
    text = "\n".join(line.rstrip() for line in lines)
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]
