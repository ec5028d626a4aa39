"""A three-replica rollout on the real everything takes the model from the registry once.

Three agents, each in its own network namespace with its own chart ServiceAccount token (peers
authenticate with that node identity), a real operator on the real control plane, a TLS registry
on the bridge: the controller names each replica's peers (``orchardist.io/peers``), one agent
pulls the weights from the registry and the others take them from it over the peer port, each
server having checked its callers' peer tokens with the API server, and every replica ends Ready
(a real ``mlx_lm.server``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchardist.dev import netns, tinymodel
from orchardist.dev.cluster import Cluster, find_kubebins
from orchardist.dev.registry import Registry, make_tls
from orchardist_agent.engines import Runtime
from orchardist_agent.peers import ANNOTATION, peers_from_hint
from tests.e2e.fleet_helpers import Fleet, push_cli
from tests.fixtures.agents import agent_token, make_agent

pytestmark = [pytest.mark.cluster, pytest.mark.registry, pytest.mark.engine, pytest.mark.timeout(1200)]

MACS = ["m2-16gb", "m4-pro-48gb", "m4-max-128gb"]
CHART = Path(__file__).resolve().parents[2] / "charts" / "orchardist"


def authenticated(log: Path) -> set[str]:
    """The nodes an agent's peer server let in (its ``peer authenticated`` log lines)."""
    lines = [
        json.loads(line) for line in log.read_text(errors="replace").splitlines() if line.startswith("{")
    ]
    return {line["node"] for line in lines if line.get("event") == "peer authenticated"}


def macs_gets(reg: Registry, digest: str, addresses: set[str]) -> int:
    """Blob GETs of ``digest`` the registry's access log shows from the Macs' addresses."""
    lines = reg.log.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if f"/blobs/{digest} " in line and line.split(" ", 1)[0] in addresses)


@pytest.fixture(scope="module")
def bridged_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane listening on every address, so the Macs' namespaces reach it over the bridge."""
    cl = Cluster.start(
        tmp_path_factory.mktemp("peers-cluster") / "state",
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


def test_a_rollout_takes_each_weight_blob_from_the_registry_once(
    bridged_cluster: Cluster, mlx_runtime: Runtime, tmp_path: Path
) -> None:
    cluster = bridged_cluster
    tag = os.urandom(3).hex()
    ns = f"peers-{tag}"
    netns.sweep()
    reason = netns.unavailable()
    assert reason is None, f"the Macs run in network namespaces, which need root: {reason}"
    subnet = netns.pick_subnet(netns.routes(), start=int(tag, 16) % 256)
    names = [f"{ns}-{mac}" for mac in MACS]
    fabric = netns.create(tag, names, subnet=subnet, owner_pid=os.getpid())
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "namespace", "orchardist-system", check=False)
    reg = Registry.start(
        tmp_path / "registry",
        bind=fabric.host_address,
        tls=make_tls(tmp_path / "registry-tls", fabric.host_address),
        die_with_parent=True,
    )
    env = cluster.env() | reg.client_env()
    fleet = Fleet(cluster, ns, tmp_path / "macs", mlx_runtime.prefix, 15.0, fabric, reg.client_env())
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "files" / "kopf"))
    cluster.helm(
        "install", ns, str(CHART), "-n", "orchardist-system", "--set", "crds.enabled=false",
        "--set", "operator.replicas=0", "--set", "gateway.enabled=false",
        "--set", f"agents.nodes={{{','.join(names)}}}",
    )  # fmt: skip
    try:
        for mac in MACS:
            agent = make_agent(
                cluster,
                fleet.workdir / mac,
                node=fleet.node_of(mac),
                extra=("--runtime", f"mlx-lm={mlx_runtime.prefix}"),
                fabric=fabric,
                env=fleet.env,
                token=agent_token(cluster, fleet.node_of(mac)),
            )
            agent.argv[agent.argv.index("--simulate") + 1] = mac
            fleet.agents[mac] = agent
            agent.start()
        model = tinymodel.build(tmp_path / "model")
        layers = {  # one layer per file (ModelPack, as `orchardist push` writes it)
            p.relative_to(model).as_posix(): "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            for p in model.rglob("*")
            if p.is_file()
        }
        ref = f"oci://{reg.host}/peers/small:v1"
        push_cli(model, ref, env)
        for mac in MACS:
            fleet.join(mac)
        fleet.start_operator()
        fleet.deploy("small", ref, replicas=len(MACS), context=1024, seqs=1)
        ready = fleet.wait_ready("small", len(MACS), timeout=600)

        assert {r["spec"]["nodeName"] for r in ready} == set(names)
        for r in ready:  # each replica names the other two Macs at their namespace addresses
            hint = r["metadata"].get("annotations", {}).get(ANNOTATION, "")
            me = r["spec"]["nodeName"]
            assert {(p.name, p.url) for p in peers_from_hint(hint, me, 8479)} == {
                (n, f"http://{fabric.address(n)}:8479") for n in names if n != me
            }
        # Each blob is claimed on its own, so different Macs may pull different blobs from the
        # registry; what counts is that each left the registry once and the rest moved between Macs.
        # (The operator reads config.json too, to profile the model: only the Macs' GETs count.)
        gets = {
            path: macs_gets(reg, digest, {fabric.address(n) for n in names})
            for path, digest in layers.items()
        }
        assert gets == dict.fromkeys(layers, 1), reg.log.read_text()[-4000:]
        from_peers = sum(a.log.read_text().count('"blob from peers"') for a in fleet.agents.values())
        assert from_peers == len(layers) * (len(MACS) - 1), fleet.describe()
        # Whoever served let in only the fleet's other Macs, by their node names.
        let_in = {n: authenticated(a.log) for n, a in zip(names, fleet.agents.values(), strict=True)}
        assert any(let_in.values()), fleet.describe()
        assert all(seen <= set(names) - {n} for n, seen in let_in.items()), let_in
    finally:
        print(fleet.describe())
        left = fleet.teardown()
        reg.stop()
        cluster.helm("uninstall", ns, "-n", "orchardist-system", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
        assert not left, left
