"""Pure restart policy details: how service forgives earlier crashes, and how a crash is told.

The delay itself is the project's one policy, :data:`orchardist.retry.ENGINE_RESTART` (capped
doubling with jitter, so engines that crashed together do not restart in lockstep).
"""

from __future__ import annotations


def forgiven(failures: int, served_seconds: float, *, decay: float) -> int:
    """The failures still counted after ``served_seconds`` of Ready: each full ``decay`` forgives one.

    The delay doubles per counted failure, so forgiving one per interval halves it per interval of
    service: three crashes and then five minutes serving (decay 60 s) leave none, and the next crash
    waits the base delay, while an engine that crashes again within a minute keeps backing off.
    """
    if decay <= 0 or served_seconds <= 0:
        return failures
    return max(0, failures - int(served_seconds // decay))


def tail_message(lines: list[str], *, limit: int = 4000) -> str:
    """The last log lines as a condition message, trimmed from the front to `limit` characters."""
    text = "\n".join(line.rstrip() for line in lines)
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def one_line(text: str, limit: int = 512) -> str:
    """The first line of `text`, for a condition or status.message (a log tail stays in lastError)."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def backoff_message(error: str, restarts: int, retry_in: float | None, retry_at: str | None) -> str:
    """What a crash-looping replica says in one line: the exit, the wait, the restarts so far."""
    out = one_line(error) or "engine exited"
    if retry_in is not None:
        out += f"; restarting in {retry_in:.0f} s" + (f" (at {retry_at})" if retry_at else "")
    return f"{out}; {restarts} restart{'' if restarts == 1 else 's'}"
