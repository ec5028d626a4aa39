"""When the controller shows a Mac NotReady: its Lease older than the grace, and only over a Ready=True."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchardist.api.macnode import MacNode
from orchardist.controller.nodehealth import LEASE_EXPIRED, sweep, verdict

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
GRACE = 40.0
AGENT_CONDS = ["Ready", "MemoryPressure", "DiskPressure"]


def node(ready: str | None = "True", created: datetime = NOW - timedelta(hours=1), rv: str = "7") -> MacNode:
    conds: list[dict[str, Any]] = [
        {"type": t, "status": "False", "reason": "Fine", "lastTransitionTime": "2026-03-01T11:00:00Z"}
        for t in AGENT_CONDS[1:]
    ]
    if ready is not None:
        conds.insert(0, {"type": "Ready", "status": ready, "reason": "AgentReady"})
    return MacNode.model_validate(
        {
            "metadata": {
                "name": "mac-a",
                "resourceVersion": rv,
                "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            "status": {"conditions": conds},
        }
    )


TABLE = [
    ("renewed within the grace", node(), NOW - timedelta(seconds=39), None),
    ("renewed exactly at the grace", node(), NOW - timedelta(seconds=40), None),
    ("expired over Ready=True", node(), NOW - timedelta(seconds=41), AGENT_CONDS),
    ("expired, already Unknown", node(ready="Unknown"), NOW - timedelta(minutes=5), None),
    ("expired after a clean exit (Ready=False kept)", node(ready="False"), NOW - timedelta(minutes=5), None),
    ("no Lease, created just now", node(ready=None, created=NOW - timedelta(seconds=10)), None, None),
    ("no Lease, created long ago", node(ready=None), None, AGENT_CONDS),
    ("no Lease, registered Ready", node(), None, AGENT_CONDS),
]


@pytest.mark.parametrize(("case", "mac", "renewed", "marked"), TABLE, ids=[t[0] for t in TABLE])
def test_verdict(case: str, mac: MacNode, renewed: datetime | None, marked: list[str] | None) -> None:
    """Unknown with LeaseExpired on every condition the agent owns, or nothing written."""
    got = verdict(mac, renewed, NOW, GRACE)
    if marked is None:
        assert got is None
        return
    assert got is not None
    assert sorted(c["type"] for c in got.conditions) == sorted(marked)
    assert {(c["status"], c["reason"], c["lastTransitionTime"]) for c in got.conditions} == {
        ("Unknown", LEASE_EXPIRED, "2026-03-01T12:00:00Z")
    }
    assert (got.node, got.resource_version) == ("mac-a", "7")


def test_message_names_the_last_renewal_and_the_grace() -> None:
    """The message says when the agent was last heard from, so `kubectl describe mn` answers "since when"."""
    got = verdict(node(), NOW - timedelta(seconds=90), NOW, GRACE)
    assert got is not None
    assert "last renewed the Lease at 2026-03-01T11:58:30Z, more than 40s ago" in got.message


def test_sweep_reads_the_indexes() -> None:
    """Over the controller's indexes: only the Mac whose Lease ran out; a Mac without a Lease entry
    counts from its creation."""
    fresh = node().model_copy(update={"metadata": {"name": "mac-b", "resourceVersion": "3"}})
    nodes = {"mac-a": [node()], "mac-b": [fresh]}
    leases = {"mac-a": [NOW - timedelta(minutes=2)], "mac-b": [NOW - timedelta(seconds=5)]}
    assert [v.node for v in sweep(nodes, leases, NOW, GRACE)] == ["mac-a"]
