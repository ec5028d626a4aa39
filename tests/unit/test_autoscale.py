"""The autoscaler's decision as a table: up fast, from zero at once, down after a window, idle to zero."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from orchardist.api.modeldeployment import (
    ANNOTATION_HELD,
    ANNOTATION_IN_FLIGHT,
    LABEL_DEMAND_FOR,
    Autoscaling,
    ModelDeployment,
    Scaling,
)
from orchardist.controller import plan as P  # noqa: N812 - short, reads like a namespace
from orchardist.controller.autoscale import Demand, decide, desired_replicas
from orchardist.controller.demand import DemandWatch, parse
from orchardist.kube import Api
from orchardist.kube.informer import RELIST
from tests.unit import test_reconcile as R  # noqa: N812 - the plan tables' world builders

NOW = datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def scaling(**kw: Any) -> Scaling:
    base = {
        "minReplicas": 0,
        "maxReplicas": 4,
        "targetInFlight": 4,
        "idleTimeoutSeconds": 300,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 60,
    }
    return Scaling.model_validate({**base, **kw})


def before(desired: int, scaled_s: float = 3600, recs: list[tuple[int, float]] | None = None) -> Autoscaling:
    """A previous decision: ``desired`` since ``scaled_s`` seconds ago, recommendations (count, age)."""
    history = recs if recs is not None else [(desired, scaled_s)]
    return Autoscaling.model_validate(
        {
            "desiredReplicas": desired,
            "reason": "Steady",
            "lastScaleTime": ago(scaled_s).isoformat(),
            "recommendations": [{"replicas": n, "time": ago(s).isoformat()} for n, s in history],
        }
    )


@dataclass(frozen=True)
class Row:
    why: str
    previous: Autoscaling | None
    demand: Demand | None
    ready: int
    desired: int
    reason: str
    scaling: Scaling = field(default_factory=scaling)
    start: int = 1


def busy(in_flight: int = 0, held: int = 0, last: float = 1) -> Demand:
    return Demand(in_flight=in_flight, held=held, last_request=ago(last))


ROWS = [
    Row("first decision starts with spec.replicas", None, busy(), 0, 1, "Starting"),
    Row("first decision clamps spec.replicas into the range", None, busy(), 0, 4, "Starting", start=9),
    Row(
        "first decision with replicas 0 and nothing held stays at zero",
        None,
        busy(last=3600),
        0,
        0,
        "Starting",
        start=0,
    ),
    Row("demand not known yet keeps the count", before(2), None, 2, 2, "Steady"),
    Row("demand not known yet keeps the starting count", None, None, 0, 1, "Starting"),
    Row("held requests at zero start exactly one", before(0), busy(held=32), 0, 1, "ScaleFromZero"),
    Row("one held request at zero starts one", before(0), busy(held=1), 0, 1, "ScaleFromZero"),
    Row("held requests while one starts add no second start", before(1, 5), busy(held=32), 0, 1, "Steady"),
    Row(
        "held from zero is at once despite an up window",
        before(0),
        busy(held=3),
        0,
        1,
        "ScaleFromZero",
        scaling(scaleUpStabilizationSeconds=120),
    ),
    Row("zero and no demand stays at zero", before(0), Demand(), 0, 0, "Steady"),
    Row("zero just after going idle stays at zero", before(0, 1), busy(last=400), 0, 0, "Steady"),
    Row("in flight above target scales up at once", before(1), busy(in_flight=12), 1, 3, "ScaleUp"),
    Row(
        "held requests are counted in flight, not twice",
        before(1),
        busy(in_flight=8, held=8),
        1,
        2,
        "ScaleUp",
    ),
    Row("scale-up stops at maxReplicas", before(1), busy(in_flight=100), 1, 4, "ScaleUp"),
    Row(
        "up window: the lowest recent recommendation wins",
        before(1, recs=[(1, 3600), (3, 30)]),
        busy(in_flight=12),
        1,
        1,
        "Stabilizing",
        scaling(scaleUpStabilizationSeconds=60),
    ),
    Row(
        "up window passed: scale up",
        before(1, recs=[(1, 3600), (3, 90)]),
        busy(in_flight=12),
        1,
        3,
        "ScaleUp",
        scaling(scaleUpStabilizationSeconds=60),
    ),
    Row(
        "load drops inside the down window: keep",
        before(3, recs=[(3, 30)]),
        busy(in_flight=4),
        3,
        3,
        "Stabilizing",
    ),
    Row(
        "load low for the whole down window: scale down",
        before(3, recs=[(3, 3600), (1, 90)]),
        busy(in_flight=4),
        3,
        1,
        "ScaleDown",
    ),
    Row(
        "down window: the highest recent recommendation wins",
        before(4, recs=[(4, 3600), (2, 90), (1, 10)]),
        busy(in_flight=1),
        4,
        2,
        "ScaleDown",
    ),
    Row("no request for the idle timeout goes to zero", before(1), busy(last=301), 1, 0, "Idle"),
    Row(
        "idle goes to zero at once, whatever the down window",
        before(2, recs=[(2, 10)]),
        busy(last=900),
        2,
        0,
        "Idle",
    ),
    Row("quiet but within the idle timeout keeps one", before(1), busy(last=200), 1, 1, "Steady"),
    Row("requests in flight are never idle", before(1), busy(in_flight=1, last=900), 1, 1, "Steady"),
    Row("a recent scale counts as activity", before(1, 10), Demand(), 0, 1, "Steady"),
    Row(
        "held counts older than the hold timeout are a dead gateway's",
        before(0),
        busy(held=5, last=400),
        0,
        0,
        "Steady",
    ),
    Row("held within the hold timeout start one", before(0), busy(held=5, last=250), 0, 1, "ScaleFromZero"),
    Row(
        "in flight left for hours by a dead gateway: idle",
        before(1),
        busy(in_flight=3, last=7200),
        1,
        0,
        "Idle",
    ),
    Row(
        "in flight for half an hour is a long stream: keep",
        before(1),
        busy(in_flight=1, last=1800),
        1,
        1,
        "Steady",
    ),
    Row(
        "idle with minReplicas 1 keeps one", before(1), busy(last=900), 1, 1, "Steady", scaling(minReplicas=1)
    ),
    Row("minReplicas raised lifts the count", before(0), Demand(), 0, 2, "Limits", scaling(minReplicas=2)),
    Row(
        "maxReplicas lowered lowers the count",
        before(4),
        busy(in_flight=16),
        4,
        2,
        "Limits",
        scaling(maxReplicas=2),
    ),
    Row(
        "starting replicas are waited for, not judged",
        before(3, 5),
        busy(in_flight=0, last=5),
        0,
        3,
        "Steady",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.why for r in ROWS])
def test_decide(row: Row) -> None:
    """Each row: what was decided before, the demand and ready replicas -> the count and the reason."""
    got = decide(row.scaling, row.start, row.previous, row.demand, row.ready, NOW)
    assert (got.desired, got.reason) == (row.desired, row.reason), got.message


def test_n_held_requests_cause_one_start() -> None:
    """Reconcile after reconcile with 32 held and nothing ready yet: the count goes 0 -> 1 once."""
    s = scaling(maxReplicas=8)
    previous = before(0)
    counts = []
    for second in range(20):
        now = NOW + timedelta(seconds=second)
        got = decide(s, 1, previous, Demand(held=32, last_request=now), 0, now)
        counts.append(got.desired)
        previous = Autoscaling.model_validate(got.status())
    assert counts == [1] * 20
    assert previous.last_scale_time == NOW


def test_change_is_remembered_for_the_event_and_status() -> None:
    """A change carries the count before it; status round-trips through the API type."""
    got = decide(scaling(), 1, before(1), busy(in_flight=14, held=2), 1, NOW)
    assert (got.previous, got.desired, got.changed) == (1, 4, True)
    st = Autoscaling.model_validate(got.status())
    assert (st.desired_replicas, st.reason, st.in_flight, st.held, st.last_scale_time) == (
        4,
        "ScaleUp",
        14,
        2,
        NOW,
    )
    steady = decide(scaling(), 1, st, busy(in_flight=14, held=2), 4, NOW + timedelta(seconds=5))
    assert (steady.changed, steady.last_scale_time) == (False, NOW)


def test_history_keeps_only_what_a_window_covers() -> None:
    """Recommendations older than both windows are dropped; the current one always stays."""
    old = before(1, recs=[(1, 7200), (2, 3600), (1, 1800)])
    got = decide(scaling(), 1, old, busy(in_flight=4), 1, NOW)
    assert [n for n, _ in got.recommendations] == [1]


def md(spec: dict[str, Any], status: dict[str, Any] | None = None) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": "m"},
            "spec": {"model": "oci://r.example.com/m:1", **spec},
            "status": status or {},
        }
    )


@pytest.mark.parametrize(
    ("spec", "status", "expected"),
    [
        ({"replicas": 3}, None, 3),
        ({"replicas": 3, "scaling": {"maxReplicas": 2}}, None, 2),
        ({"replicas": 0, "scaling": {"minReplicas": 1, "maxReplicas": 2}}, None, 1),
        (
            {"replicas": 3, "scaling": {"minReplicas": 0, "maxReplicas": 5}},
            {"autoscaling": {"desiredReplicas": 0}},
            0,
        ),
        ({"replicas": 3}, {"autoscaling": {"desiredReplicas": 0}}, 3),
    ],
)
def test_desired_replicas(spec: dict[str, Any], status: dict[str, Any] | None, expected: int) -> None:
    """spec.replicas without scaling; with it, the autoscaler's count (spec.replicas clamped before one)."""
    assert desired_replicas(md(spec, status)) == expected


def lease(name: str, ns: str = "team-a", target: str | None = "m", **notes: str) -> dict[str, Any]:
    labels = {LABEL_DEMAND_FOR: target} if target else {}
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": notes},
        "spec": {"renewTime": "2026-12-02T11:59:58.123456Z"},
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            lease("m-demand", **{ANNOTATION_IN_FLIGHT: "3", ANNOTATION_HELD: "2"}),
            (("team-a", "m"), Demand(3, 2, datetime(2026, 12, 2, 11, 59, 58, 123456, tzinfo=UTC))),
        ),
        (lease("m-demand"), (("team-a", "m"), Demand(0, 0, ago(2).replace(microsecond=123456)))),
        (
            lease("m-demand", **{ANNOTATION_IN_FLIGHT: "many", ANNOTATION_HELD: "-4"}),
            (("team-a", "m"), Demand(0, 0, ago(2).replace(microsecond=123456))),
        ),
        (lease("mac-mini-01", target=None), None),
    ],
)
def test_demand_lease_parse(body: dict[str, Any], expected: Any) -> None:
    """A demand Lease names its deployment by label; counts that are not integers count as 0."""
    assert parse(body) == expected


async def test_demand_watch_is_unknown_until_listed_then_tracks_each_lease() -> None:
    """Before the first list the demand is unknown; then one entry per Lease, and changes name the
    deployments they move (an old-form Lease and an instance's Lease side by side)."""

    async def changed(namespace: str, name: str) -> None:
        return None

    seen = Demand(0, 1, ago(2).replace(microsecond=123456))
    watch = DemandWatch(cast(Api, None), changed)
    assert watch.get("team-a", "m") is None
    assert watch.apply((RELIST, [lease("m-demand", **{ANNOTATION_HELD: "1"})])) == {("team-a", "m")}
    assert watch.get("team-a", "m") == (seen,)
    assert watch.get("team-a", "other") == ()
    assert watch.apply(("MODIFIED", lease("m-demand", **{ANNOTATION_HELD: "1"}))) == set()
    assert watch.apply(("ADDED", lease("m-demand-0a1b2c3d", **{ANNOTATION_IN_FLIGHT: "5"}))) == {
        ("team-a", "m")
    }
    assert watch.get("team-a", "m") == (seen, replace(seen, in_flight=5, held=0))
    assert watch.apply(("ADDED", lease("x-demand", ns="team-b", target="x"))) == {("team-b", "x")}
    assert watch.apply(("DELETED", lease("m-demand"))) == {("team-a", "m")}
    assert watch.get("team-a", "m") == (replace(seen, in_flight=5, held=0),)
    assert watch.apply(("MODIFIED", lease("m-demand-0a1b2c3d", target=None))) == {("team-a", "m")}
    assert watch.get("team-a", "m") == ()


def test_demand_watch_names_only_expired_leases_for_deletion() -> None:
    """A Lease with no load and no request for 2x the idle timeout (at least 10 min) is named, with
    the resourceVersion it was seen at; a fresh one and a loaded one are kept."""

    async def changed(namespace: str, name: str) -> None:
        return None

    def at(name: str, when: datetime, version: str, **notes: str) -> dict[str, Any]:
        body = lease(name, **notes)
        body["spec"]["renewTime"] = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body["metadata"]["resourceVersion"] = version
        return body

    watch = DemandWatch(cast(Api, None), changed)
    watch.apply(
        (
            RELIST,
            [
                at("m-demand", ago(700), "11"),  # old form, idle past 2x 300s and past 600s
                at("m-demand-aaaaaaaa", ago(30), "12"),  # live instance, idle but recent
                at("m-demand-bbbbbbbb", ago(700), "13", **{ANNOTATION_IN_FLIGHT: "2"}),  # still in flight
                at("m-demand-cccccccc", ago(601), "14"),
            ],
        )
    )
    assert watch.stale("team-a", "m", scaling(), NOW) == [("m-demand", "11"), ("m-demand-cccccccc", "14")]
    assert watch.stale("team-a", "m", scaling(idleTimeoutSeconds=400), NOW) == []  # 2x 400s
    assert watch.stale("team-a", "m", None, NOW) == []  # without scaling: 2x the default 600s
    assert watch.stale("team-b", "m", scaling(), NOW) == []


def test_reconciles_with_32_held_create_one_replica_and_never_touch_spec() -> None:
    """Ten reconciles in a row with 32 requests held: one replica created, one Event, spec as written."""
    s = R.spec(replicas=0, scaling={"minReplicas": 0, "maxReplicas": 3, "idleTimeoutSeconds": 60})
    obs = R.observed(s, [R.mac("a"), R.mac("b")])
    created, events = 0, []
    for second in range(10):
        now = NOW + timedelta(seconds=second)
        ready = sum(r.ready for r in obs.replicas)
        assert s.scaling is not None
        scaled = decide(
            s.scaling, s.replicas, obs.status.autoscaling, Demand(held=32, last_request=now), ready, now
        )
        step = P.decide(obs, scaled)
        created += len(step.create)
        events += [e.reason for e in step.events if e.reason in {"ScaleFromZero", "ScaleUp"}]
        obs = R.apply(obs, step)
    assert (created, events) == (1, ["ScaleFromZero"])
    assert obs.spec == s and obs.spec.replicas == 0
    assert obs.status.autoscaling is not None and obs.status.autoscaling.desired_replicas == 1
    assert obs.status.ready == "0/1"


def test_idle_deployment_goes_to_zero_then_asks_for_nothing() -> None:
    """After the idle timeout the replica is deleted with an Idle Event; the next reconcile writes nothing."""
    s = R.spec(replicas=1, scaling={"minReplicas": 0, "maxReplicas": 2, "idleTimeoutSeconds": 60})
    assert s.scaling is not None
    obs = R.observed(s, [R.mac("a")])
    first = decide(s.scaling, s.replicas, None, Demand(), 0, NOW)
    obs = R.apply(obs, P.decide(obs, first))
    obs = replace(obs, replicas=[replace(r, phase="Ready") for r in obs.replicas])
    later = NOW + timedelta(seconds=61)
    idle = decide(s.scaling, s.replicas, obs.status.autoscaling, Demand(), 1, later)
    step = P.decide(obs, idle)
    assert [why for _, why in step.delete] == ["scaled down"]
    assert [e.reason for e in step.events if e.reason == "Idle"] == ["Idle"]
    obs = R.apply(obs, step)
    assert obs.status.autoscaling is not None and obs.status.autoscaling.desired_replicas == 0
    again = decide(s.scaling, s.replicas, obs.status.autoscaling, Demand(), 0, later + timedelta(seconds=5))
    assert P.decide(obs, again).empty
