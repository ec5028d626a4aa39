"""The store's eviction policy as a table: facts in, what to delete out."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from orchardist.oci.gc import Candidate, Eviction, plan_eviction


def model(*blobs: str, used: float, extracted: int = 0) -> Candidate:
    return Candidate(blobs=blobs, extracted_bytes=extracted, last_used=used)


@dataclass(frozen=True)
class Case:
    models: dict[str, Candidate]
    blobs: dict[str, int]
    budget: int
    want: Eviction
    need: int = 0
    pinned: frozenset[str] = frozenset()
    active: frozenset[str] = frozenset()
    partials: dict[str, tuple[str, int]] = field(default_factory=dict)
    unpacking: int = 0


THREE = {"old": model("c1", "w1", used=1), "mid": model("c2", "w2", used=2), "new": model("c3", "w3", used=3)}
THREE_BLOBS = {"c1": 1, "w1": 9, "c2": 1, "w2": 9, "c3": 1, "w3": 9}

CASES = {
    "under budget: nothing to do": Case(
        THREE, THREE_BLOBS, budget=30, want=Eviction((), (), (), used_bytes=30, fits=True)
    ),
    "an unreferenced blob goes even under budget": Case(
        {"a": model("c1", used=1)},
        {"c1": 1, "orphan": 5},
        budget=100,
        want=Eviction((), ("orphan",), (), used_bytes=1, fits=True),
    ),
    "least recently used goes first, and only as many as needed": Case(
        THREE, THREE_BLOBS, budget=25, want=Eviction(("old",), ("c1", "w1"), (), used_bytes=20, fits=True)
    ),
    "need_bytes makes room for a pull": Case(
        THREE,
        THREE_BLOBS,
        budget=30,
        need=15,
        want=Eviction(("old", "mid"), ("c1", "c2", "w1", "w2"), (), used_bytes=10, fits=True),
    ),
    "a pinned model is skipped, the next oldest goes": Case(
        THREE,
        THREE_BLOBS,
        budget=25,
        pinned=frozenset({"old"}),
        want=Eviction(("mid",), ("c2", "w2"), (), used_bytes=20, fits=True),
    ),
    "everything pinned: nothing evicted, and it says it does not fit": Case(
        THREE,
        THREE_BLOBS,
        budget=5,
        pinned=frozenset(THREE),
        want=Eviction((), (), (), used_bytes=30, fits=False),
    ),
    "evicting a model frees only the blobs no kept model shares": Case(
        {"a": model("cfg-a", "shared", used=1), "b": model("cfg-b", "shared", used=2)},
        {"cfg-a": 1, "cfg-b": 1, "shared": 50},
        budget=51,
        want=Eviction(("a",), ("cfg-a",), (), used_bytes=51, fits=True),
    ),
    "a shared blob keeps usage high: both models go when budget demands": Case(
        {"a": model("cfg-a", "shared", used=1), "b": model("cfg-b", "shared", used=2)},
        {"cfg-a": 1, "cfg-b": 1, "shared": 50},
        budget=40,
        want=Eviction(("a", "b"), ("cfg-a", "cfg-b", "shared"), (), used_bytes=0, fits=True),
    ),
    "a blob of a pull in progress is never removed": Case(
        {"a": model("c1", "w1", used=1)},
        {"c1": 1, "w1": 9, "fresh": 20},
        budget=25,
        active=frozenset({"fresh"}),
        want=Eviction(("a",), ("c1", "w1"), (), used_bytes=20, fits=True),
    ),
    "extracted bytes count against the budget and leave with their model": Case(
        {"tar": model("c1", "t1", used=1, extracted=40), "raw": model("c2", "w2", used=2)},
        {"c1": 1, "t1": 10, "c2": 1, "w2": 10},
        budget=30,
        want=Eviction(("tar",), ("c1", "t1"), (), used_bytes=11, fits=True),
    ),
    "stale partials go; a partial a pull is resuming stays and counts": Case(
        {"a": model("c1", used=1)},
        {"c1": 1},
        budget=100,
        active=frozenset({"sha256:aa"}),
        partials={
            "aa.partial": ("sha256:aa", 30),
            "bb.partial": ("sha256:bb", 7),
            "cc.small": ("sha256:cc", 1),
        },
        want=Eviction((), (), ("bb.partial", "cc.small"), used_bytes=31, fits=True),
    ),
    "layers being unpacked by pulls in flight count, and make room like any use": Case(
        THREE,
        THREE_BLOBS,
        budget=45,
        unpacking=20,
        want=Eviction(("old",), ("c1", "w1"), (), used_bytes=40, fits=True),
    ),
    "same last use: the order is by digest, so the plan is deterministic": Case(
        {"b": model("cb", used=5), "a": model("ca", used=5)},
        {"ca": 10, "cb": 10},
        budget=15,
        want=Eviction(("a",), ("ca",), (), used_bytes=10, fits=True),
    ),
    "a pull bigger than the budget: every unpinned model goes and it still does not fit": Case(
        THREE,
        THREE_BLOBS,
        budget=30,
        need=40,
        pinned=frozenset({"new"}),
        want=Eviction(("old", "mid"), ("c1", "c2", "w1", "w2"), (), used_bytes=10, fits=False),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_eviction(name: str) -> None:
    case = CASES[name]
    got = plan_eviction(
        case.models,
        case.blobs,
        pinned=case.pinned,
        active=case.active,
        partials=case.partials,
        budget_bytes=case.budget,
        need_bytes=case.need,
        unpacking_bytes=case.unpacking,
    )
    assert got == case.want


def test_nothing_to_delete_is_an_empty_plan() -> None:
    """``empty`` lets the store skip the disk pass when the plan deletes nothing."""
    keep = plan_eviction(
        {"a": model("c", used=1)}, {"c": 1}, pinned=(), active=(), partials={}, budget_bytes=9
    )
    drop = plan_eviction({}, {"c": 1}, pinned=(), active=(), partials={}, budget_bytes=9)
    assert keep.empty and not drop.empty
