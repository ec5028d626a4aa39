"""Placement tables for the pure scheduler: filters, scores, and the Unschedulable message."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchardist.controller.scheduler import (
    GIB,
    Fit,
    Fleet,
    Mac,
    Misfit,
    Request,
    Taint,
    Toleration,
    filter_reason,
)


def fixed(size_gib: float, what: str = "weights") -> object:
    """A fit function for a replica that always takes ``size_gib`` of the working set."""
    need = int(size_gib * GIB)

    def fit(mac: Mac, free: int) -> Fit | Misfit:
        if free >= need:
            return Fit({"reservedBytes": need}, need)
        return Misfit(need, free, f"{what} need {need / GIB:.1f} GiB")

    return fit


def mac(name: str, ws: float = 48, **kw: object) -> Mac:
    base = Mac(name=name, working_set_bytes=int(ws * GIB), engines={"vllm-metal": "0.2.0", "mlx-lm": "0.30"})
    return replace(base, **kw)  # type: ignore[arg-type]


def req(size: float = 4, **kw: object) -> Request:
    return replace(Request(engine="vllm-metal", fit=fixed(size), digest="sha256:aa"), **kw)  # type: ignore[arg-type]


def placed(fleet: Fleet, request: Request, n: int, existing: dict[str, int] | None = None) -> list[str]:
    return [b.node for b in fleet.place(request, n, existing).bindings]


FILTERS = [
    # (case, mac, request, expected reason or None)
    ("ready and plain", mac("a"), req(), None),
    ("lease expired", mac("a", ready=False), req(), "NotReady"),
    ("cordoned", mac("a", unschedulable=True), req(), "unschedulable"),
    (
        "NoSchedule taint",
        mac("a", taints=(Taint("gpu", "busy", "NoSchedule"),)),
        req(),
        "taint gpu not tolerated",
    ),
    ("NoExecute taint", mac("a", taints=(Taint("gpu", "", "NoExecute"),)), req(), "taint gpu not tolerated"),
    ("PreferNoSchedule only scores", mac("a", taints=(Taint("gpu", "", "PreferNoSchedule"),)), req(), None),
    (
        "tolerated by Equal",
        mac("a", taints=(Taint("team", "ml", "NoSchedule"),)),
        req(tolerations=(Toleration("team", "Equal", "ml"),)),
        None,
    ),
    (
        "Equal with another value",
        mac("a", taints=(Taint("team", "ml", "NoSchedule"),)),
        req(tolerations=(Toleration("team", "Equal", "web"),)),
        "taint team not tolerated",
    ),
    (
        "tolerated by Exists without key",
        mac("a", taints=(Taint("x", "y", "NoExecute"),)),
        req(tolerations=(Toleration("", "Exists"),)),
        None,
    ),
    (
        "toleration for another effect",
        mac("a", taints=(Taint("x", "", "NoSchedule"),)),
        req(tolerations=(Toleration("x", "Exists", effect="NoExecute"),)),
        "taint x not tolerated",
    ),
    ("nodeSelector matches", mac("a", labels={"room": "lab"}), req(node_selector={"room": "lab"}), None),
    (
        "nodeSelector differs",
        mac("a", labels={"room": "hall"}),
        req(node_selector={"room": "lab"}),
        "not matching nodeSelector",
    ),
    ("nodeSelector label missing", mac("a"), req(node_selector={"room": "lab"}), "not matching nodeSelector"),
    ("engine missing", mac("a", engines={"mlx-lm": "0.30"}), req(), "without engine vllm-metal"),
    ("engine version pinned and present", mac("a"), req(engine_version="0.2.0"), None),
    (
        "engine version pinned and different",
        mac("a"),
        req(engine_version="0.3.0"),
        "without vllm-metal 0.3.0",
    ),
]


@pytest.mark.parametrize(("case", "m", "r", "expected"), FILTERS, ids=[f[0] for f in FILTERS])
def test_filter(case: str, m: Mac, r: Request, expected: str | None) -> None:
    """Each filter excludes a Mac for one reason a person can read."""
    assert filter_reason(m, r) == expected


PLACEMENTS = [
    # (case, macs, request, count, existing, expected nodes in order)
    (
        "one replica goes to the emptiest Mac",
        [mac("a", reserved_bytes=30 * GIB), mac("b")],
        req(),
        1,
        {},
        ["b"],
    ),
    (
        "spread Preferred puts replicas on different Macs",
        [mac("a"), mac("b"), mac("c")],
        req(),
        3,
        {},
        ["a", "b", "c"],
    ),
    (
        "spread Preferred doubles up only when Macs run out",
        [mac("a"), mac("b")],
        req(),
        3,
        {},
        ["a", "b", "a"],
    ),
    ("spread counts the deployment's existing replicas", [mac("a"), mac("b")], req(), 1, {"a": 1}, ["b"]),
    ("spread Required never doubles up", [mac("a"), mac("b")], req(spread="Required"), 3, {}, ["a", "b"]),
    ("spread None packs on the best Mac", [mac("a", ws=96), mac("b")], req(spread="None"), 2, {}, ["a", "a"]),
    ("the cached Mac wins", [mac("a"), mac("b", cached=frozenset({"sha256:aa"}))], req(), 1, {}, ["b"]),
    (
        "the cache is ignored when preferCachedNodes is false",
        [mac("a", bandwidth=800), mac("b", cached=frozenset({"sha256:aa"}), bandwidth=100)],
        req(prefer_cached=False),
        1,
        {},
        ["a"],
    ),
    ("faster memory wins a tie", [mac("a", bandwidth=273), mac("b", bandwidth=819)], req(), 1, {}, ["b"]),
    (
        "PreferNoSchedule is avoided while others fit",
        [mac("a", taints=(Taint("slow", "", "PreferNoSchedule"),)), mac("b")],
        req(),
        1,
        {},
        ["b"],
    ),
    (
        "a Mac too full is skipped",
        [mac("a", ws=16, reserved_bytes=14 * GIB), mac("b", ws=8)],
        req(6),
        1,
        {},
        ["b"],
    ),
    (
        "NotReady and cordoned Macs are skipped",
        [mac("a", ready=False), mac("b", unschedulable=True), mac("c")],
        req(),
        1,
        {},
        ["c"],
    ),
    ("names break ties", [mac("b"), mac("a")], req(), 1, {}, ["a"]),
    ("memory runs out on the second replica", [mac("a", ws=10)], req(6, spread="None"), 2, {}, ["a"]),
]


@pytest.mark.parametrize(
    ("case", "macs", "r", "n", "existing", "expected"), PLACEMENTS, ids=[p[0] for p in PLACEMENTS]
)
def test_place(
    case: str, macs: list[Mac], r: Request, n: int, existing: dict[str, int], expected: list[str]
) -> None:
    """Replicas land where the filters allow and the score prefers."""
    assert placed(Fleet(macs), r, n, existing) == expected


def test_place_books_memory_across_calls() -> None:
    """What one deployment takes is not free for the next one."""
    fleet = Fleet([mac("a", ws=10)])
    assert placed(fleet, req(6), 1) == ["a"]
    assert placed(fleet, req(6), 1) == []
    assert fleet.free("a") == 4 * GIB


def test_unschedulable_names_the_closest_mac_and_the_shortfall() -> None:
    """Nothing fits: the message names the Mac closest to fitting and how many GiB it lacks."""
    macs = [
        mac("mini-1", ws=16, chip="M4", total_bytes=24 * GIB),
        mac("studio-1", ws=36, chip="M3 Ultra", total_bytes=192 * GIB),
        mac("gone", ready=False),
    ]
    result = Fleet(macs).place(req(41.2), 1)
    assert result.bindings == ()
    assert result.unschedulable is not None
    assert result.unschedulable.closest == "studio-1"
    assert result.unschedulable.message == (
        "no Mac fits: closest is studio-1 (M3 Ultra, 192 GiB): weights need 41.2 GiB, 36.0 GiB free of its "
        "working set; short 5.2 GiB (other Macs: 1 NotReady)"
    )
    assert round(result.unschedulable.short_bytes / GIB, 1) == 5.2


UNSCHEDULABLE = [
    ("no Macs at all", [], req(), "no Mac fits: no MacNodes are registered (is an agent running?)"),
    (
        "all NotReady",
        [mac("a", ready=False), mac("b", ready=False)],
        req(),
        "no Mac fits: 2 Macs, 2 NotReady",
    ),
    (
        "mixed reasons, most common first",
        [mac("a", ready=False), mac("b", engines={}), mac("c", engines={}), mac("d", unschedulable=True)],
        req(),
        "no Mac fits: 4 Macs, 2 without engine vllm-metal, 1 NotReady, 1 unschedulable",
    ),
]


@pytest.mark.parametrize(("case", "macs", "r", "message"), UNSCHEDULABLE, ids=[u[0] for u in UNSCHEDULABLE])
def test_unschedulable_without_memory_candidates(
    case: str, macs: list[Mac], r: Request, message: str
) -> None:
    """When no Mac passes the filters, the message counts the Macs per reason."""
    result = Fleet(macs).place(r, 1)
    assert result.unschedulable is not None
    assert result.unschedulable.message == message
    assert result.unschedulable.missing == 1


def test_partial_placement_reports_the_missing_count() -> None:
    """Two of three fit: two bindings and an explanation for the third."""
    result = Fleet([mac("a"), mac("b")]).place(req(spread="Required"), 3)
    assert [b.node for b in result.bindings] == ["a", "b"]
    assert result.unschedulable is not None and result.unschedulable.missing == 1
    assert "2 already running a replica (spread Required)" in result.unschedulable.message


def test_bindings_carry_the_plan() -> None:
    """The plan the scheduler trusted is the plan bound to the replica."""
    result = Fleet([mac("a")]).place(req(3), 1)
    assert result.bindings[0].fit == Fit({"reservedBytes": 3 * GIB}, 3 * GIB)
