"""The metrics' pure parts: fleet gauges, the agents' scrape targets, replica load, the docs and the
dashboard agreeing with what the code exports, and the demo's Prometheus configuration."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchardist.api.macnode import MacNode
from orchardist.api.modelreplica import ModelReplica
from orchardist.controller import world
from orchardist.controller.metrics import (
    OTHER,
    PHASES,
    STALLED_REASONS,
    ControllerMetrics,
    agent_targets,
    agents_slices,
    fleet_counts,
    http_sd,
    serve,
    stalled_reason,
)
from orchardist.dev.prometheus import Targets, config
from orchardist.gateway.metering import Metrics as GatewayMetrics
from orchardist_agent.metrics import load, memory_numbers
from orchardist_agent.proxy import ProxyStats

REPO = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32


def documented() -> dict[str, str]:
    """Family name -> type, from docs/metrics.md's tables (the one list the e2e test also reads)."""
    rows = re.findall(
        r"^\| `([a-z_:]+)` \| (counter|gauge|histogram) \|", (REPO / "docs/metrics.md").read_text(), re.M
    )
    return dict(rows)


def deployment(stalled: tuple[str, str] | None = None, spec: dict[str, Any] | None = None) -> object:
    conds = []
    if stalled is not None:
        conds.append({"type": "Stalled", "status": stalled[0], "reason": stalled[1], "message": "m"})
    body = {
        "apiVersion": "orchardist.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "md", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": spec or {"model": "oci://r.example/m:v1"},
        "status": {"conditions": conds},
    }
    return world.parse_deployment(body)


def replica(phase: str | None) -> ModelReplica:
    plan = {
        "weightBytes": 1,
        "overheadBytes": 1,
        "kvBudgetBytes": 1024,
        "kvBytesPerToken": 8,
        "numBlocks": 16,
        "maxModelLen": 128,
        "maxNumSeqs": 2,
        "maxNumBatchedTokens": 128,
        "gpuMemoryUtilization": 0.5,
        "reservedBytes": 1,
    }
    return ModelReplica.model_validate(
        {
            "metadata": {"name": "r", "namespace": "ns"},
            "spec": {
                "nodeName": "mac",
                "deployment": "md",
                "model": f"oci://r.example/m@{DIGEST}",
                "digest": DIGEST,
                "engine": "mlx-lm",
                "memoryPlan": plan,
                "servedModelName": "md",
            },
            "status": {"phase": phase} if phase else {},
        }
    )


STALLED = [
    ("no conditions", deployment(), None),
    ("stalled unschedulable", deployment(("True", "Unschedulable")), "Unschedulable"),
    ("stalled, a reason outside the set", deployment(("True", "SomethingNew")), OTHER),
    ("Stalled=False", deployment(("False", "AsExpected")), None),
    ("a spec the types refuse", deployment(spec={"model": "not a reference"}), "InvalidSpec"),
]


@pytest.mark.parametrize(("case", "md", "reason"), STALLED, ids=[s[0] for s in STALLED])
def test_stalled_reason(case: str, md: object, reason: str | None) -> None:
    assert stalled_reason(md) == reason


def test_fleet_counts_keep_every_label_and_count_each_object() -> None:
    """Every reason and phase is exported (0 when none), so the labels stay a fixed set."""
    deployments = {
        ("ns", "a"): [deployment(("True", "Unschedulable"))],
        ("ns", "b"): [deployment(("True", "Unschedulable"))],
        ("ns", "c"): [deployment()],
    }
    replicas = {
        ("ns", "a"): [replica("Ready"), replica("Ready"), replica(None)],
        ("ns", "b"): [replica("Pulling")],
    }
    stalled, phases = fleet_counts(deployments, replicas)
    assert set(stalled) == {*STALLED_REASONS, OTHER} and set(phases) == set(PHASES)
    assert stalled["Unschedulable"] == 2 and sum(stalled.values()) == 2
    assert (phases["Ready"], phases["Pending"], phases["Pulling"], sum(phases.values())) == (2, 1, 1, 4)
    assert fleet_counts(None, None) == (dict.fromkeys((*STALLED_REASONS, OTHER), 0), dict.fromkeys(PHASES, 0))


def mac(name: str, address: str | None, port: int | None) -> MacNode:
    status: dict[str, Any] = {}
    if address is not None:
        status["address"] = address
    if port is not None:
        status["metricsPort"] = port
    return MacNode.model_validate({"metadata": {"name": name}, "status": status})


def test_agent_targets_only_addresses_a_slice_may_hold() -> None:
    nodes = {
        n.metadata["name"]: [n]
        for n in (
            mac("b", "10.0.0.2", 9464),
            mac("a", "10.0.0.1", 9464),
            mac("loop", "127.0.0.1", 9464),
            mac("link", "169.254.1.1", 9464),
            mac("name", "mac.local", 9464),
            mac("noport", "10.0.0.3", None),
            mac("noaddress", None, 9464),
            mac("v6", "fd00::5", 9500),
        )
    }
    assert agent_targets(nodes) == [("a", "10.0.0.1", 9464), ("b", "10.0.0.2", 9464), ("v6", "fd00::5", 9500)]


def test_agents_slices_one_per_family_and_port() -> None:
    slices = agents_slices(
        [("a", "10.0.0.1", 9464), ("b", "10.0.0.2", 9464), ("c", "10.0.0.3", 9999), ("v6", "fd00::5", 9464)]
    )
    got = {
        name: (s["addressType"], s["ports"][0]["port"], [e["addresses"][0] for e in s["endpoints"]])
        for name, s in slices.items()
    }
    assert got == {
        "orchardist-agents-metrics-ipv4-9464": ("IPv4", 9464, ["10.0.0.1", "10.0.0.2"]),
        "orchardist-agents-metrics-ipv4-9999": ("IPv4", 9999, ["10.0.0.3"]),
        "orchardist-agents-metrics-ipv6-9464": ("IPv6", 9464, ["fd00::5"]),
    }
    for s in slices.values():
        assert s["metadata"]["labels"]["kubernetes.io/service-name"] == "orchardist-agents-metrics"
        assert s["ports"][0]["name"] == "metrics"
    assert agents_slices([]) == {}


LOAD = [
    # (case, in flight, waiting, maxNumSeqs, (running, waiting, usage))
    ("idle", 0, 0, 4, (0, 0, 0.0)),
    ("two running of four slots", 2, 0, 4, (2, 0, 0.5)),
    ("one running, two queued", 3, 2, 4, (1, 2, 0.25)),
    ("more running than slots (capped)", 6, 0, 4, (6, 0, 1.0)),
    ("no plan known", 1, 0, 0, (1, 0, 0.0)),
]


@pytest.mark.parametrize(("case", "in_flight", "waiting", "seqs", "expected"), LOAD, ids=[c[0] for c in LOAD])
def test_replica_load(
    case: str, in_flight: int, waiting: int, seqs: int, expected: tuple[int, int, float]
) -> None:
    assert load(ProxyStats(in_flight=in_flight, waiting=waiting), seqs) == expected


def test_memory_numbers() -> None:
    memory = {"gpuWorkingSetBytes": 48 << 30, "allocatedBytes": 20 << 30, "wiredLimitBytes": 50 << 30}
    assert memory_numbers(memory) == (48 << 30, 20 << 30, 28 << 30, 50 << 30)
    assert memory_numbers({"gpuWorkingSetBytes": 1, "allocatedBytes": 5}) == (1, 5, 0, 0)


def exported(text: str) -> dict[str, str]:
    """Family name (counters with _total, as Prometheus sees them) -> type, from exposition text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created"):
            continue  # prometheus_client's creation stamps of counters and histograms
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        out[name] = fam.type
    return out


def test_docs_list_every_controller_and_gateway_family_with_its_type() -> None:
    """What the registries export is what docs/metrics.md lists (the agent's: in the e2e test)."""
    from prometheus_client import generate_latest

    ctl = ControllerMetrics()
    ctl.watch_fleet(lambda: (None, None))
    gw = GatewayMetrics()
    gw.held.labels("m").inc()
    gw.requests.labels("k", "m", "200").inc()
    gw.tokens.labels("k", "m", "prompt").inc()
    gw.duration.labels("m").observe(1)
    gw.ttft.labels("m").observe(1)
    docs = documented()
    for registry, prefix in ((ctl.registry, "orchardist_controller_"), (gw.registry, "orchardist_gateway_")):
        have = exported(generate_latest(registry).decode())
        listed = {k: v for k, v in docs.items() if k.startswith(prefix)}
        assert have == listed


def test_dashboard_queries_only_documented_families() -> None:
    """Every panel has a query, and each names families docs/metrics.md lists."""
    dashboard = json.loads((REPO / "charts/orchardist/dashboards/orchardist-fleet.json").read_text())
    docs = documented()
    names = set(docs) | {f"{n}_bucket" for n, t in docs.items() if t == "histogram"}
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\b(orchardist_[a-z_]+|vllm:[a-z_]+)", target["expr"]))
            assert used and used <= names, (panel["title"], used - names)
    wanted = ("memory", "tokens/s", "time to first token", "queue", "pulls", "restarts")
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    assert all(w in titles for w in wanted), titles


def test_prometheus_config_jobs() -> None:
    conf = config(Targets("127.0.0.1:8081", "127.0.0.1:9000"), interval=2)
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}  # type: ignore[attr-defined]
    assert conf["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s"}
    assert jobs["orchardist-controller"]["static_configs"] == [{"targets": ["127.0.0.1:8081"]}]
    assert jobs["orchardist-gateway"]["static_configs"] == [{"targets": ["127.0.0.1:9000"]}]
    sd = jobs["orchardist-agents"]["http_sd_configs"]
    assert sd == [{"url": "http://127.0.0.1:8081/sd/agents", "refresh_interval": "2s"}]
    only_gateway = config(Targets(None, "127.0.0.1:9000"))
    assert [j["job_name"] for j in only_gateway["scrape_configs"]] == ["orchardist-gateway"]  # type: ignore[attr-defined]


def test_http_sd_groups() -> None:
    targets = [("a", "10.0.0.1", 9464), ("v6", "fd00::5", 9500), ("loop", "127.0.0.1", 9465)]
    assert http_sd(targets) == [
        {"targets": ["10.0.0.1:9464"], "labels": {}},
        {"targets": ["[fd00::5]:9500"], "labels": {}},
        {"targets": ["127.0.0.1:9465"], "labels": {}},
    ]
    nodes = {"loop": [mac("loop", "127.0.0.1", 9465)]}
    assert agent_targets(nodes) == [] and agent_targets(nodes, sliceable=False) == [
        ("loop", "127.0.0.1", 9465)
    ]


async def test_controller_metrics_served_over_http() -> None:
    """A reconcile counted is what a scrape of the real listener reads."""
    import asyncio

    from orchardist.dev.procs import free_port

    metrics = ControllerMetrics()
    metrics.watch_fleet(lambda: ({("ns", "a"): [deployment(("True", "Unschedulable"))]}, None))
    metrics.reconciled(True, 0.2)
    metrics.reconciled(False, 3.0)
    metrics.placed(2)
    port = free_port()
    runner = await serve(metrics.registry, port, host="127.0.0.1")
    try:
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
    finally:
        await runner.cleanup()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("orchardist_controller_reconciles_total", (("result", "success"),))] == 1
    assert samples[("orchardist_controller_reconciles_total", (("result", "error"),))] == 1
    assert samples[("orchardist_controller_placements_total", ())] == 2
    assert samples[("orchardist_controller_stalled_deployments", (("reason", "Unschedulable"),))] == 1
    assert samples[("orchardist_controller_reconcile_duration_seconds_count", (("result", "error"),))] == 1
