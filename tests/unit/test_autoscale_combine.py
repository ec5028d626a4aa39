"""Several gateways' demand Leases as tables: each judged on its own, summed, then decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from orchardist.api.modeldeployment import Autoscaling, Scaling
from orchardist.controller.autoscale import Demand, combine, decide, expired
from tests.unit.test_autoscale import NOW, ago, before, scaling


def lease(in_flight: int = 0, held: int = 0, last: float | None = 1) -> Demand:
    """One gateway's Lease: counts and the last request ``last`` seconds ago (None: never renewed)."""
    return Demand(in_flight, held, None if last is None else ago(last))


@dataclass(frozen=True)
class Sum:
    why: str
    leases: list[Demand]
    expected: Demand
    scaling: Scaling = field(default_factory=scaling)


SUMS = [
    Sum("no Lease: no demand", [], Demand()),
    Sum("one Lease is itself", [lease(3, 2)], lease(3, 2)),
    Sum("two live instances add up", [lease(3, 2, 5), lease(4, 1, 1)], Demand(7, 3, ago(1))),
    Sum(
        "the latest request is the deployment's, whichever Lease has it",
        [lease(0, 0, 1), lease(0, 0, 90)],
        Demand(0, 0, ago(1)),
    ),
    Sum(
        "a dead instance's held past the hold timeout is not added to a live one's",
        [lease(5, 5, 400), lease(2, 0, 1)],
        Demand(7, 0, ago(1)),  # its in flight still counts (fresh for an hour), its held not
    ),
    Sum(
        "a dead instance's in flight past an hour is not added, even beside a live request",
        [lease(9, 0, 3700), lease(1, 1, 1)],
        Demand(1, 1, ago(1)),
    ),
    Sum(
        "old-form Lease alongside instance Leases: all summed",
        [lease(2, 2, 3), lease(1, 0, 2), lease(0, 0, 50)],
        Demand(3, 2, ago(2)),
    ),
    Sum("a never-renewed Lease counts as written", [lease(1, 3, None)], Demand(3, 3, None)),
    Sum("held counts in flight, as the gateway counts it", [lease(0, 4)], Demand(4, 4, ago(1))),
]


@pytest.mark.parametrize("row", SUMS, ids=[r.why for r in SUMS])
def test_combine(row: Sum) -> None:
    assert combine(row.leases, row.scaling, NOW) == row.expected


@dataclass(frozen=True)
class Row:
    why: str
    previous: Autoscaling | None
    leases: list[Demand] | None  # None: the watch has not listed yet
    ready: int
    desired: int
    reason: str
    held: int | None = None  # status.autoscaling.held, when the row checks it


ROWS = [
    Row(
        "two instances each holding from zero: exactly one start",
        before(0),
        [lease(16, 16), lease(16, 16)],
        0,
        1,
        "ScaleFromZero",
        32,
    ),
    Row(
        "both holding while the one replica starts: still one",
        before(1, 5),
        [lease(16, 16), lease(16, 16)],
        0,
        1,
        "Steady",
    ),
    Row(
        "one dead with stale counts + one live idle: no start from zero",
        before(0, 900),
        [lease(6, 6, 3700), lease(0, 0, 400)],  # judged by the live one's request, 6 would count
        0,
        0,
        "Steady",
        0,
    ),
    Row(
        "one dead with stale in flight + one live: the live load alone decides",
        before(3),
        [lease(40, 0, 3700), lease(4, 0, 1)],
        3,
        1,
        "ScaleDown",
    ),
    Row(
        "both idle past the idle timeout: zero",
        before(1, 600),
        [lease(0, 0, 320), lease(0, 0, 301)],
        1,
        0,
        "Idle",
    ),
    Row(
        "one idle, one just asked: not idle",
        before(1, 600),
        [lease(0, 0, 320), lease(1, 0, 1)],
        1,
        1,
        "Steady",
    ),
    Row(
        "old-form Lease alongside new ones: summed into the count",
        before(1),
        [lease(4, 0, 2), lease(4, 0, 1), lease(4, 0, 1)],
        1,
        3,
        "ScaleUp",
    ),
    Row("not listed yet: nothing changes", before(2), None, 2, 2, "Steady"),
    Row("listed, no Lease at all: nothing in flight", before(0), [], 0, 0, "Steady", 0),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.why for r in ROWS])
def test_decide_over_instances(row: Row) -> None:
    """Each row: the Leases of every instance -> combine -> decide -> the count, why, the held sum."""
    s = scaling(scaleDownStabilizationSeconds=0)
    demand = None if row.leases is None else combine(row.leases, s, NOW)
    got = decide(s, 1, row.previous, demand, row.ready, NOW)
    assert (got.desired, got.reason) == (row.desired, row.reason), got.message
    if row.held is not None:
        assert got.status()["held"] == row.held


def test_two_instances_holding_for_a_while_start_one() -> None:
    """Reconcile after reconcile, both instances' Leases renewed with held requests: 0 -> 1 once."""
    s = scaling(maxReplicas=8)
    previous = before(0)
    counts = []
    for second in range(10):
        now = NOW + timedelta(seconds=second)
        both = [Demand(8, 8, now), Demand(24, 24, now - timedelta(seconds=1))]
        got = decide(s, 0, previous, combine(both, s, now), 0, now)
        counts.append(got.desired)
        previous = Autoscaling.model_validate(got.status())
    assert counts == [1] * 10
    assert (previous.in_flight, previous.held) == (32, 32)


@pytest.mark.parametrize(
    ("demand", "idle_s", "gone"),
    [
        (lease(0, 0, 599), 300, False),  # younger than the 10-minute floor
        (lease(0, 0, 601), 300, True),
        (lease(0, 0, 601), 400, False),  # 2x the idle timeout: 800s
        (lease(0, 0, 801), 400, True),
        (lease(3, 0, 900), 300, False),  # in flight is live for an hour: it may still matter
        (lease(3, 0, 3700), 300, True),  # a dead gateway's count, long stale
        (lease(0, 2, 900), 300, True),  # held past the hold timeout is no load
        (lease(0, 0, None), 300, False),  # never renewed: its age is unknown, kept
    ],
)
def test_expired(demand: Demand, idle_s: int, gone: bool) -> None:
    """A Lease goes once it carries no live load and its last request is older than max(600s, 2x idle)."""
    assert expired(demand, scaling(idleTimeoutSeconds=idle_s), NOW) is gone


def test_expired_without_scaling_uses_the_defaults() -> None:
    assert (expired(lease(last=1199), None, NOW), expired(lease(last=1201), None, NOW)) == (False, True)
