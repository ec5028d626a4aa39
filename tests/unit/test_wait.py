"""wait_for / async_wait_for on a fake clock: what they return, when they call, how they fail."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.wait import async_wait_for, wait_for


class FakeClock:
    """A clock that only moves when slept on; it records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


def script(*outcomes: object) -> Callable[[], object]:
    """A predicate that gives ``outcomes`` in order (raising the exceptions among them), then the last."""
    it: Iterator[object] = iter(outcomes)
    last: list[object] = [None]

    def predicate() -> object:
        last[0] = next(it, last[0])
        if isinstance(last[0], BaseException):
            raise last[0]
        return last[0]

    return predicate


@pytest.mark.parametrize(
    ("outcomes", "expected", "sleeps"),
    [
        ((["ready"]), ["ready"], []),
        ((None, 0, "", {"a": 1}), {"a": 1}, [0.5, 0.5, 0.5]),
        ((False, OSError("refused"), True), True, [0.5, 0.5]),
        ((subprocess.CalledProcessError(1, "kubectl"), 7), 7, [0.5]),
    ],
    ids=["at-once", "falsy-then-value", "exception-is-not-yet", "called-process-error"],
)
def test_returns_the_first_truthy_value(outcomes: object, expected: object, sleeps: list[float]) -> None:
    clock = FakeClock()
    seq = outcomes if isinstance(outcomes, tuple) else (outcomes,)
    got = wait_for(script(*seq), timeout=10, interval=0.5, message="x", clock=clock, sleep=clock.sleep)
    assert got == expected
    assert clock.sleeps == sleeps


def test_times_out_with_the_message_and_the_last_value() -> None:
    clock = FakeClock()
    with pytest.raises(AssertionError) as err:
        wait_for(
            script(None, [], {}),
            timeout=1.0,
            interval=0.3,
            message="md Ready",
            clock=clock,
            sleep=clock.sleep,
        )
    assert str(err.value) == "md Ready (not true after 1 s; last value: {})"
    # 0.3 three times, then the rest up to the deadline, then one last call at the deadline.
    assert clock.sleeps == pytest.approx([0.3, 0.3, 0.3, 0.1])
    assert clock.now == pytest.approx(1001.0)


def test_times_out_naming_the_last_exception() -> None:
    clock = FakeClock()
    with pytest.raises(AssertionError, match=r"slice \(not true after 2 s; last exception: ConnectionError"):
        wait_for(
            script(ConnectionError("reset")),
            timeout=2,
            interval=1,
            message="slice",
            clock=clock,
            sleep=clock.sleep,
        )


def test_a_value_seen_exactly_at_the_deadline_counts() -> None:
    clock = FakeClock()
    got = wait_for(
        lambda: clock.now >= 1002.0 and "late",
        timeout=2,
        interval=0.7,
        message="x",
        clock=clock,
        sleep=clock.sleep,
    )
    assert got == "late"
    assert clock.sleeps == pytest.approx([0.7, 0.7, 0.6])


def test_the_message_is_computed_only_on_failure() -> None:
    clock = FakeClock()
    calls: list[int] = []

    def describe() -> str:
        calls.append(1)
        return f"state at {clock.now:g}"

    assert wait_for(lambda: "ok", timeout=1, message=describe, clock=clock, sleep=clock.sleep) == "ok"
    assert calls == []
    with pytest.raises(AssertionError, match=r"^state at 1001 \(not true after 1 s; last value: None\)$"):
        wait_for(lambda: None, timeout=1, interval=0.5, message=describe, clock=clock, sleep=clock.sleep)
    assert calls == [1]


def test_an_assertion_in_the_predicate_ends_the_wait_at_once() -> None:
    """A probe that asserts (a process it needs has died) fails the test now, not at the deadline."""
    clock = FakeClock()
    with pytest.raises(AssertionError, match="agent exited"):
        wait_for(
            script(None, AssertionError("agent exited")),
            timeout=60,
            message="x",
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.sleeps == [0.1]


def test_zero_timeout_calls_once() -> None:
    clock = FakeClock()
    calls: list[int] = []
    with pytest.raises(AssertionError):
        wait_for(lambda: calls.append(1), timeout=0, message="x", clock=clock, sleep=clock.sleep)
    assert calls == [1]
    assert clock.sleeps == []


async def test_async_twin_awaits_coroutine_predicates() -> None:
    clock = FakeClock()
    values = iter([None, None, "up"])

    async def probe() -> str | None:
        return next(values)

    got = await async_wait_for(
        probe, timeout=5, interval=0.25, message="x", clock=clock, sleep=clock.async_sleep
    )
    assert got == "up"
    assert clock.sleeps == [0.25, 0.25]


async def test_async_twin_takes_plain_predicates_and_fails_alike() -> None:
    clock = FakeClock()
    got = await async_wait_for(
        script(OSError("x"), 3), timeout=1, message="x", clock=clock, sleep=clock.async_sleep
    )
    assert got == 3
    with pytest.raises(AssertionError) as err:
        await async_wait_for(
            script(KeyError("k")), timeout=0.5, interval=0.2, message=lambda: "lazy", clock=clock,
            sleep=clock.async_sleep,
        )  # fmt: skip
    assert str(err.value) == "lazy (not true after 0.5 s; last exception: KeyError('k'))"
    with pytest.raises(AssertionError, match=r"^dead$"):
        await async_wait_for(
            script(AssertionError("dead")), timeout=9, message="x", clock=clock, sleep=clock.async_sleep
        )


def test_real_clock_defaults_wait_on_a_real_fact() -> None:
    """With the real clock and sleep: a fact that becomes true after a few calls is seen promptly."""
    calls: list[int] = []

    def third_call() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert wait_for(third_call, timeout=5, interval=0.01, message="third call") is True
    assert len(calls) == 3
