"""Whether this operator is the active one of its peering, and since when.

kopf pauses an operator in favour of a peer of higher priority and resumes it when that peer's
record expires, but offers no hook for either: it only logs them. This tracker reads those log
records (kopf's peering logger, the wording of the locked kopf version; the takeover e2e test fails
if it changes) and tells the parts that run beside kopf's handlers: the background loops stop while
paused, and a resumed operator knows its indexes were not watched for a while (a relist adds and
updates objects, never removes the ones deleted meanwhile).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from orchardist import log

LOG = log.get(__name__)
PEERING_LOGGER = "kopf._core.engines.peering"
_PAUSED = ("Pausing operations", "Pausing all operators")
_RESUMED = ("Resuming operations",)


class Activity(logging.Filter):
    """Active or paused, as kopf's peering last said; standalone operators are always active.

    With peering, kopf starts paused and resumes once no peer outranks it (it logs both).
    ``on_change`` callbacks run in the event loop's thread (kopf logs from its coroutines).
    """

    def __init__(self, peering: bool, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.active = not peering
        self.clock = clock
        self.since = clock()
        self.resumes = 0  # times it became active after a pause (its start counts as one)
        self.on_change: list[Callable[[bool], None]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_PAUSED):
            self._set(False)
        elif message.startswith(_RESUMED):
            self._set(True)
        return True  # observed, never dropped

    def active_for(self) -> float:
        """Seconds since it became active (0 while paused)."""
        return self.clock() - self.since if self.active else 0.0

    def _set(self, active: bool) -> None:
        if active == self.active:
            return
        self.active, self.since = active, self.clock()
        self.resumes += active
        LOG.info("peering: active" if active else "peering: standing by")
        for callback in list(self.on_change):
            callback(active)

    def install(self) -> None:
        logger = logging.getLogger(PEERING_LOGGER)
        if logger.getEffectiveLevel() > logging.INFO:  # a record dropped by level never reaches a filter
            logger.setLevel(logging.INFO)
        logger.addFilter(self)

    def uninstall(self) -> None:
        logging.getLogger(PEERING_LOGGER).removeFilter(self)


__all__ = ["PEERING_LOGGER", "Activity"]
