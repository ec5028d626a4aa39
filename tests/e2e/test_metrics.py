"""Debian's Prometheus scraping the real fleet: every documented family has samples, every
dashboard panel's query returns data.

The real control plane, the operator, two `orchardist agent run` processes (simulated Macs, each in
its own network namespace) serving a tiny model through real `mlx_lm.server` engines, and one
`orchardist gateway`. Prometheus is configured by the demo's own code (`orchardist.dev.prometheus`):
the controller and the gateway at fixed addresses, the agents through the controller's HTTP service
discovery (Debian builds Prometheus without Kubernetes discovery), the same list the controller
writes into the EndpointSlices of its `orchardist-agents-metrics` Service, checked here too. The
families come from docs/metrics.md and the queries from the chart's dashboard JSON: one source each.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from orchardist.dev import netns, procs, tinymodel
from orchardist.dev.cluster import Cluster, find_kubebins
from orchardist.dev.prometheus import Targets
from orchardist.dev.prometheus import start as start_prometheus
from orchardist.dev.registry import Registry, make_tls
from orchardist_agent.engines import Runtime
from tests.e2e.fleet_helpers import Fleet, push_cli
from tests.fixtures.agents import Operator, gateway_argv, kget, stop_process
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
MACS = ["m4-pro-48gb", "m4-max-128gb"]
SCRAPE_S = 2.0


def documented() -> dict[str, str]:
    """Family -> type, from docs/metrics.md's tables."""
    text = (REPO / "docs" / "metrics.md").read_text()
    return dict(re.findall(r"^\| `([a-z_:]+)` \| (counter|gauge|histogram) \|", text, re.M))


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the chart's dashboard."""
    dashboard = json.loads((REPO / "charts/orchardist/dashboards/orchardist-fleet.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


@dataclass
class World:
    fleet: Fleet
    prometheus: str
    gateway: str
    key: str
    ns: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query through Prometheus's HTTP API."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.prometheus}/api/v1/targets", timeout=10) as resp:
            return list(json.loads(resp.read())["data"]["activeTargets"])

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=self.key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def metrics_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane on every address, so the Macs' namespaces reach it through the bridge."""
    cl = Cluster.start(
        tmp_path_factory.mktemp("metrics-cluster") / "state",
        bin_dir=find_kubebins(),
        crds=REPO / "crds",
        die_with_parent=True,
        bind_address="0.0.0.0",
    )
    try:
        cl.wait_for_controller_manager()
        yield cl
    finally:
        cl.stop()


def ask(client: openai.OpenAI, model: str, *, stream: bool = False) -> None:
    if stream:
        chunks = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello to the orchard."}],
            max_tokens=8,
            stream=True,
        )
        assert any(c.choices for c in chunks)
    else:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert answer.choices


@pytest.fixture(scope="module")
def world(
    metrics_cluster: Cluster, mlx_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    cluster = metrics_cluster
    work = tmp_path_factory.mktemp("metrics")
    tag = os.urandom(3).hex()
    ns, keys_ns = f"metrics-{tag}", f"metrics-keys-{tag}"
    netns.sweep()
    reason = netns.unavailable()
    assert reason is None, f"the Macs run in network namespaces, which need root: {reason}"
    subnet = netns.pick_subnet(netns.routes(), start=int(tag, 16) % 256)
    fabric = netns.create(tag, [f"{ns}-{mac}" for mac in MACS], subnet=subnet, owner_pid=os.getpid())
    for name in (ns, keys_ns, "orchardist-system"):
        cluster.kubectl("create", "namespace", name, check=False)
    reg = Registry.start(
        work / "registry",
        bind=fabric.host_address,
        tls=make_tls(work / "registry-tls", fabric.host_address),
        die_with_parent=True,
    )
    fleet = Fleet(cluster, ns, work / "macs", mlx_runtime.prefix, 15.0, fabric, reg.client_env())
    gateway: Any = None
    prometheus: procs.ProcRecord | None = None
    holder = concurrent.futures.ThreadPoolExecutor(1)
    try:
        for mac in MACS:
            fleet.add_agent(mac)
        model = f"oci://{reg.host}/metrics/tiny:v1"
        push_cli(tinymodel.build(work / "tiny"), model, cluster.env() | reg.client_env())
        for mac in MACS:
            fleet.join(mac)
        controller = f"127.0.0.1:{procs.free_port()}"
        fleet.operator = Operator.spawn(
            cluster,
            "--namespace",
            ns,
            "--standalone",
            "--lease-grace",
            "15",
            "--resync",
            "1",
            "--metrics-port",
            controller.rpartition(":")[2],
            env=fleet.env,
        )
        fleet.operator.wait_started(90)
        key = f"sk-{tag}"
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "team",
            "-n",
            keys_ns,
            f"--from-literal=key={key}",
            f"--from-literal=namespaces={ns}",
        )
        cluster.kubectl("label", "secret", "team", "-n", keys_ns, "orchardist.io/gateway-key=true")
        port = procs.free_port()
        log = work / "gateway.log"
        with log.open("ab") as out:
            gateway = subprocess.Popen(
                gateway_argv(cluster, port, keys_ns, "--instance", f"metrics-{tag}"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        gateway_url = f"http://127.0.0.1:{port}"
        procs.wait_http(f"{gateway_url}/readyz", timeout=60)
        url, prometheus = start_prometheus(
            work / "prometheus",
            Targets(controller, gateway_url.removeprefix("http://")),
            interval=SCRAPE_S,
            die_with_parent=True,
        )
        w = World(fleet, url, gateway_url, key, ns)
        fleet.deploy("chat", model, replicas=2, context=1024, seqs=2)
        wait_for(
            lambda: any(m.id == "chat" for m in w.client().models.list()),
            timeout=60,
            interval=0.5,
            message="the gateway to know the deployment",
        )
        # Sent before any replica is ready: the gateway holds it (the hold queue has a sample).
        held = holder.submit(ask, w.client(), "chat")
        fleet.wait_ready("chat", 2, timeout=600)
        held.result(timeout=300)
        yield w
    finally:
        holder.shutdown(wait=False, cancel_futures=True)
        if prometheus is not None:
            procs.stop(prometheus)
        if gateway is not None:
            stop_process(gateway)
        print(fleet.describe())
        left = fleet.teardown()
        reg.stop()
        for name in (ns, keys_ns):
            cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
        assert not left, left


def test_agents_are_discovered_through_their_endpointslice(world: World) -> None:
    """The controller lists each Mac's metrics endpoint; Prometheus finds and scrapes every one."""
    fabric = world.fleet.fabric

    def reported() -> dict[str, int] | None:
        """Each Mac's metrics port as its agent reports it (9464 unless that was taken)."""
        nodes = (kget(world.fleet.cluster, "macnodes") or {}).get("items") or []
        ports = {n["metadata"]["name"]: (n.get("status") or {}).get("metricsPort") for n in nodes}
        return ports if all(ports.get(a.node) for a in world.fleet.agents.values()) else None  # type: ignore[return-value]

    ports = wait_for(reported, timeout=60, interval=1.0, message="every Mac reports its metrics port")
    want = {f"{fabric.address(a.node)}:{ports[a.node]}" for a in world.fleet.agents.values()}

    def listed() -> set[str] | None:
        got = kget(
            world.fleet.cluster,
            "endpointslices",
            "-n",
            "orchardist-system",
            "-l=kubernetes.io/service-name=orchardist-agents-metrics",
        )
        found = {
            f"{addr}:{port['port']}"
            for sl in (got or {}).get("items") or []
            for port in sl.get("ports") or []
            for ep in sl.get("endpoints") or []
            for addr in ep["addresses"]
        }
        return found if found == want else None

    wait_for(listed, timeout=60, interval=1.0, message=f"the agents' EndpointSlice holding {want}")

    def scraped() -> list[dict[str, Any]] | None:
        agents = [t for t in world.targets() if t["labels"].get("job") == "orchardist-agents"]
        up = {t["labels"]["instance"] for t in agents if t["health"] == "up"}
        return agents if up == want else None

    wait_for(
        scraped, timeout=60, interval=1.0, message=lambda: f"Prometheus scraping {want}: {world.targets()}"
    )
    every = {"orchardist-agents": "up", "orchardist-controller": "up", "orchardist-gateway": "up"}

    def jobs() -> dict[str, str]:
        return {t["labels"]["job"]: t["health"] for t in world.targets()}

    # A target found but not yet scraped is "unknown" until its first scrape: wait for that fact.
    wait_for(lambda: jobs() == every, timeout=60, interval=1.0, message=lambda: f"every job up: {jobs()}")


def test_every_documented_family_has_samples(world: World) -> None:
    client = world.client()
    for i in range(4):
        ask(client, "chat", stream=bool(i % 2))
    families = documented()
    assert len(families) >= 20
    missing: dict[str, str] = {}

    def all_there() -> bool:
        missing.clear()
        for name, kind in families.items():
            series = f"{name}_count" if kind == "histogram" else name
            if not world.query(f'{{__name__="{series}"}}'):
                missing[name] = kind
        return not missing

    wait_for(all_there, timeout=90, interval=SCRAPE_S, message=lambda: f"families without samples: {missing}")
    samples = world.query("orchardist_agent_gpu_working_set_bytes")
    assert {s["metric"]["node"] for s in samples} == {a.node for a in world.fleet.agents.values()}
    assert not any("exported_node" in s["metric"] for s in samples)  # discovery adds no clashing label
    tokens = world.query('sum(orchardist_agent_replica_tokens_total{kind="completion"})')
    assert float(tokens[0]["value"][1]) > 0


def test_every_dashboard_panel_returns_data(world: World) -> None:
    client = world.client()
    for i in range(6):
        ask(client, "chat", stream=bool(i % 2))
    queries = panel_queries()
    assert queries
    empty: list[str] = []

    def all_answer() -> bool:
        empty[:] = [f"{title}: {q}" for title, q in queries if not world.query(q)]
        return not empty

    wait_for(
        all_answer,
        timeout=120,
        interval=SCRAPE_S,
        message=lambda: "panels without data:\n" + "\n".join(empty),
    )
    ttft = world.query(queries[[t for t, _ in queries].index("Time to first token, p50 / p95")][1])
    assert any(float(s["value"][1]) > 0 for s in ttft), ttft
