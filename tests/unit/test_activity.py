"""Whether the operator is its peering's active one, read from what kopf's peering logs."""

from __future__ import annotations

import logging

import pytest

from orchardist.controller.activity import PEERING_LOGGER, Activity

PAUSE = "Pausing operations in favour of [<Peer host/1/2: priority=2>]."
ALL = "Pausing all operators, including self: [...]"
RESUME = "Resuming operations after the pause. Conflicting operators with the same priority are gone."

# (case, peering, messages in order, active at the end, resumes, changes seen by a listener)
TABLE = [
    ("standalone: always active", False, [], True, 0, []),
    ("peering starts paused", True, [], False, 0, []),
    ("kopf resumes it at start", True, [RESUME], True, 1, [True]),
    ("a higher peer appears", True, [RESUME, PAUSE], False, 1, [True, False]),
    ("takeover: back from a pause", True, [RESUME, PAUSE, RESUME], True, 2, [True, False, True]),
    ("same priority pauses all", True, [RESUME, ALL], False, 1, [True, False]),
    ("repeats change nothing", True, [RESUME, RESUME, "Keep-alive", RESUME], True, 1, [True]),
    ("a standby from the start", True, [PAUSE, RESUME], True, 1, [True]),
]


@pytest.mark.parametrize(
    ("case", "peering", "messages", "active", "resumes", "changes"), TABLE, ids=[t[0] for t in TABLE]
)
def test_activity_follows_kopfs_peering(
    case: str, peering: bool, messages: list[str], active: bool, resumes: int, changes: list[bool]
) -> None:
    """Each pause or resume kopf logs flips the state once; other records leave it."""
    clock = iter(range(100))
    a = Activity(peering, clock=lambda: float(next(clock)))
    seen: list[bool] = []
    a.on_change.append(seen.append)
    logger = logging.getLogger(PEERING_LOGGER)
    a.install()
    try:
        for m in messages:
            logger.info(m)
    finally:
        a.uninstall()
    assert (a.active, a.resumes, seen) == (active, resumes, changes)


def test_active_for_counts_from_the_last_resume() -> None:
    """The time since it became active; 0 while standing by."""
    now = [10.0]
    a = Activity(True, clock=lambda: now[0])
    assert a.active_for() == 0.0
    a.filter(logging.LogRecord(PEERING_LOGGER, logging.INFO, "", 0, RESUME, None, None))
    now[0] = 25.0
    assert a.active_for() == 15.0
