"""The fleet: four simulated Macs, three models of different sizes, on the real everything.

One operator and four `orchardist agent run` subprocesses (M2 16 GB, M4 Pro 48 GB, M4 Max 128 GB,
M2 Ultra 192 GB) on the real control plane; tiny models pushed to the real registry with
`orchardist push`; every replica is a real `mlx_lm.server` (MLX on the CPU). Each Mac (its agent and
engines) lives in its own network namespace on a bridge (orchardist.dev.netns), reaches the apiserver
and the registry (TLS, its own CA) at the bridge's host address, and reports its own address; a
client in a fifth namespace chats through the EndpointSlices' addresses. The sizes come from the
memory plan: the same deep tiny Llama (16 KiB of KV per token) pinned to 1 M tokens needs a 48 GB
Mac, pinned to 2 M tokens a 128 GB one; the plain tiny Llama fits everywhere. The cases share the
fleet and run in order: placement, chat, unschedulable, a killed agent, a restarted agent, a rollout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev import netns, tinymodel
from orchardist.dev.cluster import Cluster, find_kubebins
from orchardist.dev.registry import Registry, make_tls
from orchardist.planning import macs, memory
from orchardist.planning.profile import ModelProfile
from orchardist_agent.engines import Runtime
from tests.e2e.fleet_helpers import (
    CLIENT,
    Fleet,
    GiB,
    Prober,
    capacity,
    claims_layers,
    deep_variant,
    fits_on,
    model_profile,
    pids_of,
    push_cli,
    wait_gone,
)
from tests.fixtures.agents import alive, chat, engine_pid, registered
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine, pytest.mark.timeout(1800)]

MACS = ["m2-16gb", "m4-pro-48gb", "m4-max-128gb", "m2-ultra-192gb"]
GRACE = 15.0  # the operator's Lease grace: short, yet longer than an agent restart on a busy machine
DEEP_LAYERS = 64  # 64 x 256 B = 16 KiB of KV per token
MAX_POSITIONS = 2_097_152  # the API's largest contextLength


@dataclass(frozen=True)
class Workload:
    """One ModelDeployment of the fleet and what the planner says about it."""

    name: str
    tag: str
    model_dir: Path
    replicas: int
    context: int
    seqs: int

    @property
    def request(self) -> memory.PlanRequest:
        return memory.PlanRequest(context_length=self.context, max_num_seqs=self.seqs)


@dataclass
class World:
    fleet: Fleet
    workloads: dict[str, Workload]
    registry: str
    digests: dict[str, str]
    profiles: dict[str, ModelProfile]
    fits: dict[str, set[str]]  # workload -> Mac profiles where one replica fits an empty Mac
    lost: tuple[str, dict[str, int]] | None = None  # the killed agent's Mac and its replicas' engine pids


@pytest.fixture(scope="module")
def fleet_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane of the fleet's own, listening on every address so the Macs' namespaces reach it
    through the bridge (the session's cluster listens on loopback only)."""
    cl = Cluster.start(
        tmp_path_factory.mktemp("fleet-cluster") / "state",
        bin_dir=find_kubebins(),
        crds=Path(__file__).resolve().parents[2] / "crds",
        die_with_parent=True,
        bind_address="0.0.0.0",
    )
    try:
        cl.wait_for_controller_manager()
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def world(
    fleet_cluster: Cluster, mlx_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    t0 = time.monotonic()
    cluster = fleet_cluster
    work = tmp_path_factory.mktemp("fleet")
    tag = os.urandom(3).hex()
    ns = f"fleet-{tag}"
    netns.sweep()  # fabrics of runs killed before their teardown
    reason = netns.unavailable()
    assert reason is None, f"the fleet runs its Macs in network namespaces, which need root: {reason}"
    subnet = netns.pick_subnet(netns.routes(), start=int(tag, 16) % 256)
    names = [f"{ns}-{mac}" for mac in MACS]
    fabric = netns.create(tag, [*names, CLIENT], subnet=subnet, owner_pid=os.getpid())
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "namespace", "orchardist-system", check=False)
    reg = Registry.start(
        work / "registry",
        bind=fabric.host_address,
        tls=make_tls(work / "registry-tls", fabric.host_address),
        die_with_parent=True,
    )
    registry = reg.host
    env = cluster.env() | reg.client_env()
    fleet = Fleet(cluster, ns, work / "macs", mlx_runtime.prefix, GRACE, fabric, reg.client_env())
    try:
        # The agents start first (they register while the models are built and pushed).
        for mac in MACS:
            fleet.add_agent(mac)
        small_dir = tinymodel.build(work / "models" / "small")
        deep_dir = deep_variant(work / "models" / "deep", layers=DEEP_LAYERS, max_positions=MAX_POSITIONS)
        huge_dir = claims_layers(deep_dir, work / "models" / "huge", layers=8 * DEEP_LAYERS)
        tags = {
            "small": f"oci://{registry}/fleet/small:v1",
            "deep": f"oci://{registry}/fleet/deep:v1",
            "huge": f"oci://{registry}/fleet/huge:v1",
        }
        digests = {
            "small": push_cli(small_dir, tags["small"], env),
            "deep": push_cli(deep_dir, tags["deep"], env),
            "huge": push_cli(huge_dir, tags["huge"], env),
        }
        workloads = {
            "small": Workload("small", tags["small"], small_dir, replicas=2, context=1024, seqs=2),
            "medium": Workload(
                "medium", tags["deep"], deep_dir, replicas=2, context=MAX_POSITIONS // 2, seqs=1
            ),
            "large": Workload("large", tags["deep"], deep_dir, replicas=1, context=MAX_POSITIONS, seqs=1),
            "huge": Workload("huge", tags["huge"], huge_dir, replicas=1, context=MAX_POSITIONS, seqs=1),
        }
        for mac in MACS:
            fleet.join(mac)
        fleet.start_operator()
        for name in ("small", "medium", "large"):
            w = workloads[name]
            fleet.deploy(name, w.tag, replicas=w.replicas, context=w.context, seqs=w.seqs)
        for name in ("small", "medium", "large"):
            fleet.wait_ready(name, workloads[name].replicas, timeout=600)
        profiles: dict[str, ModelProfile] = {}
        for name in ("small", "medium", "large"):
            weight_bytes = int(fleet.md(name)["status"]["modelProfile"]["weightBytes"])
            profiles[name] = model_profile(workloads[name].model_dir, weight_bytes)
        profiles["huge"] = model_profile(huge_dir, profiles["large"].weight_bytes)
        fits = {n: fits_on(profiles[n], workloads[n].request, MACS) for n in workloads}
        print(f"fleet up and serving in {time.monotonic() - t0:.1f} s")
        yield World(fleet, workloads, registry, digests, profiles, fits)
    finally:
        print(fleet.describe())
        left = fleet.teardown()
        reg.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
        assert not left, left


def node_mac(world: World, replica: dict[str, Any]) -> str:
    return world.fleet.mac_of(replica["spec"]["nodeName"])


def test_placement_follows_fit(world: World) -> None:
    """Each replica sits on a Mac where the plan fits; the big models never on the 16 GB Mac."""
    # What the planner says, spelled out for the reader (computed above from plan() per profile).
    assert world.fits["small"] == set(MACS)
    assert world.fits["medium"] == {"m4-pro-48gb", "m4-max-128gb", "m2-ultra-192gb"}
    assert world.fits["large"] == {"m4-max-128gb", "m2-ultra-192gb"}
    assert world.fits["huge"] == set()

    fleet = world.fleet
    reserved: dict[str, int] = {}
    for name in ("small", "medium", "large"):
        w = world.workloads[name]
        md = fleet.md(name)
        assert (
            md["status"]["resolvedDigest"] == world.digests["deep" if w.tag.endswith("deep:v1") else "small"]
        )
        assert md["status"]["modelProfile"]["kvBytesPerToken"] == world.profiles[name].kv_bytes_per_token
        reps = fleet.live(name)
        assert len(reps) == w.replicas
        placed = [node_mac(world, r) for r in reps]
        assert set(placed) <= world.fits[name], (name, placed, world.fits[name])
        if w.replicas > 1:  # spread: Preferred, and there is room on distinct Macs
            assert len(set(placed)) == w.replicas, (name, placed)
        for r in reps:
            plan = r["spec"]["memoryPlan"]
            assert plan["maxModelLen"] == w.context and plan["maxNumSeqs"] == w.seqs
            mac = node_mac(world, r)
            reserved[mac] = reserved.get(mac, 0) + int(plan["reservedBytes"])
            # What was reserved is what the planner gives one replica with these settings on that Mac
            # (no more: pinning context and concurrency makes it reserve only what it uses).
            alone = memory.plan(world.profiles[name], capacity(macs.get(mac)), w.request)
            assert alone.fits
            ws = macs.get(mac).gpu_working_set_bytes
            # The share is rounded up to 1e-4 of the working set.
            assert int(plan["reservedBytes"]) <= alone.reserved_bytes + ws // 10_000 + 1
    assert "m2-16gb" not in {node_mac(world, r) for n in ("medium", "large") for r in fleet.live(n)}
    for mac, held in reserved.items():
        ws = macs.get(mac).gpu_working_set_bytes
        assert held <= ws, (mac, held / GiB, ws / GiB)
    for mac in MACS:  # each agent reports its simulated Mac, and what its replicas hold
        node = json.loads(
            fleet.cluster.kubectl("get", "macnode", fleet.agents[mac].node, "-o", "json").stdout
        )
        assert node["status"]["simulatedProfile"] == mac
        assert node["status"]["memory"]["gpuWorkingSetBytes"] == macs.get(mac).gpu_working_set_bytes
        assert node["status"]["memory"]["allocatedBytes"] == reserved.get(mac, 0), (mac, reserved)


def test_chat_answers_through_every_deployments_endpoints(world: World) -> None:
    """Every Ready replica's endpoint (status.replicaStatuses) is its Mac's own address, is what the
    Service's EndpointSlices hold, and answers a chat completion from the host and from a client in
    another namespace; no deployment is Degraded (no EndpointNotRoutable)."""
    fleet = world.fleet
    for name in ("small", "medium", "large"):
        md = fleet.md(name)
        statuses = md["status"]["replicaStatuses"]
        assert md["status"]["readyReplicas"] == world.workloads[name].replicas
        endpoints = [s["endpoint"] for s in statuses if s.get("phase") == "Ready" and s.get("endpoint")]
        assert len(endpoints) == world.workloads[name].replicas, statuses
        for s in statuses:
            assert s["endpoint"].rpartition(":")[0] == fleet.fabric.address(s["nodeName"]), s
        assert fleet.slice_endpoints(name) == set(endpoints)
        for ep in endpoints:
            answer = chat(ep)
            assert answer["choices"][0]["message"]["role"] == "assistant", answer
            assert fleet.chat_from_client(ep)["choices"][0]["message"]["role"] == "assistant"
        cond = fleet.condition(name, "Ready")
        assert cond["status"] == "True", cond
        assert fleet.condition(name, "Degraded").get("status") != "True", fleet.condition(name, "Degraded")


def test_too_big_for_every_mac_is_unschedulable_naming_the_closest(world: World) -> None:
    """Ready=False/Unschedulable and Stalled: the closest Mac and its shortfall in GiB, no replica."""
    fleet, w = world.fleet, world.workloads["huge"]
    prof = world.profiles["huge"]
    # The planner's view of each Mac now: what its replicas hold, then the smallest runnable replica.
    held: dict[str, int] = {}
    for r in fleet.live():
        held[node_mac(world, r)] = held.get(node_mac(world, r), 0) + int(
            r["spec"]["memoryPlan"]["reservedBytes"]
        )
    shortfall: dict[str, float] = {}
    for mac in MACS:
        p = memory.plan(prof, capacity(macs.get(mac), held.get(mac, 0)), w.request)
        assert not p.fits
        kv = memory.blocks_for_sequence(prof, w.context, 16) * 16 * prof.kv_bytes_per_token
        need = p.weight_bytes + p.overhead_bytes + kv
        shortfall[mac] = (need - max(0, p.usable_bytes - held.get(mac, 0))) / GiB
    closest = min(shortfall, key=lambda m: shortfall[m])
    assert closest in {"m4-max-128gb", "m2-ultra-192gb"}, shortfall  # a big Mac: the most free working set

    fleet.deploy("huge", w.tag, replicas=1, context=w.context, seqs=w.seqs)
    try:
        cond = wait_for(
            lambda: (c := fleet.condition("huge", "Ready")).get("reason") == "Unschedulable" and c,
            timeout=90,
            message="huge Ready=False Unschedulable",
        )
        assert cond["status"] == "False"
        node = fleet.agents[closest].node
        m = re.search(r"closest is (\S+) \((.+?)\): .*short (\d+\.\d) GiB", cond["message"])
        assert m, cond["message"]
        assert m.group(1) == node, (cond["message"], shortfall)
        assert float(m.group(3)) == pytest.approx(shortfall[closest], abs=0.11), (cond["message"], shortfall)
        stalled = fleet.condition("huge", "Stalled")
        assert (stalled.get("status"), stalled.get("reason")) == ("True", "Unschedulable"), stalled
        # An absence shows only over time, and a resync that changes nothing leaves no trace to wait on.
        time.sleep(2)  # deliberate: two resyncs (--resync 1) later, still no replica
        assert fleet.replicas("huge") == []
    finally:
        fleet.cluster.kubectl("delete", "md", "huge", "-n", fleet.ns, "--wait=true", "--timeout=60s")


def test_killed_agent_lease_expires_and_its_replicas_move(world: World) -> None:
    """SIGKILL the agent holding the large replica: after the grace, everything it ran is replaced on
    other fitting Macs and serves; when the agent comes back each deployment trims back to its count."""
    fleet = world.fleet
    (large,) = fleet.live("large")
    victim_mac = node_mac(world, large)
    victim = fleet.agents[victim_mac]
    lost = [r for r in fleet.live() if r["spec"]["nodeName"] == victim.node]
    lost_pids = pids_of(lost)
    counts = {n: world.workloads[n].replicas for n in ("small", "medium", "large")}

    t0 = time.monotonic()
    assert victim.signal(signal.SIGKILL) == -signal.SIGKILL

    def replaced() -> bool:
        fleet.check_processes()
        return all(len(fleet.ready(n, avoid=victim.node)) == counts[n] for n in counts)

    wait_for(
        replaced,
        timeout=GRACE + 300,
        interval=1.0,
        message=lambda: f"replacements Ready on the other Macs\n{fleet.describe()}",
    )
    moved_in = time.monotonic() - t0
    print(f"replicas replaced and Ready {moved_in:.1f} s after the SIGKILL (grace {GRACE:.0f} s)")
    assert moved_in >= GRACE - 1, "replaced before the Lease grace ran out"
    assert fleet.condition("large", "Degraded").get("reason") == "NodeNotReady"
    for n in counts:
        for r in fleet.ready(n, avoid=victim.node):
            assert node_mac(world, r) in world.fits[n], (n, node_mac(world, r))
            assert chat(r["status"]["endpoint"])["choices"]

    # The agent comes back (same store and state): the deployments trim back to their replica counts.
    victim.start()
    registered(fleet.cluster, victim)
    wait_for(
        lambda: all(len(fleet.replicas(n)) == counts[n] for n in counts),
        timeout=120,
        interval=1.0,
        message=lambda: f"the surplus trimmed\n{fleet.describe()}",
    )
    for n in counts:
        fleet.wait_ready(n, counts[n], timeout=120)
    world.lost = (victim_mac, lost_pids)  # which of them went: test_returned_mac_lost_its_stale_replicas


def test_restarted_agent_adopts_its_engines(world: World) -> None:
    """SIGTERM an agent and start it again: its engines outlive it (the agent's authenticating proxy,
    which the endpoints name, does not), and the restarted agent adopts them: same engine pids and
    endpoints, answering again with no failure once it is back."""
    fleet = world.fleet
    busiest = max(MACS, key=lambda m: sum(node_mac(world, r) == m for r in fleet.live()))
    agent = fleet.agents[busiest]
    mine = [r for r in fleet.live() if r["spec"]["nodeName"] == agent.node]
    assert mine, fleet.describe()
    before = {r["metadata"]["name"]: (engine_pid(r["status"]), r["status"]["endpoint"]) for r in mine}

    with Prober([ep for _, ep in before.values()]) as prober:
        wait_for(
            lambda: prober.answers >= len(before),
            timeout=60,
            message=lambda: f"a first round of answers before the SIGTERM (failures: {prober.failures})",
        )
        assert agent.signal(signal.SIGTERM) == 0, agent.tail()
        for pid, _ in before.values():
            assert alive(pid)
        agent.start()
        registered(fleet.cluster, agent)
        wait_for(
            lambda: "adopted engine" in agent.tail(400),
            timeout=60,
            message=lambda: f"the agent to adopt its engines:\n{agent.tail()}",
        )

        def all_ready_again() -> dict[str, tuple[int, str]] | None:
            now = {
                r["metadata"]["name"]: (engine_pid(r["status"]), r["status"]["endpoint"])
                for r in fleet.live()
                if r["spec"]["nodeName"] == agent.node and (r.get("status") or {}).get("phase") == "Ready"
            }
            return now if set(now) == set(before) else None

        after = wait_for(
            all_ready_again,
            timeout=90,
            interval=1.0,
            message=lambda: f"its replicas Ready again\n{fleet.describe()}",
        )
        # And a little after: another round of answers from every endpoint once the agent is back.
        while_down = len(prober.failures)  # the endpoints are the agent's proxy: down with it
        seen = prober.answers
        wait_for(
            lambda: prober.answers >= seen + len(before), timeout=60, message="answers after the restart"
        )
    assert after == before
    assert not prober.failures[while_down:], prober.failures
    for n in ("small", "medium", "large"):
        assert len(fleet.live(n)) == world.workloads[n].replicas  # nothing was replaced meanwhile


def test_rollout_to_a_new_digest_completes_without_dropping_ready(world: World) -> None:
    """A new tiny model under the same tag + the re-resolve annotation: every replica moves to the new
    digest, Ready never drops below replicas - maxUnavailable (0), the old engines stop."""
    fleet, w = world.fleet, world.workloads["small"]
    old = fleet.ready("small")
    old_pids = pids_of(old)
    old_digest = world.digests["small"]
    new_dir = tinymodel.build(w.model_dir.parent / "small-v2", seed=1)
    new_digest = push_cli(new_dir, w.tag, fleet.cluster.env() | fleet.env)
    assert new_digest != old_digest

    t0 = time.monotonic()
    fleet.cluster.kubectl("annotate", "md", "small", "-n", fleet.ns, "orchardist.io/re-resolve=now")
    lowest_ready, most_live = w.replicas, w.replicas
    samples: list[tuple[float, int, int, int, int]] = []

    def sample_until_rolled() -> bool:
        """Record (t, live, ready, md ready, new ready); true once every replica is on the new digest."""
        nonlocal lowest_ready, most_live
        fleet.check_processes()
        live = fleet.live("small")
        ready = [r for r in live if (r.get("status") or {}).get("phase") == "Ready"]
        md_ready = int((fleet.md("small").get("status") or {}).get("readyReplicas") or 0)
        lowest_ready = min(lowest_ready, len(ready), md_ready)
        most_live = max(most_live, len(live))
        fresh = [r for r in ready if r["spec"]["digest"] == new_digest]
        samples.append((round(time.monotonic() - t0, 1), len(live), len(ready), md_ready, len(fresh)))
        return (
            len(live) == w.replicas == len(ready)
            and all(r["spec"]["digest"] == new_digest for r in live)
            and len(fleet.replicas("small")) == w.replicas
        )

    wait_for(
        sample_until_rolled,
        timeout=400,
        interval=0.5,
        message=lambda: f"rollout did not finish: {samples[-10:]}\n{fleet.describe()}",
    )
    took = time.monotonic() - t0
    print(f"rollout done in {took:.1f} s; (t, live, ready, md ready, new ready) samples: {samples}")
    max_unavailable = 0  # the default rollout settings
    assert lowest_ready >= w.replicas - max_unavailable, samples
    assert most_live <= w.replicas + 1, samples  # maxSurge 1
    assert any(s[1] == w.replicas + 1 for s in samples), samples  # it surged: new before old went
    md = fleet.md("small")
    assert md["status"]["resolvedDigest"] == new_digest
    assert "orchardist.io/re-resolve" not in (md["metadata"].get("annotations") or {})
    wait_gone(list(old_pids.values()))
    for r in fleet.ready("small"):
        assert r["spec"]["model"].endswith("@" + new_digest)
        assert engine_pid(r["status"]) not in old_pids.values()
        assert chat(r["status"]["endpoint"])["choices"]
    wait_for(
        lambda: fleet.condition("small", "Ready").get("status") == "True",
        timeout=30,
        message="md small Ready",
    )


def test_returned_mac_lost_its_stale_replicas(world: World) -> None:
    """Issue 7: after a Mac's replicas were replaced, "the old ones [are] removed when it returns", and
    their engines stop; the replacements stay. (Last in the module, so the other cases run first.)"""
    fleet = world.fleet
    assert world.lost is not None, "runs after test_killed_agent_lease_expires_and_its_replicas_move"
    victim_mac, lost_pids = world.lost
    # (The rollout has since replaced the small replicas anyway; medium and large are the evidence.)
    kept = sorted(r["metadata"]["name"] for r in fleet.replicas() if r["metadata"]["name"] in lost_pids)
    assert not kept, (
        f"{victim_mac} came back and kept its stale replicas {kept}; replacements were removed instead\n"
        + fleet.describe()
    )
    wait_gone(list(lost_pids.values()))
