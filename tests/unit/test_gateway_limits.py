"""Token buckets per key as tables: refill, admission, Retry-After, token debt."""

from __future__ import annotations

import pytest

from orchardist.gateway.limits import Bucket, Limiter, admit, charge, refill, share, wait_for


@pytest.mark.parametrize(
    ("bucket", "per_minute", "now", "level"),
    [
        (None, 60, 5.0, 60),  # new: full
        (Bucket(0, 0.0), 60, 10.0, 10),  # one per second
        (Bucket(50, 0.0), 60, 60.0, 60),  # never above a minute's allowance
        (Bucket(-30, 0.0), 60, 10.0, -20),  # a debt is paid back at the same rate
    ],
)
def test_refill(bucket: Bucket | None, per_minute: float, now: float, level: float) -> None:
    assert refill(bucket, per_minute, now).level == pytest.approx(level)


@pytest.mark.parametrize(
    ("level", "per_minute", "need", "seconds"),
    [(5, 60, 1, 0), (0, 60, 1, 1), (0, 2, 1, 30), (-59, 60, 1, 60)],
)
def test_wait_for(level: float, per_minute: float, need: float, seconds: float) -> None:
    assert wait_for(Bucket(level, 0), per_minute, need) == pytest.approx(seconds)


def test_requests_per_minute_admits_then_refuses_with_retry_after() -> None:
    limiter = Limiter()
    assert [limiter.admit("k", 2, None, 0.0) for _ in range(3)] == [None, None, 30]
    assert limiter.admit("k", 2, None, 29.0) == 1  # ceil of the 1 s still missing
    assert limiter.admit("k", 2, None, 30.0) is None
    assert limiter.admit("other", 2, None, 0.0) is None  # buckets are per key


def test_a_refused_request_is_not_charged() -> None:
    d = admit(Bucket(0.5, 0.0), None, requests_per_minute=60, tokens_per_minute=None, now=0.0)
    assert d.retry_after == 1 and d.requests == Bucket(0.5, 0.0)


def test_tokens_per_minute_admits_until_in_debt() -> None:
    limiter = Limiter()
    assert limiter.admit("k", None, 100, 0.0) is None
    limiter.charge("k", 100, 250, 0.0)  # one large answer: 150 tokens in debt
    assert limiter.admit("k", None, 100, 0.0) == 91  # (1 - -150) * 60 / 100 = 90.6
    assert limiter.admit("k", None, 100, 91.0) is None


def test_no_limits_admit_everything() -> None:
    limiter = Limiter()
    assert all(limiter.admit("k", None, None, 0.0) is None for _ in range(1000))
    assert charge(None, None, 10, 0.0) is None


@pytest.mark.parametrize(
    ("limit", "instances", "each"),
    [
        (None, 3, None),  # unlimited stays unlimited
        (60, 1, 60),
        (60, 2, 30),
        (60, 7, 9),  # ceil(8.57): the key may get up to 63 in total, never less than 60
        (2, 3, 1),  # every instance admits at least one
        (1, 4, 1),
        (1000, 0, 1000),  # a count below one is one instance
    ],
)
def test_share(limit: float | None, instances: int, each: float | None) -> None:
    """Each of N instances enforces ceil(limit / N) of a key's per-minute limit."""
    assert share(limit, instances) == each


def test_a_limiter_of_one_instance_among_three_enforces_its_share() -> None:
    limiter = Limiter(instances=3)
    assert [limiter.admit("k", 6, None, 0.0) for _ in range(3)] == [None, None, 30]  # 2 a minute here
    assert limiter.admit("t", None, 300, 0.0) is None
    limiter.charge("t", 300, 150, 0.0)  # 100 a minute here: 50 in debt
    assert limiter.admit("t", None, 300, 0.0) == 31  # (1 - -50) * 60 / 100 = 30.6
