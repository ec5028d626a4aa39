"""The controller on the real control plane: `orchardist operator run` as a subprocess.

The tests play the agents: they create MacNodes (status written with the admin client) and their
heartbeat Leases, and set ModelReplica status to simulate pulls and readiness. The model is a tiny
checkpoint pushed to the real registry fixture, so tags resolve and profiles are read for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchardist.dev.cluster import Cluster
from orchardist.kube import RawApi
from orchardist.oci.push import push
from orchardist_agent.engines import Runtime
from tests.fixtures.agents import Operator, chat, make_agent, stop_recorded_engines
from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.registry]

GiB = 2**30
SYSTEM = "orchardist-system"
GRACE = 6.0  # seconds: the tests' Lease grace, so expiry is quick


def micro(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="session")
async def tiny_tag(registry: str, tiny_model: Path) -> tuple[str, str]:
    """(tag reference, digest) of the tiny model pushed to the registry fixture."""
    digest = await push(tiny_model, f"{registry}/controller-e2e/tiny:v1")
    return f"oci://{registry}/controller-e2e/tiny:v1", digest


@dataclass
class World:
    """One test's namespace, its simulated Macs and the operators it started."""

    cluster: Cluster
    ns: str
    tag: str
    digest: str
    macs: list[str] = field(default_factory=list)
    operators: list[Operator] = field(default_factory=list)
    alive: set[str] = field(default_factory=set)  # Macs whose simulated agent renews the Lease
    stop: threading.Event = field(default_factory=threading.Event)
    renewing: threading.Lock = field(default_factory=threading.Lock)  # held while a renewal is sent

    def heartbeat(self) -> None:
        """Play every live agent's Lease renewal (every second, well inside the grace)."""
        kube = RawApi(self.cluster.api_client())
        while not self.stop.wait(1.0):
            with self.renewing:
                for node in list(self.alive):
                    body = {"spec": {"renewTime": micro(datetime.now(UTC))}}
                    with contextlib.suppress(Exception):
                        kube.merge_patch(
                            f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM}/leases/{node}", body
                        )

    # -- kubectl -----------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input=input, check=check).stdout

    def get(self, *args: str) -> Any:
        out = self.cluster.kubectl("get", *args, "-o", "json", check=False)
        if out.returncode != 0:
            if "NotFound" in out.stderr:
                return None
            raise AssertionError(out.stderr)
        return json.loads(out.stdout)

    def apply(self, doc: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(doc))

    # -- the operator --------------------------------------------------------------------------
    def start_operator(self, *extra: str, scope: tuple[str, ...] = ()) -> Operator:
        args = [*(scope or ("--namespace", self.ns)), "--lease-grace", str(GRACE), "--resync", "1", *extra]
        if "--peering" not in extra and not scope:
            args.append("--standalone")
        op = Operator.spawn(self.cluster, *args)
        self.operators.append(op)
        op.wait_started(60)
        return op

    # -- simulated Macs --------------------------------------------------------------------------
    def mac(
        self,
        name: str,
        ws_gib: float = 48,
        *,
        engines: tuple[str, ...] = ("vllm-metal", "mlx-lm"),
        unschedulable: bool = False,
        lease: bool = True,
        chip: str = "M4 Pro",
        total_gib: int = 64,
    ) -> str:
        full = f"{self.ns}-{name}"
        self.macs.append(full)
        self.apply(
            {
                "apiVersion": "orchardist.io/v1alpha1",
                "kind": "MacNode",
                "metadata": {"name": full, "labels": {"test": self.ns}},
                "spec": {"unschedulable": unschedulable},
            }
        )
        status = {
            "chip": {"name": f"Apple {chip}", "family": chip},
            "memory": {
                "totalBytes": total_gib * GiB,
                "gpuWorkingSetBytes": int(ws_gib * GiB),
                "gpuWorkingSetSource": "simulated",
            },
            "memoryBandwidthBytesPerSecond": 273 * 10**9,
            "engines": [{"name": e, "version": "0.1.0"} for e in engines],
            "address": "127.0.0.1",
        }
        self.kubectl(
            "patch",
            "macnode",
            full,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
        if lease:
            self.renew(full)
            self.alive.add(full)
        return full

    def expire(self, node: str) -> None:
        """The Mac's agent is gone: no more renewals, and the last one is older than the grace.

        Taking the heartbeat's lock means no renewal is in flight once the node is dropped, so the
        stale time written here is the last word.
        """
        with self.renewing:
            self.alive.discard(node)
        self.renew(node, age=GRACE + 30)

    def renew(self, node: str, age: float = 0.0) -> None:
        when = micro(datetime.now(UTC) - timedelta(seconds=age))
        self.apply(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": node, "namespace": SYSTEM},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": when},
            }
        )

    # -- deployments and replicas --------------------------------------------------------------
    def deploy(self, name: str, replicas: int = 1, **spec: Any) -> None:
        placement = spec.pop("placement", {})
        self.apply(
            {
                "apiVersion": "orchardist.io/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {
                    "model": self.tag,
                    "engine": "mlx-lm",
                    "replicas": replicas,
                    "contextLength": 1024,
                    "maxConcurrentSequences": 2,
                    "placement": {"nodeSelector": {"test": self.ns}, **placement},
                    **spec,
                },
            }
        )

    def md(self, name: str) -> dict[str, Any]:
        got = self.get("modeldeployment", name, "-n", self.ns)
        assert got is not None
        return got  # type: ignore[no-any-return]

    def replicas(self, name: str | None = None) -> list[dict[str, Any]]:
        sel = [f"-l=orchardist.io/deployment={name}"] if name else []
        got = self.get("modelreplicas", "-n", self.ns, *sel)
        return list((got or {}).get("items") or [])

    def set_replica(self, replica: dict[str, Any], phase: str, endpoint: str | None = None) -> None:
        status: dict[str, Any] = {"phase": phase}
        if endpoint:
            status["endpoint"] = endpoint
        self.kubectl(
            "patch",
            "modelreplica",
            replica["metadata"]["name"],
            "-n",
            self.ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )

    def make_ready(self, name: str, port: int = 8001) -> None:
        """Play the agents: every replica of ``name`` not yet Ready becomes Ready at 127.0.0.x:port."""
        for i, r in enumerate(sorted(self.replicas(name), key=lambda r: r["metadata"]["name"])):
            if (r.get("status") or {}).get("phase") != "Ready" and not r["metadata"].get("deletionTimestamp"):
                self.set_replica(r, "Ready", f"192.0.2.{10 + i}:{port}")  # TEST-NET-1

    def count(self, name: str, n: int) -> list[dict[str, Any]] | None:
        """The deployment's replicas once there are exactly ``n`` (else None, to keep polling)."""
        reps = self.replicas(name)
        return reps if len(reps) == n else None

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        conds = (self.md(name).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == ctype), {})

    def logs(self) -> str:
        return "\n\n".join("\n".join(op.lines[-60:]) for op in self.operators)


@pytest.fixture
def world(cluster: Cluster, namespace: str, tiny_tag: tuple[str, str]) -> Iterator[World]:
    cluster.kubectl("create", "namespace", SYSTEM, check=False)
    w = World(cluster, namespace, *tiny_tag)
    beat = threading.Thread(target=w.heartbeat, daemon=True)
    beat.start()
    try:
        yield w
    finally:
        w.stop.set()
        for op in w.operators:
            op.stop()
        print(w.logs())  # shown by pytest only when the test failed
        print(w.kubectl("get", "md,mr", "-n", w.ns, "-o", "yaml", check=False))
        for m in w.macs:
            cluster.kubectl("delete", "macnode", m, "--ignore-not-found", "--wait=false", check=False)
            cluster.kubectl(
                "delete", "lease", m, "-n", SYSTEM, "--ignore-not-found", "--wait=false", check=False
            )


def settled(world: World, name: str) -> bool:
    """Ready, and Reconciling False: the controller counts exactly the replicas asked for."""
    return world.condition(name, "Ready").get("status") == "True" and (
        world.condition(name, "Reconciling").get("status") == "False"
    )


def nodes_of(replicas: list[dict[str, Any]]) -> list[str]:
    return sorted(r["spec"]["nodeName"] for r in replicas if not r["metadata"].get("deletionTimestamp"))


def test_apply_binds_replicas_to_the_right_macs_and_exposes_them(world: World) -> None:
    """Only Ready, schedulable Macs with the engine get replicas; readiness reaches the slice and Ready."""
    good1, good2 = world.mac("good-1"), world.mac("good-2")
    world.mac("no-engine", engines=("vllm-metal",))
    world.mac("cordoned", unschedulable=True)
    world.mac("stale", lease=False)
    world.start_operator()
    world.deploy("tiny", replicas=2)

    reps = wait_for(lambda: world.count("tiny", 2), timeout=60, message="2 replicas")
    assert nodes_of(reps) == sorted([good1, good2]), world.logs()
    md = world.md("tiny")
    for r in reps:
        assert r["metadata"]["labels"]["orchardist.io/deployment"] == "tiny"
        assert r["metadata"]["labels"]["orchardist.io/node"] == r["spec"]["nodeName"]
        assert r["metadata"]["labels"]["orchardist.io/revision"]
        (owner,) = r["metadata"]["ownerReferences"]
        assert (owner["uid"], owner["controller"], owner["blockOwnerDeletion"]) == (
            md["metadata"]["uid"],
            True,
            True,
        )
        assert r["spec"]["digest"] == world.digest
        assert r["spec"]["model"].endswith("@" + world.digest)
        assert r["spec"]["memoryPlan"]["maxModelLen"] == 1024
        assert r["spec"]["memoryPlan"]["reservedBytes"] > 0
    status = md["status"]
    assert status["resolvedDigest"] == world.digest
    assert status["modelProfile"]["architecture"] == "LlamaForCausalLM"
    svc = world.get("service", "tiny", "-n", world.ns)
    assert svc is not None and "selector" not in svc["spec"]
    assert svc["spec"]["ports"][0]["name"] == "http"

    world.make_ready("tiny", port=8001)
    world.kubectl("wait", "--for=condition=Ready", "md/tiny", "-n", world.ns, "--timeout=30s")

    def slice_addresses() -> list[str] | None:
        sl = world.get("endpointslice", "tiny", "-n", world.ns)
        if not sl:
            return None
        addrs = sorted(a for e in sl.get("endpoints") or [] for a in e["addresses"])
        return addrs if len(addrs) == 2 else None

    assert wait_for(slice_addresses, timeout=15, message="the slice to list both") == [
        "192.0.2.10",
        "192.0.2.11",
    ]
    sl = world.get("endpointslice", "tiny", "-n", world.ns)
    assert sl["addressType"] == "IPv4" and sl["ports"] == [{"name": "http", "port": 8001, "protocol": "TCP"}]
    assert sl["metadata"]["labels"]["kubernetes.io/service-name"] == "tiny"
    md = world.md("tiny")
    assert md["status"]["ready"] == "2/2" and md["status"]["phase"] == "Ready"
    assert md["status"]["observedGeneration"] == md["metadata"]["generation"]
    assert md["status"]["endpoint"] == f"tiny.{world.ns}.svc:8000"
    events = world.get("events", "-n", world.ns, "--field-selector", "involvedObject.name=tiny")
    reasons = {e["reason"] for e in events["items"]}
    assert {"Scheduled", "Started"} <= reasons, reasons


def test_nothing_fits_names_the_closest_mac(world: World) -> None:
    """Unschedulable: Ready=False, reason Unschedulable, the closest Mac and the shortfall in GiB."""
    world.mac("mini", ws_gib=1.0, chip="M2", total_gib=8)
    world.mac("smaller", ws_gib=0.5, chip="M1", total_gib=8)
    world.start_operator()
    world.deploy("big")
    cond = wait_for(
        lambda: (c := world.condition("big", "Ready")).get("reason") == "Unschedulable" and c,
        timeout=60,
        message="Ready=False Unschedulable",
    )
    assert cond["status"] == "False"
    assert cond["message"].startswith(f"no Mac fits: closest is {world.ns}-mini (M2, 8 GiB): weights "), cond
    assert (
        "free of its working set; short " in cond["message"] and cond["message"].rstrip(")").count("GiB") >= 3
    )
    assert world.condition("big", "Stalled")["status"] == "True"
    assert world.replicas("big") == []


def test_lease_expiry_moves_replicas_and_the_old_one_goes_when_its_mac_returns(world: World) -> None:
    """A Mac stops renewing: its replica is replaced elsewhere and marked; when the Mac returns, the
    marked one goes once the replacement serves."""
    a = world.mac("a", ws_gib=64)
    world.start_operator()
    world.deploy("tiny", replicas=1)
    (first,) = wait_for(lambda: world.replicas("tiny"), timeout=60, message="a replica on a")
    assert first["spec"]["nodeName"] == a
    b = world.mac("b", ws_gib=48)
    world.expire(a)

    def replaced() -> list[dict[str, Any]] | None:
        rs = world.replicas("tiny")
        return rs if b in nodes_of(rs) else None

    reps = wait_for(replaced, timeout=60, message="a replacement on b")
    assert nodes_of(reps) == sorted([a, b])  # the lost one is kept while its Mac is NotReady
    assert world.condition("tiny", "Degraded").get("reason") == "NodeNotReady"
    old = next(r for r in world.replicas("tiny") if r["spec"]["nodeName"] == a)
    assert "orchardist.io/lost" in (old["metadata"].get("annotations") or {})

    world.make_ready("tiny")  # the replacement serves (and, stale, the old one says Ready too)
    world.renew(a)
    world.alive.add(a)  # a's agent is back
    wait_for(
        lambda: nodes_of(world.replicas("tiny")) == [b], timeout=60, message="the replaced replica deleted"
    )
    world.kubectl("wait", "--for=condition=Ready", "md/tiny", "-n", world.ns, "--timeout=30s")


def test_replicas_of_a_deleted_macnode_are_deleted_and_replaced(world: World) -> None:
    """A MacNode removed for good: its replicas are deleted at once and placed elsewhere."""
    a = world.mac("a", ws_gib=64)
    world.start_operator()
    world.deploy("tiny", replicas=1)
    wait_for(lambda: nodes_of(world.replicas("tiny")) == [a], timeout=60, message="a replica on a")
    b = world.mac("b", ws_gib=48)
    world.alive.discard(a)
    world.kubectl("delete", "macnode", a)
    wait_for(lambda: nodes_of(world.replicas("tiny")) == [b], timeout=60, message="the replica moved to b")


def test_rollout_never_drops_below_the_ready_count(world: World) -> None:
    """New engine args: new replicas first (maxSurge 1), an old one goes only when a new one is Ready."""
    for i in range(3):
        world.mac(f"m{i}")
    world.start_operator()
    world.deploy("tiny", replicas=2)
    wait_for(lambda: len(world.replicas("tiny")) == 2, timeout=60, message="2 replicas")
    world.make_ready("tiny")
    world.kubectl("wait", "--for=condition=Ready", "md/tiny", "-n", world.ns, "--timeout=30s")
    old_rev = world.replicas("tiny")[0]["metadata"]["labels"]["orchardist.io/revision"]

    world.deploy("tiny", replicas=2, engineArgs=["--seed", "7"])
    lowest, most = 2, 2

    def rolled_out() -> bool:
        """One observation of the rollout; then the agents make whatever is new Ready."""
        nonlocal lowest, most
        reps = [r for r in world.replicas("tiny") if not r["metadata"].get("deletionTimestamp")]
        ready = sum((r.get("status") or {}).get("phase") == "Ready" for r in reps)
        lowest, most = min(lowest, ready), max(most, len(reps))
        revs = {r["metadata"]["labels"]["orchardist.io/revision"] for r in reps}
        if len(reps) == 2 and old_rev not in revs and ready == 2:
            return True
        world.make_ready("tiny")
        return False

    # A second between looks: each new replica is seen not Ready at least once, as after a pull.
    wait_for(rolled_out, timeout=90, interval=1.0, message=lambda: "rollout did not finish\n" + world.logs())
    assert lowest >= 2, f"ready count dropped to {lowest}"
    assert most <= 3, f"{most} replicas at once with maxSurge 1"
    world.kubectl("wait", "--for=condition=Ready", "md/tiny", "-n", world.ns, "--timeout=30s")


def test_operator_killed_mid_reconcile_converges_after_restart(world: World) -> None:
    """SIGKILL while replicas are being created; the restarted operator ends with exactly N, no extras."""
    for i in range(4):
        world.mac(f"m{i}")
    op = world.start_operator()
    world.deploy("tiny", replicas=4)
    wait_for(lambda: world.replicas("tiny"), timeout=60, message="the first replica", interval=0.05)
    op.kill()
    seen = len(world.replicas("tiny"))
    world.start_operator()
    wait_for(lambda: world.count("tiny", 4), timeout=60, message="4 replicas")
    world.make_ready("tiny")
    # Settled: the restarted operator itself counts exactly four (Reconciling False only then).
    wait_for(lambda: settled(world, "tiny"), timeout=60, message="the deployment to settle")
    reps = world.replicas("tiny")
    assert len(reps) == 4 and len(set(nodes_of(reps))) == 4, (seen, nodes_of(reps))
    assert world.md("tiny")["status"]["replicas"] == 4


def test_two_operators_one_leader(world: World) -> None:
    """Two peered operators: the higher priority acts, the other pauses; it takes over when that dies."""
    for i in range(3):
        world.mac(f"m{i}")
    first = world.start_operator("--peering", "orchardist", "--priority", "1", "--peering-lifetime", "10")
    second = world.start_operator("--peering", "orchardist", "--priority", "2", "--peering-lifetime", "10")
    wait_for(lambda: first.said("Pausing operations in favour of"), timeout=60, message="the first to pause")
    world.deploy("tiny", replicas=2)
    wait_for(lambda: len(world.replicas("tiny")) == 2, timeout=60, message="2 replicas")
    world.make_ready("tiny")
    wait_for(lambda: settled(world, "tiny"), timeout=60, message="the deployment to settle")
    assert len(world.replicas("tiny")) == 2
    assert second.events("reconciled") and not first.events("reconciled"), world.logs()
    peering = world.get("kopfpeering", "orchardist", "-n", world.ns)
    assert peering is not None and len(peering.get("status") or {}) == 2

    second.kill()  # the leader dies without saying goodbye; its record expires after 10 s
    world.deploy("tiny", replicas=3)
    wait_for(lambda: len(world.replicas("tiny")) == 3, timeout=60, message="the standby to take over")
    assert first.events("reconciled"), world.logs()


def test_takeover_mid_scale_up_acts_on_what_is(world: World) -> None:
    """The standby had been active (its indexes hold the deployment at 1 replica); the leader dies
    right after creating replicas 2 and 3, and one becomes Ready meanwhile. The standby takes over
    from a fresh list: never more than 3 replicas, one Scheduled Event per replica, no status or
    Event counting fewer replicas or fewer ready ones than there were, and it converges."""
    for i in range(3):
        world.mac(f"m{i}")
    first = world.start_operator("--peering", "orchardist", "--priority", "1", "--peering-lifetime", "10")
    world.deploy("tiny", replicas=1)
    wait_for(lambda: world.count("tiny", 1), timeout=60, message="1 replica by the first operator")
    world.make_ready("tiny")
    wait_for(lambda: settled(world, "tiny"), timeout=60, message="the deployment to settle at 1")
    second = world.start_operator("--peering", "orchardist", "--priority", "2", "--peering-lifetime", "10")
    wait_for(lambda: first.said("Pausing operations in favour of"), timeout=60, message="the first to pause")

    seen: list[tuple[int, int, int]] = []  # (replicas existing, status.replicas, status.readyReplicas)
    watching = threading.Event()

    def poll() -> None:
        while not watching.wait(0.2):
            with contextlib.suppress(Exception):
                reps = [r for r in world.replicas("tiny") if not r["metadata"].get("deletionTimestamp")]
                st = world.md("tiny").get("status") or {}
                seen.append((len(reps), st.get("replicas", 0), st.get("readyReplicas", 0)))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        world.deploy("tiny", replicas=3)
        made = wait_for(lambda: world.count("tiny", 3), timeout=60, message="the leader to create 2 more")
        second.kill()  # mid scale-up: the new replicas exist, none serves yet
        newer = sorted(r["metadata"]["name"] for r in made if (r.get("status") or {}).get("phase") != "Ready")
        world.set_replica(
            next(r for r in made if r["metadata"]["name"] == newer[0]), "Ready", "192.0.2.40:8001"
        )
        wait_for(
            lambda: first.said("Resuming operations after the pause"),
            timeout=60,
            message="the standby to resume",
        )
        wait_for(
            lambda: world.md("tiny")["status"].get("readyReplicas") == 2,
            timeout=60,
            message=lambda: "the standby to count 2 ready\n" + world.logs(),
        )
        world.make_ready("tiny")
        wait_for(lambda: settled(world, "tiny"), timeout=60, message=lambda: "convergence\n" + world.logs())
    finally:
        watching.set()
        poller.join(5)
    assert len(world.replicas("tiny")) == 3
    assert max(n for n, _, _ in seen) <= 3, seen
    # Once the status counted 3 replicas it never counts fewer; the ready count never goes back.
    first_three = next(i for i, (_, st, _) in enumerate(seen) if st == 3)
    assert all(st == 3 for _, st, _ in seen[first_three:]), seen
    ready = [r for _, _, r in seen]
    assert all(a <= b for a, b in itertools.pairwise(ready)), seen
    events = (world.get("events", "-n", world.ns, "--field-selector=involvedObject.name=tiny") or {})["items"]
    scheduled = [e["message"].split(" ", 1)[0] for e in events if e["reason"] == "Scheduled"]
    assert sorted(scheduled) == sorted(r["metadata"]["name"] for r in world.replicas("tiny")), events
    assert all(e.get("count", 1) == 1 for e in events if e["reason"] == "Scheduled"), events
    # After the takeover 2 of 3 were ready: the new leader (identity host/pid/priority) says no less.
    after = [e for e in events if str(e.get("reportingInstance", "")).endswith("/1")]
    counts = [int(m.group(1)) for e in after if (m := re.search(r"\b(\d+)/3 ", e["message"]))]
    assert all(n >= 2 for n in counts), after


async def test_re_resolve_annotation_pins_the_moved_tag(
    world: World, registry: str, tiny_model: Path, tmp_path: Path
) -> None:
    """A tag is resolved once; after it moves, the annotation re-resolves it and the replicas roll."""
    from orchardist.dev.tinymodel import build

    world.mac("m0")
    world.mac("m1")
    tag = f"oci://{registry}/controller-e2e/moving:v1"
    first = await push(tiny_model, tag)
    world.start_operator()
    world.deploy("mv", replicas=1, model=tag)
    wait_for(
        lambda: (world.md("mv").get("status") or {}).get("resolvedDigest") == first,
        timeout=60,
        message="the first pin",
    )
    world.make_ready("mv")
    second = await push(build(tmp_path / "other", seed=1), tag)
    assert second != first
    # A reconcile after the tag moved (asked for by scaling up) keeps the pin: the new replica
    # runs the first digest too, and nothing rolls.
    world.deploy("mv", replicas=2, model=tag)
    reps = wait_for(lambda: world.count("mv", 2), timeout=60, message="the second replica")
    assert {r["spec"]["digest"] for r in reps} == {first}
    assert world.md("mv")["status"]["resolvedDigest"] == first
    world.make_ready("mv")

    world.kubectl("annotate", "md", "mv", "-n", world.ns, "orchardist.io/re-resolve=now")
    wait_for(
        lambda: world.md("mv")["status"].get("resolvedDigest") == second, timeout=60, message="the new pin"
    )
    assert world.md("mv")["status"]["resolvedModel"].endswith("@" + second)
    wait_for(
        lambda: "orchardist.io/re-resolve" not in (world.md("mv")["metadata"].get("annotations") or {}),
        timeout=30,
        message="the annotation consumed",
    )

    def rolled() -> bool:
        world.make_ready("mv")
        reps = [r for r in world.replicas("mv") if not r["metadata"].get("deletionTimestamp")]
        return len(reps) == 2 and {r["spec"]["digest"] for r in reps} == {second}

    wait_for(rolled, timeout=60, message="the replica on the new digest", interval=1.0)


def test_scale_subresource_scales_and_scale_down_removes_not_ready_first(world: World) -> None:
    """`kubectl scale` (the scale subresource, selector in status) adds and removes replicas."""
    for i in range(3):
        world.mac(f"m{i}")
    world.start_operator()
    world.deploy("tiny", replicas=1)
    wait_for(lambda: world.count("tiny", 1), timeout=60, message="1 replica")
    world.make_ready("tiny")
    world.kubectl("scale", "md/tiny", "-n", world.ns, "--replicas=3")
    reps = wait_for(lambda: world.count("tiny", 3), timeout=60, message="3 replicas")
    assert len(set(nodes_of(reps))) == 3  # spread Preferred
    ready = {r["metadata"]["name"] for r in reps if (r.get("status") or {}).get("phase") == "Ready"}
    scale = json.loads(
        world.kubectl(
            "get", "--raw", f"/apis/orchardist.io/v1alpha1/namespaces/{world.ns}/modeldeployments/tiny/scale"
        )
    )
    assert scale["spec"]["replicas"] == 3 and scale["status"]["selector"] == "orchardist.io/deployment=tiny"
    world.kubectl("scale", "md/tiny", "-n", world.ns, "--replicas=1")
    (kept,) = wait_for(lambda: world.count("tiny", 1), timeout=60, message="1 replica")
    assert kept["metadata"]["name"] in ready  # the two that were not serving went first


def test_pull_secret_gives_the_controller_registry_credentials(
    world: World, auth_registry: Any, tiny_model: Path
) -> None:
    """A private registry: the deployment's pullSecretRef (dockerconfigjson) lets the tag resolve."""
    from orchardist.oci.auth import Credentials

    tag = f"oci://{auth_registry.host}/controller-e2e/private:v1"
    creds = Credentials(auth_registry.username, auth_registry.password)
    digest = asyncio.run(push(tiny_model, tag, auth=creds))
    world.mac("m0")
    world.start_operator()
    world.deploy("nocreds", model=tag)
    wait_for(
        lambda: world.condition("nocreds", "Stalled").get("reason") == "ResolveFailed",
        timeout=60,
        message="ResolveFailed without credentials",
    )
    world.kubectl(
        "create",
        "secret",
        "docker-registry",
        "regcred",
        "-n",
        world.ns,
        f"--docker-server={auth_registry.host}",
        f"--docker-username={auth_registry.username}",
        f"--docker-password={auth_registry.password}",
    )
    world.deploy("private", model=tag, pullSecretRef={"name": "regcred"})
    wait_for(
        lambda: (world.md("private").get("status") or {}).get("resolvedDigest") == digest,
        timeout=60,
        message="the private model pinned",
    )
    (r,) = wait_for(lambda: world.count("private", 1), timeout=60, message="its replica")
    assert r["spec"]["pullSecretRef"] == {"name": "regcred"}


def test_the_default_cluster_wide_operator_peers_and_serves(world: World) -> None:
    """The production default: every namespace, peering `orchardist` (a ClusterKopfPeering)."""
    world.mac("m0")
    op = world.start_operator(scope=("--all-namespaces",))
    world.deploy("tiny", replicas=1)
    wait_for(lambda: world.count("tiny", 1), timeout=60, message="a replica")
    peering = world.get("clusterkopfpeering", "orchardist")
    assert peering is not None and len(peering.get("status") or {}) >= 1, world.logs()
    assert op.events("reconciled")


def test_deleting_the_deployment_removes_replicas_service_and_slice(world: World) -> None:
    """ownerReferences + garbage collection: replicas, Service and EndpointSlice go with the deployment."""
    world.mac("m0")
    world.start_operator()
    world.deploy("tiny", replicas=1)
    wait_for(lambda: world.replicas("tiny"), timeout=60, message="a replica")
    world.make_ready("tiny")
    wait_for(lambda: world.get("endpointslice", "tiny", "-n", world.ns), timeout=30, message="the slice")
    world.kubectl("delete", "md", "tiny", "-n", world.ns, "--wait=true", "--timeout=60s")
    wait_for(lambda: world.replicas() == [], timeout=60, message="replicas gone")
    wait_for(lambda: world.get("service", "tiny", "-n", world.ns) is None, timeout=60, message="service gone")
    wait_for(
        lambda: world.get("endpointslice", "tiny", "-n", world.ns) is None, timeout=60, message="slice gone"
    )


@pytest.mark.engine
def test_real_agent_serves_the_deployment_with_mlx_lm(
    world: World, tmp_path: Path, mlx_runtime: Runtime
) -> None:
    """End to end: operator -> bound replica -> a real agent pulls and starts mlx-lm -> Ready -> a completion.

    The agent reports a loopback endpoint here (tests talk only to 127.0.0.1), which the API server
    refuses in EndpointSlices, so the completion goes to the replica's endpoint directly.
    """
    agent = make_agent(world.cluster, tmp_path / "agent", extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}"))
    agent.start()
    try:
        wait_for(lambda: world.get("macnode", agent.node), timeout=60, message="the agent's MacNode")
        world.kubectl("label", "macnode", agent.node, f"test={world.ns}")
        world.macs.append(agent.node)
        world.start_operator()
        world.deploy("tiny", replicas=1)
        try:
            world.kubectl("wait", "--for=condition=Ready", "md/tiny", "-n", world.ns, "--timeout=240s")
        except Exception as exc:
            raise AssertionError(f"{exc}\nagent:\n{agent.tail(40)}") from None
        md = world.md("tiny")
        (entry,) = md["status"]["replicaStatuses"]
        assert entry["nodeName"] == agent.node and entry["phase"] == "Ready"
        assert chat(entry["endpoint"])["choices"]
        degraded = world.condition("tiny", "Degraded")  # honest: the Service cannot reach 127.0.0.1
        assert (degraded["status"], degraded["reason"]) == ("True", "EndpointNotRoutable"), degraded
        events = world.get("events", "-n", world.ns, "--field-selector", "involvedObject.name=tiny")
        assert {"Scheduled", "Started"} <= {e["reason"] for e in events["items"]}
    finally:
        agent.stop()
        stop_recorded_engines(agent.workdir / "state")  # engines outlive their agent by design
