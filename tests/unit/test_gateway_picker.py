"""The picker as tables: prefix stickiness, bounded loads, bandwidth weights, least outstanding."""

from __future__ import annotations

from collections import Counter

import pytest

from orchardist.gateway.picker import Candidate, capacity, least_loaded, pick, prefix_of


def cands(*spec: tuple[str, float, int]) -> list[Candidate]:
    return [Candidate(i, w, o) for i, w, o in spec]


def test_same_prefix_same_replica_whatever_the_order() -> None:
    a = cands(("r1", 1, 0), ("r2", 1, 0), ("r3", 1, 0), ("r4", 1, 0))
    first = pick(a, "system: you are terse\nuser: hello")
    assert first is not None
    for order in (a[::-1], a[1:] + a[:1]):
        again = pick(order, "system: you are terse\nuser: hello")
        assert again is not None and again.id == first.id


def test_prefixes_spread_over_replicas() -> None:
    a = cands(("r1", 1, 0), ("r2", 1, 0), ("r3", 1, 0), ("r4", 1, 0))
    hits = Counter(pick(a, f"conversation {i}").id for i in range(400))  # type: ignore[union-attr]
    assert set(hits) == {"r1", "r2", "r3", "r4"}
    assert min(hits.values()) > 400 / 4 / 2, hits  # no replica starved


def test_weights_follow_bandwidth() -> None:
    a = cands(("slow", 100, 0), ("fast", 400, 0))
    hits = Counter(pick(a, f"p{i}").id for i in range(1000))  # type: ignore[union-attr]
    assert hits["fast"] > 2.5 * hits["slow"], hits


def test_removing_a_replica_moves_only_its_prefixes() -> None:
    full = cands(("r1", 1, 0), ("r2", 1, 0), ("r3", 1, 0))
    before = {i: pick(full, f"p{i}").id for i in range(300)}  # type: ignore[union-attr]
    after = {i: pick(full[:2], f"p{i}").id for i in range(300)}  # type: ignore[union-attr]
    moved = [i for i in before if before[i] != after[i]]
    assert moved and all(before[i] == "r3" for i in moved)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # candidate, all -> capacity: ceil(1.25 * (outstanding total + 1) * share)
        ((("a", 1, 0), ("b", 1, 0)), 1),  # ceil(1.25 * 1 * 0.5) = 1
        ((("a", 1, 3), ("b", 1, 3)), 5),  # ceil(1.25 * 7 * 0.5) = 5
        ((("a", 3, 3), ("b", 1, 3)), 7),  # ceil(1.25 * 7 * 0.75) = 7
    ],
)
def test_capacity(spec: tuple[tuple[str, float, int], ...], expected: int) -> None:
    c = cands(*spec)
    assert capacity(c[0], c) == expected


def test_an_overloaded_owner_spills_to_the_next() -> None:
    idle = cands(("r1", 1, 0), ("r2", 1, 0), ("r3", 1, 0))
    owner = pick(idle, "hot prefix")
    assert owner is not None
    busy = [Candidate(c.id, c.weight, 6 if c.id == owner.id else 0) for c in idle]
    spilled = pick(busy, "hot prefix")
    assert spilled is not None and spilled.id != owner.id
    # A little load on the owner keeps the prefix where its cache is.
    warm = [Candidate(c.id, c.weight, 2 if c.id == owner.id else 1) for c in idle]
    kept = pick(warm, "hot prefix")
    assert kept is not None and kept.id == owner.id


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ((("a", 1, 2), ("b", 1, 0), ("c", 1, 1)), "b"),
        ((("a", 1, 1), ("b", 3, 2)), "b"),  # 2/1 vs 3/3: per unit of weight
        ((("a", 1, 0), ("b", 2, 0)), "b"),  # a tie in load goes to the faster Mac
        ((("b", 1, 0), ("a", 1, 0)), "a"),  # then by id
    ],
)
def test_least_loaded(spec: tuple[tuple[str, float, int], ...], expected: str) -> None:
    assert least_loaded(cands(*spec)).id == expected
    picked = pick(cands(*spec), None)
    assert picked is not None and picked.id == expected


def test_exclude_and_empty() -> None:
    a = cands(("r1", 1, 0), ("r2", 1, 0))
    first = pick(a, "x")
    assert first is not None
    other = pick(a, "x", exclude={first.id})
    assert other is not None and other.id != first.id
    assert pick(a, "x", exclude={"r1", "r2"}) is None
    assert pick([], "x") is None
    assert pick(cands(("r0", 0, 0)), "x") is None  # a zero weight takes nothing


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]},
            "system:S\nuser:Q1",
        ),
        (  # later turns hash the same as the first
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"},
                ]
            },
            "system:S\nuser:Q1",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "user:hi"),
        ({"prompt": "once upon"}, "once upon"),
        ({"prompt": ["first", "second"]}, "first"),
        ({"input": "embed me"}, None),
        ("not a dict", None),
        ({"prompt": "x" * 1000}, "x" * 256),
    ],
)
def test_prefix_of(body: object, expected: str | None) -> None:
    assert prefix_of(body) == expected
