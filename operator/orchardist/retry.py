"""The project's one backoff policy: capped exponential delays with jitter.

Every retry (registry requests, pulls, watches, registration, engine restarts) waits by this
policy so that a fleet of Macs that lost the API server or a registry at the same moment does not
come back in lockstep. Retried *calls* use tenacity's machinery with this wait; loops that are
not shaped as a retried call (an engine restart, a watch relist) ask :func:`delay` directly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity


@dataclass(frozen=True)
class Backoff:
    """``base * 2**(failures-1)`` capped at ``cap``, then scaled down by up to ``jitter`` (0..1).

    ``jitter=0.5`` ("equal jitter") keeps at least half the nominal delay, so a crash loop still
    slows down; ``jitter=1.0`` is AWS's "full jitter" for many clients hitting one server.
    """

    base: float
    cap: float
    jitter: float = 0.5

    def nominal(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return float(min(self.cap, self.base * 2 ** min(failures - 1, 32)))

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait after ``failures`` consecutive failures (0 failures -> 0)."""
        nominal = self.nominal(failures)
        return nominal * (1.0 - self.jitter * rng())

    def wait(self) -> Callable[[tenacity.RetryCallState], float]:
        """This policy as a tenacity ``wait=`` (attempt 1 failed -> delay(1))."""

        def _wait(state: tenacity.RetryCallState) -> float:
            return self.delay(state.attempt_number)

        return _wait


#: Calls to the API server and registries: quick first retry, never more than 30 s apart.
NETWORK = Backoff(base=0.2, cap=30.0, jitter=1.0)
#: Re-listing a watch after an error.
WATCH = Backoff(base=0.5, cap=30.0, jitter=1.0)
#: Engine restarts after a crash (10 s doubling up to 5 min, as kubelet's CrashLoopBackOff).
ENGINE_RESTART = Backoff(base=10.0, cap=300.0, jitter=0.5)


def delay(failures: int, policy: Backoff = NETWORK, rng: Callable[[], float] = random.random) -> float:
    return policy.delay(failures, rng)


def retrying(
    *,
    policy: Backoff = NETWORK,
    attempts: int,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None,
) -> tenacity.AsyncRetrying:
    """An ``async for attempt in retrying(...): with attempt: ...`` loop; re-raises the last error."""
    return tenacity.AsyncRetrying(
        wait=policy.wait(),
        stop=tenacity.stop_after_attempt(attempts),
        retry=tenacity.retry_if_exception_type(retry_on),
        before_sleep=before_sleep,
        reraise=True,
    )
