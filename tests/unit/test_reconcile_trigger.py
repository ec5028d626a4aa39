"""The reconciler's triggering and replica Events: bursts coalesce, phase changes become Events."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from orchardist.api.modelreplica import ModelReplica
from orchardist.controller.reconciler import Controller
from orchardist.controller.world import parse_deployment

pytestmark = pytest.mark.looptime  # the sleeps below are simulated durations, not waits


class Counting(Controller):
    """A Controller whose reconcile only counts runs (the scheduling inside is tested elsewhere)."""

    runs: int = 0
    active: int = 0
    most: int = 0
    forced: list[bool]

    async def _reconcile(
        self, namespace: str, name: str, fallback: Mapping[str, Any] | None, force: bool
    ) -> None:
        self.runs += 1
        self.active += 1
        self.most = max(self.most, self.active)
        self.forced.append(force)
        await asyncio.sleep(0.05)  # a reconcile's duration, on looptime's fake clock
        self.active -= 1


def counting() -> Counting:
    c = Counting(adapter=None)  # type: ignore[arg-type]  # never reaches the API in these tests
    c.forced = []
    return c


async def test_a_burst_of_triggers_costs_at_most_two_reconciles() -> None:
    """Ten triggers while one runs: the running one, plus one that all the others join."""
    c = counting()
    await asyncio.gather(*(c.trigger("ns", "md") for _ in range(10)))
    assert c.runs == 2


async def test_a_forced_resolve_is_not_lost_when_joining() -> None:
    """A trigger asking for a fresh resolution that joins a queued run makes that run forced."""
    c = counting()
    first = asyncio.ensure_future(c.trigger("ns", "md"))
    await asyncio.sleep(0.01)  # fake clock: lets the first run start before the others arrive
    await asyncio.gather(c.trigger("ns", "md"), c.trigger("ns", "md", force_resolve=True))
    await first
    assert c.forced == [False, True]


async def test_different_deployments_run_concurrently() -> None:
    """Two deployments do not wait for each other (only placement is serialised)."""
    c = counting()
    await asyncio.gather(c.trigger("ns", "a"), c.trigger("ns", "b"))
    assert (c.runs, c.most) == (2, 2)


async def test_one_deployment_never_runs_twice_at_once() -> None:
    """However many triggers arrive, one deployment's reconciles never overlap."""
    c = counting()
    await asyncio.gather(
        *(c.trigger("ns", "md") for _ in range(5)), c.trigger("ns", "md", force_resolve=True)
    )
    assert c.most == 1


DIGEST = "sha256:" + "aa" * 32
PLAN = {
    "weightBytes": 1 << 30,
    "overheadBytes": 1 << 28,
    "kvBudgetBytes": 1 << 29,
    "kvBytesPerToken": 1024,
    "numBlocks": 256,
    "maxModelLen": 4096,
    "maxNumSeqs": 4,
    "maxNumBatchedTokens": 4096,
    "gpuMemoryUtilization": 0.5,
    "reservedBytes": 2 << 30,
}


def replica(phase: str | None, **status: Any) -> ModelReplica:
    return ModelReplica.model_validate(
        {
            "metadata": {"name": "r0", "uid": "u1"},
            "spec": {
                "nodeName": "studio-1",
                "deployment": "md",
                "model": f"oci://r.example/m@{DIGEST}",
                "digest": DIGEST,
                "engine": "mlx-lm",
                "memoryPlan": PLAN,
                "servedModelName": "md",
            },
            "status": {"phase": phase, **status},
        }
    )


EVENTS = [
    # (case, previous phase (None: never seen), body, expected (type, reason) or None)
    ("first sight, pending", None, replica(None), None),
    ("pulling", "Pending", replica("Pulling", progress={"bytesTotal": 2 << 30}), ("Normal", "Pulling")),
    ("pulled, starting", "Pulling", replica("Starting"), ("Normal", "Pulled")),
    ("serving", "Starting", replica("Ready", endpoint="10.0.0.5:8001"), ("Normal", "Started")),
    (
        "failed",
        "Starting",
        replica("Failed", lastError={"reason": "CrashLoop", "message": "exit 1"}),
        ("Warning", "CrashLoop"),
    ),
    ("no change", "Ready", replica("Ready"), None),
    # An engine restarting after a crash: the deployment's Degraded (CrashLoopBackOff) says it once.
    ("crashed, restarting", "Ready", replica("Starting", restarts=1), None),
    ("back after a crash", "Starting", replica("Ready", restarts=1, endpoint="10.0.0.5:8001"), None),
    (
        "given up after crashes: one line",
        "Starting",
        replica(
            "Failed", restarts=5, lastError={"reason": "CrashLoop", "message": "exit 1\n--- log ---\nboom"}
        ),
        ("Warning", "CrashLoop"),
    ),
]


@pytest.mark.parametrize(("case", "before", "body", "expected"), EVENTS, ids=[e[0] for e in EVENTS])
def test_replica_phase_events(
    case: str, before: str | None, body: ModelReplica, expected: tuple[str, str] | None
) -> None:
    """Each phase change of a replica becomes one Event on its deployment, worded for people."""
    c = counting()
    if before is not None:
        c.phases["u1"] = before
    got = c.replica_phase_event(body, initial=False)
    assert (got[:2] if got else None) == expected
    if got is not None:
        assert got[2].startswith("r0 on studio-1: ") and "\n" not in got[2]


def test_the_initial_listing_posts_nothing() -> None:
    """A restarted operator does not repeat Events for phases it merely re-lists."""
    c = counting()
    assert c.replica_phase_event(replica("Ready"), initial=True) is None
    assert c.replica_phase_event(replica("Ready"), initial=False) is None


class Index(dict[Any, list[Any]]):
    """kopf's Index as the controller reads it: key -> the values indexed under it."""

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(key, default)


def test_needs_placement_reads_the_parsed_deployments_in_the_index() -> None:
    """Only valid deployments short of replicas come back; a refused spec is never retried by a Mac."""
    short = parse_deployment(
        {
            "metadata": {"name": "a", "namespace": "ns", "generation": 1},
            "spec": {"model": "oci://r.example/m:v1"},
        }
    )
    done = parse_deployment(
        {
            "metadata": {"name": "b", "namespace": "ns", "generation": 1},
            "spec": {"model": "oci://r.example/m:v1"},
            "status": {"observedGeneration": 1, "replicas": 1},
        }
    )
    refused = parse_deployment({"metadata": {"name": "c", "namespace": "ns"}, "spec": {}})
    c = counting()
    c.deployments = Index({("ns", "a"): [short], ("ns", "b"): [done], ("ns", "c"): [refused]})
    assert c.needs_placement() == [("ns", "a")]


def test_the_event_handler_finds_the_replica_the_index_parsed() -> None:
    """A replica event is read from the index (parsed once), by namespace, deployment and name."""
    c = counting()
    r = replica("Ready")
    c.replicas = Index({("ns", "md"): [r]})
    assert c.indexed_replica("ns", "md", "r0") is r
    assert c.indexed_replica("ns", "md", "r1") is None
    assert c.indexed_replica("other", "md", "r0") is None
